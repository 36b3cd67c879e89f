"""Hyper-parameters of the training (:class:`TrainConfig`), checked without importing PyTorch.

The ``dm21.train`` CalcJob validates its ``parameters`` with :meth:`TrainConfig.from_dict` on the machine
that submits it, so this module imports nothing heavy (PyTorch only to check a CUDA device request).
"""

from __future__ import annotations

import dataclasses
import math
import re

__all__ = [
    'ERROR_FILE',
    'EXIT_INTERRUPTED',
    'FRACTIONAL_DELTAS',
    'KINDS',
    'LR_SCHEDULES',
    'ORBITAL_ENERGIES',
    'RANK_ERROR_PATTERN',
    'STOP_SIGNALS',
    'TrainConfig',
    'learning_rate_at',
    'rank_error_file',
]

ERROR_FILE = 'error.json'
#: The training runner's exit status when it stopped cleanly, state saved, to be resumed (walltime, stop signal).
EXIT_INTERRUPTED = 4
#: Signals that stop a training job cleanly (``training.train.main``): SIGTERM (Slurm at the time limit,
#: ``scancel``), SIGUSR1 (``#SBATCH --signal=USR1@...``), SIGXCPU (a CPU-time limit).
STOP_SIGNALS: tuple[str, ...] = ('SIGTERM', 'SIGUSR1', 'SIGXCPU')
#: What a process of a data-parallel run other than process 0 writes when it fails (``error_rank1.json``...):
#: the parser reads it, so that a crash of one process is not taken for the walltime its siblings' SIGTERM mimics.
RANK_ERROR_PATTERN = 'error_rank*.json'


def rank_error_file(rank: int) -> str:
    """The error file of process ``rank`` (0: :data:`ERROR_FILE`)."""
    return ERROR_FILE if rank == 0 else f'error_rank{rank}.json'


#: The kinds of training systems (``TrainingSystem.kind``) that ``kind_weights`` may weight.
KINDS: tuple[str, ...] = ('integer', 'fc', 'fs')

#: ``lr_schedule`` values: the learning rate after the linear warm-up.
LR_SCHEDULES: dict[str, str] = {
    'constant': 'learning_rate at every step after the warm-up',
    'cosine': 'learning_rate · ½ (1 + cos(π t / T)) from the end of the warm-up (t = 0) to the last step (t = T)',
}


#: ``regulariser_orbital_energies``: the orbital energies in the regulariser's denominator (training/loss.py).
ORBITAL_ENERGIES: dict[str, str] = {
    'model': "the diagonal of the model's own Fock matrix in the input orbitals (default)",
    'reference': "the input orbitals' energies from the reference method (e.g. UHF)",
}

#: The fractions δ of the self-consistent fractional-charge curve (``fractional_evaluation``).
FRACTIONAL_DELTAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

_SPECIES_KEYS = {'atom': str, 'basis': str, 'charge': int, 'spin': int, 'label': str}


def _check_species(entry, where: str, required: tuple[str, ...]) -> None:
    """A held-out species ``{atom, basis, charge, spin, label, ...}``: types only (no PySCF here)."""
    if not isinstance(entry, dict):
        raise ValueError(f'{where} must be a mapping with {", ".join(required)}, got {entry!r}')
    for key in required:
        if key not in entry:
            raise ValueError(f'{where} lacks `{key}`')
    for key, kind in _SPECIES_KEYS.items():
        if key not in entry:
            continue
        value = entry[key]
        ok = _is_int(value) if kind is int else isinstance(value, str) and bool(value.strip())
        if not ok:
            raise ValueError(
                f'{where}: `{key}` must be a{"n integer" if kind is int else " non-empty string"}, got {value!r}'
            )
    if entry.get('spin', 0) < 0:
        raise ValueError(f'{where}: `spin` (2S) must be >= 0, got {entry["spin"]!r}')


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class TrainConfig:
    """Training hyper-parameters; the defaults of the optimiser loop reproduce plain per-system Adam."""

    epochs: int = 20
    learning_rate: float = 1e-4
    regulariser_weight: float = 1.0  # λ
    eta: float = 1e-2  # Ha, regularisation of near-degenerate orbital pairs in ΔE
    grid_level: int = 3  # the SCF's level (aiida_dm21.KS, the scf protocols' "moderate"): one grid for both
    seed: int = 0
    save_every: int = 5  # epochs between resumable states
    epochs_per_job: int = 0  # > 0: stop cleanly (state saved) after this many epochs in one job, as at walltime
    device: str = 'cpu'
    name: str = 'trained'
    batch_size: int = 1  # systems per Adam step (their weighted losses are averaged)
    kind_weights: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 1.0))
    lr_schedule: str = 'constant'  # see LR_SCHEDULES
    warmup_epochs: int = 0  # linear warm-up of the learning rate over this many epochs' steps
    max_grad_norm: float = 0.0  # > 0: clip the gradient of each step to this 2-norm; 0: no clipping
    validation_fraction: float = 0.0  # share of the training systems held back to decide early stopping
    patience: int = 0  # > 0: stop after this many epochs without a lower validation loss (best weights kept)
    regulariser_orbital_energies: str = 'model'  # see ORBITAL_ENERGIES
    # μ of the reference-free exact conditions (training/constraints.py): + μ r² per FC/FS system whose integer
    # sources are among the systems; 0: off
    constraint_weight: float = 0.0
    # α of the anchor to the initial network (L2-SP): + α Σ_p (θ_p − θ⁰_p)² on every step, θ⁰ the weights the run
    # started from (the initial checkpoint), so that a fine-tune stays a correction of it; 0: off
    anchor_weight: float = 0.0
    # self-consistent evaluation of the initial and trained functional (off by default: SCFs cost minutes)
    scf_evaluation: list = dataclasses.field(default_factory=list)  # [{atom, basis, charge, spin, e_ref, label}]
    fractional_evaluation: dict | None = (
        None  # {atom, basis, charge, spin, spin_next, label}: E(N+δ), δ ∈ FRACTIONAL_DELTAS
    )

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The configuration of ``data`` (a ``parameters`` dictionary), or :class:`ValueError` saying what is wrong."""
        if not isinstance(data, dict):
            raise TypeError(f'the hyper-parameters must be a mapping, got {type(data).__name__}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f'unknown training hyper-parameters: {sorted(unknown)}; known: {sorted(known)}')
        values = dict(data)
        if 'kind_weights' in values and isinstance(values['kind_weights'], dict):
            values['kind_weights'] = {**dict.fromkeys(KINDS, 1.0), **values['kind_weights']}
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Refuse values no training can run with, naming the hyper-parameter and the allowed range."""
        ints = {
            'epochs': 0,
            'grid_level': 0,
            'seed': 0,
            'save_every': 1,
            'epochs_per_job': 0,
            'batch_size': 1,
            'warmup_epochs': 0,
            'patience': 0,
        }
        for key, low in ints.items():
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise ValueError(f'`{key}` must be an integer >= {low}, got {value!r}')
        if self.grid_level > 9:
            raise ValueError(f'`grid_level` must be a PySCF grid level 0-9, got {self.grid_level!r}')
        floats = {
            'learning_rate': (0.0, False),
            'regulariser_weight': (0.0, True),
            'constraint_weight': (0.0, True),
            'anchor_weight': (0.0, True),
            'eta': (0.0, False),
            'max_grad_norm': (0.0, True),
            'validation_fraction': (0.0, True),
        }
        for key, (low, inclusive) in floats.items():
            value = getattr(self, key)
            ok = _is_number(value) and math.isfinite(value) and (value >= low if inclusive else value > low)
            if not ok:
                bound = '>=' if inclusive else '>'
                raise ValueError(f'`{key}` must be a finite number {bound} {low:g}, got {value!r}')
        if self.validation_fraction >= 1.0:
            raise ValueError(
                f'`validation_fraction` must be < 1 (some systems must be left to train on), '
                f'got {self.validation_fraction!r}'
            )
        if self.patience > 0 and self.validation_fraction == 0.0:
            raise ValueError('`patience` (early stopping) needs a validation split: set `validation_fraction` > 0')
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f'`lr_schedule` must be one of {sorted(LR_SCHEDULES)}, got {self.lr_schedule!r}')
        weights = self.kind_weights
        if not isinstance(weights, dict):
            raise ValueError(f'`kind_weights` must map system kinds {list(KINDS)} to weights, got {weights!r}')
        unknown = set(weights) - set(KINDS)
        if unknown:
            raise ValueError(f'`kind_weights` names unknown kinds {sorted(unknown)}; kinds: {list(KINDS)}')
        for kind, value in weights.items():
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f'`kind_weights[{kind!r}]` must be a finite number >= 0, got {value!r}')
        if self.regulariser_orbital_energies not in ORBITAL_ENERGIES:
            raise ValueError(
                f'`regulariser_orbital_energies` must be one of {sorted(ORBITAL_ENERGIES)}, '
                f'got {self.regulariser_orbital_energies!r}'
            )
        self._check_evaluation()
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f'`name` must be a non-empty string, got {self.name!r}')
        # only the form here: whether the GPU exists is checked where the training runs (check_device), so that a
        # CPU-only login node can submit GPU training
        if not isinstance(self.device, str) or not re.fullmatch(r'cpu|cuda(:\d+)?', self.device):
            raise ValueError(f"`device` must be a device name ('cpu', 'cuda', 'cuda:N'), got {self.device!r}")

    def check_device(self) -> None:
        """Refuse a CUDA device this machine's PyTorch does not see (call where the training runs)."""
        if self.device.startswith('cuda'):
            import torch

            index = int(self.device.partition(':')[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ValueError(
                    f'device {self.device!r} was requested, but PyTorch on this machine sees no such CUDA GPU '
                    f'({torch.cuda.device_count()} visible): the training does not fall back to the CPU'
                )

    def _check_evaluation(self) -> None:
        if not isinstance(self.scf_evaluation, list):
            raise ValueError(f'`scf_evaluation` must be a list of species, got {self.scf_evaluation!r}')
        labels = set()
        for i, entry in enumerate(self.scf_evaluation):
            where = f'`scf_evaluation[{i}]`'
            _check_species(entry, where, ('atom', 'basis', 'e_ref'))
            unknown = set(entry) - {*_SPECIES_KEYS, 'e_ref'}
            if unknown:
                raise ValueError(
                    f'{where} has unknown keys {sorted(unknown)}; known: {sorted({*_SPECIES_KEYS, "e_ref"})}'
                )
            e_ref = entry['e_ref']
            if not (_is_number(e_ref) and math.isfinite(e_ref)):
                raise ValueError(f'{where}: `e_ref` must be a finite energy (Ha), got {e_ref!r}')
            label = entry.get('label') or entry['atom']
            if label in labels:
                raise ValueError(f'{where}: label {label!r} appears twice')
            labels.add(label)
        frac = self.fractional_evaluation
        if frac is None:
            return
        where = '`fractional_evaluation`'
        _check_species(frac, where, ('atom', 'basis'))
        unknown = set(frac) - {*_SPECIES_KEYS, 'spin_next'}
        if unknown:
            raise ValueError(
                f'{where} has unknown keys {sorted(unknown)}; known: {sorted({*_SPECIES_KEYS, "spin_next"})}'
            )
        if 'spin_next' in frac:
            spin_next = frac['spin_next']
            if not _is_int(spin_next) or spin_next < 0 or abs(spin_next - frac.get('spin', 0)) != 1:
                raise ValueError(
                    f'{where}: `spin_next` (2S of the N+1 system) must be an integer >= 0 differing from `spin` '
                    f'by 1, got {spin_next!r}'
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def learning_rate_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of the whole run (all epochs, all jobs).

    A linear warm-up over the steps of the first ``warmup_epochs`` epochs (lr · (step + 1) / warm-up steps),
    then ``lr_schedule`` (:data:`LR_SCHEDULES`) over the remaining steps.  A pure function of the step: a
    resumed run continues the schedule exactly.
    """
    lr = float(config.learning_rate)
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return lr * (step + 1) / warmup
    if config.lr_schedule == 'cosine':
        total = max(1, config.epochs * steps_per_epoch - warmup)
        t = min(step - warmup, total)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t / total))
    return lr
