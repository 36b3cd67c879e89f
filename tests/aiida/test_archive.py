"""An archive of a ``dm21.scf`` run, imported into a fresh profile, keeps its provenance and its network.

The run and ``create_archive`` happen in the in-process test profile; the import and every check of the imported
data happen in a new ``verdi presto`` profile under a private ``AIIDA_PATH`` (a subprocess, ``backend_driver.py``),
so nothing there can come from the original profile: the links, the checkpoint's attributes and bytes, the network
loaded from the imported file and the energy of the core ``KS(mol, network)`` re-run on the imported molecule.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import uuid
from pathlib import Path

import pytest

pytest.importorskip('aiida.engine')

from aiida.tools.archive import create_archive

pytestmark = [pytest.mark.aiida, pytest.mark.slow]


def _isolated_aiida_class():
    spec = importlib.util.spec_from_file_location('dm21_backend_driver', Path(__file__).with_name('backend_driver.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.IsolatedAiida


def test_archive_round_trip(tmp_path, run_h2_scf, checkpoint_node):
    results, node = run_h2_scf(grid_level=1)
    archive = tmp_path / 'dm21-scf.aiida'
    create_archive([node], filename=archive)  # default rules: the inputs and the created outputs come along

    isolated = _isolated_aiida_class()(tmp_path / 'fresh', f'dm21-archive-{uuid.uuid4().hex[:8]}')
    isolated.verdi('presto', '--non-interactive', '--no-broker', '--profile-name', isolated.profile, '--email', 'x@y')
    isolated.verdi('archive', 'import', str(archive))
    imported = isolated.driver('inspect-import', '--uuid', node.uuid)
    print('\n'.join(f'{seconds:6.1f} s  {command}' for command, seconds in isolated.timings))

    assert imported['process_type'] == 'aiida.calculations:dm21.scf'
    assert imported['exit_status'] == 0
    incoming = {label: node_uuid for label, node_uuid in imported['incoming']}
    assert incoming == {label: node.inputs[label].uuid for label in ('code', 'structure', 'parameters', 'checkpoint')}
    assert imported['outgoing'] == {label: node.outputs[label].uuid for label in results}
    assert set(imported['outgoing']) == {'output_parameters', 'output_density', 'remote_folder', 'retrieved'}
    # exactly the provenance of this run: the calculation, its inputs and its outputs
    assert imported['n_nodes'] == 1 + len(incoming) + len(imported['outgoing'])

    assert imported['checkpoint_class'] == 'DM21CheckpointData'
    assert imported['checkpoint_uuid'] == checkpoint_node.uuid
    assert imported['checkpoint_attributes'] == json.loads(json.dumps(checkpoint_node.base.attributes.all))
    assert imported['checkpoint_attributes']['weights_sha256'] == checkpoint_node.weights_sha256
    assert imported['checkpoint_file_sha256'] == hashlib.sha256(checkpoint_node.get_content(mode='rb')).hexdigest()
    assert imported['n_network_parameters'] == checkpoint_node.n_parameters

    assert imported['archived_e_tot'] == results['output_parameters']['e_tot']
    assert abs(imported['rerun_e_tot'] - imported['archived_e_tot']) < 1e-6
