"""``dm21.pipeline``: reference data -> training -> SCF of held-out species with the new checkpoint -> report.

This is the whole loop the package exists for, with every step a node in the provenance graph:
the trained checkpoint's lineage reaches each integer reference calculation
(:func:`aiida_dm21.provenance.checkpoint_lineage`).  The training runs in :class:`DM21TrainWorkChain` (it resumes
after walltime) and every held-out SCF in :class:`DM21ScfWorkChain` (it restarts until converged).

Resources per step
------------------
The three steps seldom want the same machine: the reference calculations (CCSD(T), many small jobs), the
training (one long job, perhaps on a GPU node) and the SCFs (short jobs).  Each step ``STEP`` of ``reference``,
``train`` and ``scf`` therefore takes

* ``STEP_code``: the code it runs with (optional: the pipeline's ``code`` otherwise), and
* ``STEP_options``: an ``orm.Dict`` of ``metadata.options`` of its CalcJobs (optional: the plugin's defaults,
  one process on one machine and no walltime), e.g. ``{'resources': {'num_machines': 1,
  'num_mpiprocs_per_machine': 4}, 'max_wallclock_seconds': 7200, 'queue_name': 'gpu', 'account': 'proj42'}``.

Why a stored ``Dict`` per step and not a ``metadata.options``-like namespace: the options of a workchain's
``metadata`` are not stored, so the resources a pipeline asked for would not be in the provenance, and a
namespace of non-database ports would have to be copied down level by level; a ``Dict`` is stored with the
pipeline, goes through :class:`ReferenceDataWorkChain` (its ``options`` input) as it is, and its keys are
validated when the pipeline is launched: every key must be an option of the step's CalcJob
(:func:`aiida_dm21.workflows.options.options_problem`), an unknown key is refused with its name.
"""

from __future__ import annotations

import typing as t

from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction

from aiida_dm21.calculations.reference import DM21ReferenceCalculation
from aiida_dm21.calculations.scf import DM21ScfCalculation
from aiida_dm21.calculations.train import DM21TrainCalculation
from aiida_dm21.data.checkpoint import DM21CheckpointData
from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.reference.sets import SPECIES_SETS
from aiida_dm21.workflows.options import options_validator, set_options
from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain, link_label, structure_from_atom
from aiida_dm21.workflows.scf import DM21ScfWorkChain
from aiida_dm21.workflows.train import DM21TrainWorkChain

__all__ = ('STEPS', 'PipelineWorkChain')

DEFAULT_SCF_SPECIES = [{'label': 'Li', 'atom': 'Li 0 0 0', 'charge': 0, 'multiplicity': 2}]

#: The steps of the pipeline and the CalcJob each one runs (through its workchain).
STEPS: dict[str, type] = {
    'reference': DM21ReferenceCalculation,
    'train': DM21TrainCalculation,
    'scf': DM21ScfCalculation,
}


def validate_inputs(inputs: dict, _: t.Any = None) -> str | None:
    """Every step has a code (its own or ``code``); the two sets are built-in sets."""
    missing = [step for step in STEPS if f'{step}_code' not in inputs and 'code' not in inputs]
    if missing:
        steps = ', '.join(f'`{step}_code`' for step in missing)
        return f'no code for the steps {", ".join(missing)}: give `code` (all steps) or {steps}'
    for key in ('train_set', 'heldout_set'):
        if key in inputs and inputs[key].value not in SPECIES_SETS:
            return f'`{key}`: unknown set {inputs[key].value!r}; built-in sets: {", ".join(SPECIES_SETS)}'
    return None


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
    """Reference data -> train (DM21TrainWorkChain) -> held-out SCF (DM21ScfWorkChain) -> report."""

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.input(
            'code',
            valid_type=orm.AbstractCode,
            required=False,
            help='Python with aiida-dm21: the code of every step that has no `STEP_code` of its own.',
        )
        for step, calculation in STEPS.items():
            spec.input(
                f'{step}_code',
                valid_type=orm.AbstractCode,
                required=False,
                help=f'The code of the {step} step ({calculation.__name__}); default: `code`.',
            )
            spec.input(
                f'{step}_options',
                valid_type=orm.Dict,
                required=False,
                validator=options_validator(calculation, f'{step}_options'),
                help=f'metadata.options of every {calculation.__name__} of the {step} step (resources, '
                'max_wallclock_seconds, queue_name, account, max_memory_kb, custom_scheduler_commands ...); '
                'an unknown key is refused at launch.',
            )
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
        spec.inputs.validator = validate_inputs
        spec.outline(cls.run_reference_data, cls.run_training, cls.run_scf, cls.make_report)
        spec.output('checkpoint', valid_type=DM21CheckpointData)
        spec.output('train_dataset', valid_type=DM21DatasetData)
        spec.output('heldout_dataset', valid_type=DM21DatasetData)
        spec.output('report', valid_type=orm.Dict, help='Training metrics and the held-out SCF energies.')
        spec.exit_code(401, 'ERROR_REFERENCE_DATA', message='The reference data workchain failed.')
        spec.exit_code(402, 'ERROR_TRAINING', message='The training failed.')
        spec.exit_code(
            403,
            'ERROR_SCF',
            message='The held-out SCF failed for: {keys} (the report holds the others)',
        )

    def _code(self, step: str) -> orm.AbstractCode:
        """The code of ``step``: its own ``STEP_code``, else ``code`` (the input validator ensures one of them)."""
        key = f'{step}_code'
        if key in self.inputs:
            return self.inputs[key]
        return self.inputs.code  # not `.get(key, code)`: with every STEP_code given, `code` may be absent

    def _options(self, step: str) -> dict[str, t.Any]:
        """The ``metadata.options`` of the CalcJobs of ``step`` (empty: the plugin's defaults)."""
        options = self.inputs.get(f'{step}_options')
        return options.get_dict() if options is not None else {}

    def run_reference_data(self):
        futures = {}
        for key in ('train_set', 'heldout_set'):
            builder = ReferenceDataWorkChain.get_builder()
            builder.code = self._code('reference')
            builder.set_name = self.inputs[key]
            builder.basis = self.inputs.basis
            if 'reference_options' in self.inputs:
                builder.options = self.inputs.reference_options
            builder.metadata.call_link_label = key.replace('_set', '_data')
            futures[key] = self.submit(builder)
        self.report('reference data: submitted training and held-out sets')
        return ToContext(train_data=futures['train_set'], heldout_data=futures['heldout_set'])

    def run_training(self):
        if not (self.ctx.train_data.is_finished_ok and self.ctx.heldout_data.is_finished_ok):
            return self.exit_codes.ERROR_REFERENCE_DATA
        self.out('train_dataset', self.ctx.train_data.outputs.dataset)
        self.out('heldout_dataset', self.ctx.heldout_data.outputs.dataset)
        builder = DM21TrainWorkChain.get_builder()
        builder.train.code = self._code('train')
        builder.train.datasets = {'train': self.ctx.train_data.outputs.dataset}
        builder.train.heldout = {'heldout': self.ctx.heldout_data.outputs.dataset}
        training = self.inputs.training.get_dict()
        scf_level = self.inputs.scf_parameters.get_dict().get('grid_level')
        if 'grid_level' not in training and scf_level is not None:  # one grid for training and SCF
            training['grid_level'] = scf_level
            builder.train.parameters = orm.Dict(training)
        else:
            builder.train.parameters = self.inputs.training
        if 'initial_checkpoint' in self.inputs:
            builder.train.initial_checkpoint = self.inputs.initial_checkpoint
        set_options(builder.train.metadata.options, self._options('train'))
        builder.metadata.call_link_label = 'train'
        node = self.submit(builder)
        self.report(f'training: {node.process_label}<{node.pk}>')
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
                builder = DM21ScfWorkChain.get_builder()
                builder.scf.code = self._code('scf')
                builder.scf.structure = structure_from_atom(item['atom'])
                params = {
                    'basis': self.inputs.basis.value,
                    'charge': int(item.get('charge', 0)),
                    'multiplicity': int(item.get('multiplicity', 1)),
                }
                params.update(self.inputs.scf_parameters.get_dict())
                builder.scf.parameters = orm.Dict(params)
                builder.scf.checkpoint = ckpt
                set_options(builder.scf.metadata.options, self._options('scf'))
                key = f'scf_{which}_' + link_label(item['label'])
                builder.metadata.call_link_label = key
                futures[key] = self.submit(builder)
        self.ctx.scf_keys = list(futures)
        return ToContext(**futures)

    def make_report(self):
        scf, failed = {}, []
        for key in self.ctx.scf_keys:
            node = self.ctx[key]
            if not node.is_finished_ok:
                failed.append(key)
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
        if failed:
            return self.exit_codes.ERROR_SCF.format(keys=', '.join(failed))
        return None
