"""``dm21.train``: train (or fine-tune) a DM21-architecture functional on datasets, on the compute node.

Runs ``python -m aiida_dm21.training.train config.json`` (no AiiDA there).  Every dataset is a linked
input (namespace ``datasets``; ``heldout`` for evaluation only), so the trained checkpoint's lineage
reaches the integer reference calculations.  The run saves a resumable ``state/`` every
``save_every`` epochs; a restart passes the previous ``remote_folder`` as ``parent_folder`` and the
training continues from the last saved epoch.  The prepared per-point data (:mod:`aiida_dm21.training.prepared`)
is computed once into ``prepared/`` of the working folder, and a restart links the parent's ``prepared/``
instead of recomputing it; ``prepared_folder`` names a folder on the computer shared by several trainings.

With ``scf_evaluation`` / ``fractional_evaluation`` in ``parameters`` the initial and trained functional are
also run self-consistently (:mod:`aiida_dm21.training.scf_eval`): held-out SCF energies and errors, and the
fractional-charge curve of a held-out atom, in ``metrics`` (``before.scf``, ``after.scf``), the curve's PNG
as ``fractional_plot``.
"""

from __future__ import annotations

import json
import typing as t

from aiida import orm
from aiida.common import datastructures
from aiida.engine import CalcJob

from aiida_dm21.data.checkpoint import DM21CheckpointData
from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.runner.common import INPUT_FORMAT_VERSION
from aiida_dm21.training.config import ERROR_FILE, RANK_ERROR_PATTERN, TrainConfig  # no PyTorch: validation stays light

__all__ = ('DM21TrainCalculation',)

CONFIG_FILE = 'config.json'
CHECKPOINT_FILE = 'checkpoint.safetensors'
INITIAL_FILE = 'initial.safetensors'
STATE_FOLDER = 'state'
PREPARED_FOLDER = 'prepared'
FRACTIONAL_PLOT = 'fractional_curve.png'


def validate_parameters(value: orm.Dict, _: t.Any = None) -> str | None:
    try:
        TrainConfig.from_dict(value.get_dict())
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def validate_num_processes(value: orm.Int, _: t.Any = None) -> str | None:
    """``num_processes`` is an integer >= 1."""
    if value.value < 1:
        return f'num_processes must be an integer >= 1, got {value.value}'
    return None


def validate_prepared_folder(value: orm.Str, _: t.Any = None) -> str | None:
    if not value.value.startswith('/'):
        return f'prepared_folder must be an absolute path on the computer, got {value.value!r}'
    return None


def validate_datasets(value: dict, _: t.Any = None) -> str | None:
    if not value:
        return 'at least one dataset is required in `datasets`'
    return None


class DM21TrainCalculation(CalcJob):
    """Training of a DM21-architecture functional (PyTorch, CPU or CUDA) on fixed-density datasets."""

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.input_namespace(
            'datasets',
            valid_type=DM21DatasetData,
            dynamic=True,
            validator=validate_datasets,
            help='Training datasets; every one becomes a linked input.',
        )
        spec.input_namespace(
            'heldout',
            valid_type=DM21DatasetData,
            dynamic=True,
            required=False,
            help='Datasets only evaluated (before and after training), never trained on.',
        )
        spec.input(
            'parameters',
            valid_type=orm.Dict,
            validator=validate_parameters,
            required=False,
            help=f'Hyper-parameters: {", ".join(TrainConfig.__dataclass_fields__)}.',
        )
        spec.input('seed', valid_type=orm.Int, required=False, help='Random seed (overrides parameters.seed).')
        spec.input(
            'num_processes',
            valid_type=orm.Int,
            required=False,
            validator=validate_num_processes,
            help='Data-parallel processes on the node (torch.distributed through `torchrun`: gloo on CPUs, NCCL with '
            'device cuda, one GPU per process); 1 (default): a plain single process.',
        )
        spec.input(
            'initial_checkpoint',
            valid_type=DM21CheckpointData,
            required=False,
            help='Start from these weights (fine-tuning); random initialisation otherwise.',
        )
        spec.input(
            'prepared_folder',
            valid_type=orm.Str,
            required=False,
            validator=validate_prepared_folder,
            help='Absolute path on the computer for the prepared training data, shared by trainings (systems '
            'already prepared there on the same grid are reused); default: prepared/ in the working folder.',
        )
        spec.input(
            'parent_folder',
            valid_type=orm.RemoteData,
            required=False,
            help='Remote folder of an interrupted run: training resumes from its saved state.',
        )
        options = spec.inputs['metadata']['options']
        options['resources'].default = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
        options['parser_name'].default = 'dm21.train'
        options['output_filename'].default = 'aiida.out'
        spec.output('checkpoint', valid_type=DM21CheckpointData, help='The trained functional (source "trained").')
        spec.output('loss_curves', valid_type=orm.ArrayData, help='epoch, loss, energy_loss, regulariser, wall_s.')
        spec.output(
            'metrics',
            valid_type=orm.Dict,
            help='Errors before/after training on train and held-out sets; package versions of the compute node.',
        )
        spec.output(
            'fractional_plot',
            valid_type=orm.SinglefileData,
            required=False,
            help='PNG of the fractional-charge curve of the initial and trained functional '
            '(with parameters.fractional_evaluation).',
        )
        spec.default_output_node = 'metrics'
        # No failed or interrupted training is reused from the cache (the scheduler's 110/120/140 already are not).
        failure = {'invalidates_cache': True}
        spec.exit_code(300, 'ERROR_MISSING_OUTPUT', message='The training wrote no {detail}.', **failure)
        spec.exit_code(301, 'ERROR_UNREADABLE_OUTPUT', message='An output file is unreadable: {detail}', **failure)
        spec.exit_code(
            310,
            'ERROR_OUT_OF_WALLTIME',
            message='The training stopped for the walltime after {epochs} epochs (state saved: restart with '
            'parent_folder to continue).',
            **failure,
        )
        spec.exit_code(350, 'ERROR_RUNNER_FAILED', message='The training failed ({category}): {detail}', **failure)
        spec.exit_code(410, 'ERROR_NON_FINITE_LOSS', message='The loss became NaN or infinite: {detail}', **failure)
        spec.exit_code(
            411, 'ERROR_NON_FINITE_VALUE', message='`{key}` is NaN or infinite: nothing was stored.', **failure
        )
        spec.exit_code(420, 'ERROR_UNSUPPORTED_INPUT', message='The training refused its input: {detail}', **failure)
        spec.exit_code(
            421,
            'ERROR_UNSUPPORTED_FORMAT_VERSION',
            message='The training on the compute machine refused the input format: {detail}',
            **failure,
        )

    def prepare_for_submission(self, folder) -> datastructures.CalcInfo:
        params = dict(self.inputs.parameters.get_dict()) if 'parameters' in self.inputs else {}
        if 'seed' in self.inputs:
            params['seed'] = int(self.inputs.seed.value)
        params.setdefault('device', 'cpu')
        local_copy = []
        names = []
        for kind in ('datasets', 'heldout'):
            entries = []
            for label, node in sorted((self.inputs.get(kind) or {}).items()):
                name = f'{kind}_{label}.npz'
                local_copy.append((node.uuid, node.filename, name))
                entries.append(name)
            names.append(entries)
        config = {
            'format_version': INPUT_FORMAT_VERSION,
            'hyperparameters': params,
            'datasets': names[0],
            'heldout': names[1],
            'walltime_seconds': self.metadata.options.get('max_wallclock_seconds'),
        }
        if 'initial_checkpoint' in self.inputs:
            node = self.inputs.initial_checkpoint
            local_copy.append((node.uuid, node.filename, INITIAL_FILE))
            config['initial_checkpoint'] = INITIAL_FILE
        if 'prepared_folder' in self.inputs:
            config['prepared_folder'] = self.inputs.prepared_folder.value
        with folder.open(CONFIG_FILE, 'w') as handle:
            json.dump(config, handle, indent=2)
        remote_copy, remote_symlink = [], []
        if 'parent_folder' in self.inputs:
            parent = self.inputs.parent_folder
            remote_copy.append((parent.computer.uuid, f'{parent.get_remote_path()}/{STATE_FOLDER}', STATE_FOLDER))
            if 'prepared_folder' not in self.inputs:  # the parent's prepared data, reused (not copied)
                source = f'{parent.get_remote_path()}/{PREPARED_FOLDER}'
                remote_symlink.append((parent.computer.uuid, source, PREPARED_FOLDER))
        codeinfo = datastructures.CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        processes = self.inputs.num_processes.value if 'num_processes' in self.inputs else 1
        launch = ['-m', 'aiida_dm21.training.train', CONFIG_FILE]
        if processes > 1:  # torchrun starts the processes and sets RANK, WORLD_SIZE, MASTER_ADDR/PORT for each
            launch = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}', *launch]
        codeinfo.cmdline_params = launch
        codeinfo.stdout_name = self.metadata.options.output_filename
        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.local_copy_list = local_copy
        calcinfo.remote_copy_list = remote_copy
        calcinfo.remote_symlink_list = remote_symlink
        calcinfo.retrieve_list = [
            CHECKPOINT_FILE,
            'history.npz',
            'metrics.json',
            FRACTIONAL_PLOT,
            'interrupted.json',
            ERROR_FILE,
            RANK_ERROR_PATTERN,
            self.metadata.options.output_filename,
        ]
        return calcinfo
