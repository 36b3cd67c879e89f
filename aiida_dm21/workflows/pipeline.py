"""``dm21.pipeline``: reference data -> training -> SCF of held-out species with the new checkpoint -> report.

This is the whole loop the package exists for, with every step a node in the provenance graph:
the trained checkpoint's lineage reaches each integer reference calculation
(:func:`aiida_dm21.provenance.checkpoint_lineage`).
"""

from __future__ import annotations

from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction

from aiida_dm21.calculations.scf import DM21ScfCalculation
from aiida_dm21.calculations.train import DM21TrainCalculation
from aiida_dm21.data.checkpoint import DM21CheckpointData
from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain, link_label, structure_from_atom

__all__ = ('PipelineWorkChain',)

DEFAULT_SCF_SPECIES = [{'label': 'Li', 'atom': 'Li 0 0 0', 'charge': 0, 'multiplicity': 2}]


@calcfunction
def summarise(metrics: orm.Dict, **scf: orm.Dict) -> orm.Dict:
    """The pipeline's report: training metrics and the held-out SCF energies (a calcfunction: provenance)."""
    return orm.Dict(
        {
            'training': metrics.get_dict(),
            'scf': {key: {k: node.get(k) for k in ('e_tot', 'converged', 'cycles')} for key, node in scf.items()},
        }
    )


class PipelineWorkChain(WorkChain):
    """Reference data -> train -> held-out SCF -> report."""

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.input('code', valid_type=orm.AbstractCode, help='Python with aiida-dm21 (all steps run with it).')
        spec.input('train_set', valid_type=orm.Str, default=lambda: orm.Str('demo_train'))
        spec.input('heldout_set', valid_type=orm.Str, default=lambda: orm.Str('demo_heldout'))
        spec.input('basis', valid_type=orm.Str, default=lambda: orm.Str('6-31g'))
        spec.input(
            'training',
            valid_type=orm.Dict,
            default=lambda: orm.Dict({'epochs': 8, 'learning_rate': 1e-4}),
            help='Hyper-parameters of dm21.train.',
        )
        spec.input(
            'initial_checkpoint',
            valid_type=DM21CheckpointData,
            required=False,
            help='Fine-tune these weights (e.g. DM21m) instead of training from scratch.',
        )
        spec.input(
            'scf_species',
            valid_type=orm.List,
            default=lambda: orm.List(DEFAULT_SCF_SPECIES),
            help='Held-out species for DM21 SCF with the trained checkpoint.',
        )
        spec.input('scf_parameters', valid_type=orm.Dict, default=lambda: orm.Dict({'grid_level': 2}))
        spec.outline(cls.run_reference_data, cls.run_training, cls.run_scf, cls.make_report)
        spec.output('checkpoint', valid_type=DM21CheckpointData)
        spec.output('train_dataset', valid_type=DM21DatasetData)
        spec.output('heldout_dataset', valid_type=DM21DatasetData)
        spec.output('report', valid_type=orm.Dict)
        spec.exit_code(401, 'ERROR_REFERENCE_DATA', message='The reference data workchain failed.')
        spec.exit_code(402, 'ERROR_TRAINING', message='The training failed.')

    def run_reference_data(self):
        futures = {}
        for key in ('train_set', 'heldout_set'):
            builder = ReferenceDataWorkChain.get_builder()
            builder.code = self.inputs.code
            builder.set_name = self.inputs[key]
            builder.basis = self.inputs.basis
            builder.metadata.call_link_label = key.replace('_set', '_data')
            futures[key] = self.submit(builder)
        self.report('reference data: submitted training and held-out sets')
        return ToContext(train_data=futures['train_set'], heldout_data=futures['heldout_set'])

    def run_training(self):
        if not (self.ctx.train_data.is_finished_ok and self.ctx.heldout_data.is_finished_ok):
            return self.exit_codes.ERROR_REFERENCE_DATA
        self.out('train_dataset', self.ctx.train_data.outputs.dataset)
        self.out('heldout_dataset', self.ctx.heldout_data.outputs.dataset)
        builder = DM21TrainCalculation.get_builder()
        builder.code = self.inputs.code
        builder.datasets = {'train': self.ctx.train_data.outputs.dataset}
        builder.heldout = {'heldout': self.ctx.heldout_data.outputs.dataset}
        training = self.inputs.training.get_dict()
        scf_level = self.inputs.scf_parameters.get_dict().get('grid_level')
        if 'grid_level' not in training and scf_level is not None:  # one grid for training and SCF
            training['grid_level'] = scf_level
            builder.parameters = orm.Dict(training)
        else:
            builder.parameters = self.inputs.training
        if 'initial_checkpoint' in self.inputs:
            builder.initial_checkpoint = self.inputs.initial_checkpoint
        builder.metadata.call_link_label = 'train'
        node = self.submit(builder)
        self.report(f'training: dm21.train<{node.pk}>')
        return ToContext(train=node)

    def run_scf(self):
        if not self.ctx.train.is_finished_ok:
            return self.exit_codes.ERROR_TRAINING
        checkpoint = self.ctx.train.outputs.checkpoint
        self.out('checkpoint', checkpoint)
        futures = {}
        candidates = {'trained': checkpoint}
        if 'initial_checkpoint' in self.inputs:
            candidates['initial'] = self.inputs.initial_checkpoint
        for item in self.inputs.scf_species.get_list():
            for which, ckpt in candidates.items():
                builder = DM21ScfCalculation.get_builder()
                builder.code = self.inputs.code
                builder.structure = structure_from_atom(item['atom'])
                params = {
                    'basis': self.inputs.basis.value,
                    'charge': int(item.get('charge', 0)),
                    'multiplicity': int(item.get('multiplicity', 1)),
                }
                params.update(self.inputs.scf_parameters.get_dict())
                builder.parameters = orm.Dict(params)
                builder.checkpoint = ckpt
                key = f'scf_{which}_' + link_label(item['label'])
                builder.metadata.call_link_label = key
                futures[key] = self.submit(builder)
        self.ctx.scf_keys = list(futures)
        return ToContext(**futures)

    def make_report(self):
        scf = {}
        for key in self.ctx.scf_keys:
            node = self.ctx[key]
            if 'output_parameters' in node.outputs:
                scf[key] = node.outputs.output_parameters
            else:
                self.report(f'{key}: {node.process_label}<{node.pk}> has no results (exit {node.exit_status})')
        report = summarise(self.ctx.train.outputs.metrics, **scf)
        self.out('report', report)
        metrics = report.get_dict()['training']
        before = metrics.get('before', {}).get('heldout', {}).get('mae_fc_mha')
        after = metrics.get('after', {}).get('heldout', {}).get('mae_fc_mha')
        self.report(f'held-out fractional-charge MAE: {before} -> {after} mHa')
