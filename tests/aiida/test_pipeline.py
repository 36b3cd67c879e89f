"""The whole loop as one workchain (what ``aiida-dm21 demo`` runs), small: one epoch, coarse grids."""

from __future__ import annotations

import pytest
from aiida import orm
from aiida.engine import run_get_node

from aiida_dm21.provenance import checkpoint_lineage
from aiida_dm21.workflows.pipeline import PipelineWorkChain

pytestmark = [pytest.mark.aiida, pytest.mark.slow]


def test_pipeline_end_to_end(checkpoint_node):
    from aiida_dm21.cli.aiida_support import ensure_code

    results, node = run_get_node(
        PipelineWorkChain,
        code=ensure_code(),
        initial_checkpoint=checkpoint_node,
        training=orm.Dict({'epochs': 1, 'learning_rate': 1e-4, 'grid_level': 0}),
        scf_parameters=orm.Dict({'grid_level': 0, 'init_guess': 'minao'}),
    )
    assert node.is_finished_ok, node.exit_message
    report = results['report'].get_dict()
    assert set(report['scf']) == {'scf_trained_Li', 'scf_initial_Li'}
    assert all(v['converged'] for v in report['scf'].values())
    assert report['training']['n_train_systems'] == 17 and report['training']['n_heldout_systems'] == 5
    lineage = checkpoint_lineage(results['checkpoint'])
    labels = sorted(r.inputs.parameters['label'] for r in lineage.reference_calculations)
    assert labels == ['H', 'H+', 'H-', 'He', 'He+']  # the held-out Li calculations are not learned from
    assert lineage.initial.checkpoint.pk == checkpoint_node.pk
    assert results['report'].creator.process_label == 'summarise'
