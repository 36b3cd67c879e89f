"""The training loop (no AiiDA): mini-batch Adam on (E_xc − target)² + λ ΔE², deterministic with a seed, resumable.

    python -m aiida_dm21.training.train config.json      # what the dm21.train CalcJob runs

``config.json`` holds ``format_version`` (must be :data:`~aiida_dm21.runner.common.INPUT_FORMAT_VERSION`),
the dataset files, the initial checkpoint (optional), the hyper-parameters (:class:`~.config.TrainConfig`)
and optionally ``prepared_folder`` (prepared data, :mod:`.prepared`; default ``prepared/`` in the working
folder, computed there once and reused by every later epoch and resumed job); the run writes
``checkpoint.safetensors``, ``history.npz``, with a ``fractional_evaluation`` ``fractional_curve.png``
and, last, ``metrics.json`` (with the package ``versions`` and the ``threads`` record)
and, every ``save_every`` epochs, a resumable ``state/`` (weights, Adam moments, epoch, step, RNG state,
best validation weights, history).  Stopped early for the walltime it writes ``interrupted.json`` instead: when
another epoch would not fit in the job's time, or when a stop signal arrives (:data:`STOP_SIGNALS`: Slurm's SIGTERM
at the time limit, a KillWait before its SIGKILL).  A signal ends the job where it is, without saving the epoch it
cut (``interrupted.json`` then has ``signal`` and, as ``epochs_done``, the epoch of the state saved before); a
signal while the state is written waits until it is whole.
Any failure ends in ``error.json``: ``{"format_version", "versions", "threads", "error": {"category", "message",
"type", "rank", "time"}}``
with a category of :data:`ERROR_CATEGORIES` (a NaN loss is ``non_finite_loss``), never in a bare traceback; in a
data-parallel run process *k* > 0 writes ``error_rank<k>.json`` (:func:`~.config.rank_error_file`).

Threads: PyTorch, numba and PySCF get what the scheduler granted (``SLURM_CPUS_PER_TASK``, ``PBS_NUM_PPN``,
``NCPUS``, then ``OMP_NUM_THREADS``; :func:`~aiida_dm21.runner.common.apply_thread_count`), set before anything
else and shared out between ``torchrun``'s processes on the node (``LOCAL_WORLD_SIZE``); a count that is not a
positive integer is refused as ``unsupported_input``.

Exit status: 0 trained, 4 interrupted (state saved), 3 non-finite loss, 2 bad input or input format, 1 other.

One optimiser step: the systems of a mini-batch (``batch_size``, in an order drawn from the seeded RNG every
epoch) each contribute kind_weight · loss / batch_size; each system's backward pass runs on its own, so
memory holds one system at a time.  With a ``constraint_weight`` μ > 0 each FC/FS system whose integer sources
are among the systems adds μ r² / batch_size, r its exact condition's residual (:mod:`.constraints`): the
sources' energies are evaluated without a graph first, and their share of the gradient (−2μ r c_j / batch_size
per source j) is applied by one more backward pass per source after the batch's systems.  Then the gradient is
clipped to ``max_grad_norm`` (if > 0), the learning rate set by :func:`~.config.learning_rate_at`, and Adam
steps.  With a ``validation_fraction`` a seeded share of the systems is held back; after every epoch its loss
decides the best weights (those are returned) and, with ``patience``, early stopping.

Data parallel: when :mod:`torch.distributed` is initialised (``torchrun``, or ``init_process_group`` with
gloo on CPUs / NCCL on GPUs) every process takes every ``world_size``-th system of each mini-batch, the
gradients are summed over the processes (all-reduce) before clipping and the step, and every process
steps the same weights; process 0 prepares the data (the others wait for it) and writes the state.  The
loss curve is the single process's to rounding (``tests/test_distributed.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..functional.checkpoint import load_network, save_checkpoint
from ..functional.model import DM21Config, DM21Network
from ..reference.dataset import load_dataset
from ..reference.fractional import TrainingSystem
from ..runner.common import (
    ThreadCountError,
    apply_thread_count,
    check_format_version,
    package_versions,
    thread_summary,
    write_json,
)
from .config import EXIT_INTERRUPTED, STOP_SIGNALS, TrainConfig, learning_rate_at, rank_error_file
from .constraints import Condition, constraint_table
from .loss import self_consistency_delta
from .prepared import PreparedData, PreparedDataError, compact_energy, evaluate_fast, prepare_dataset
from .scf_eval import check_molecules, evaluate_scf, plot_curves

__all__ = [
    'ERROR_CATEGORIES',
    'NonFiniteLossError',
    'TrainConfig',
    'TrainResult',
    'evaluate',
    'main',
    'split_validation',
    'train',
]

HA_TO_MHA = 1000.0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3
STATE_FOLDER = 'state'
PREPARED_FOLDER = 'prepared'
FRACTIONAL_PLOT = 'fractional_curve.png'  # the FC curves of the initial and trained functional (fractional_evaluation)

# the per-system energy used by the loop (a module attribute: the tests make it blow up)
system_energy = compact_energy

#: Error categories written to ``error.json["error"]["category"]``.
ERROR_CATEGORIES: dict[str, str] = {
    'unsupported_input': 'config.json, a hyper-parameter, a dataset, the initial checkpoint or the thread count '
    'of the job environment cannot be used',
    'unsupported_format': 'config.json has a format_version this aiida-dm21 does not read',
    'non_finite_loss': 'the loss of a training system became NaN or infinite',
    'internal_error': 'an unexpected error in the training',
}


class NonFiniteLossError(FloatingPointError):
    """The loss of ``label`` became NaN or infinite in ``epoch`` (0-based); the training cannot continue."""

    def __init__(self, label: str, epoch: int, loss: float) -> None:
        super().__init__(f'non-finite loss ({loss}) on {label} at epoch {epoch + 1}')
        self.label, self.epoch, self.loss = label, epoch, loss


class _InputError(Exception):
    """A refused ``config.json`` (category ``unsupported_input`` or ``unsupported_format``)."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category


class JobInterrupted(BaseException):
    """A stop signal arrived.  A ``BaseException``, as ``KeyboardInterrupt``: no ``except Exception`` on the way
    (a failed SCF evaluation, say) takes it for a failure."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f'received signal {signal_name}')
        self.signal_name = signal_name


#: ``armed``: a stop signal raises :class:`JobInterrupted` (set by :func:`main` only); ``pending``: one that came
#: while not armed (while the state was written), raised once that is done.
_stop: dict[str, Any] = {'armed': False, 'pending': None}


def _on_stop_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _stop['armed']:
        raise JobInterrupted(name)
    _stop['pending'] = name


@contextlib.contextmanager
def _uninterrupted():
    """Hold stop signals back while the body runs (a state half written would resume wrongly); one that came
    meanwhile is raised when the body is done."""
    armed = _stop['armed']
    _stop['armed'] = False
    try:
        yield
    finally:
        _stop['armed'] = armed
    if armed and _stop['pending']:
        name, _stop['pending'] = _stop['pending'], None
        raise JobInterrupted(name)


def _saved_epoch(state_dir: Path) -> int:
    """The epoch of the state saved in ``state_dir`` (0: none)."""
    try:
        return int(json.loads(_state_paths(state_dir)[1].read_text())['epoch'])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@dataclasses.dataclass
class TrainResult:
    network: DM21Network
    history: dict[str, np.ndarray]
    metrics: dict
    interrupted: bool = False  # stopped early (walltime / epochs_per_job); the state is saved, resume later
    grid: dict = dataclasses.field(default_factory=dict)  # the training grid (prepared.grid_spec)


def evaluate(
    network: DM21Network,
    data: PreparedData,
    indices: Sequence[int],
    with_regulariser: bool = True,
    device='cpu',
    config: TrainConfig | None = None,
    constraints: Mapping[int, Condition] | None = None,
) -> dict:
    """Errors of E_xc (mHa) per system kind, and the mean |ΔE| (mHa), over systems ``indices`` of ``data``.

    ΔE with ``config``'s ``eta`` and ``regulariser_orbital_energies`` (the defaults without a ``config``).
    With ``constraints`` (:func:`~.constraints.constraint_table`) also the mean |r| of the exact conditions
    (mHa; ``mae_constraint_fc_mha``, ``mae_constraint_fs_mha``) over the FC/FS systems of ``indices`` there.
    """
    config = config or TrainConfig()
    errors: dict[str, list[float]] = {}
    deltas = []
    error_of: dict[int, float] = {}
    for i in indices:
        cs = data.load(i, device, with_regulariser)
        energy, v = evaluate_fast(network, cs, with_potential=with_regulariser)
        error_of[i] = energy - cs.target
        errors.setdefault(cs.kind, []).append(error_of[i] * HA_TO_MHA)
        if with_regulariser:
            delta = self_consistency_delta(cs, v, config.eta, config.regulariser_orbital_energies)
            deltas.append(abs(float(delta)) * HA_TO_MHA)
    out = {f'mae_{kind}_mha': float(np.mean(np.abs(v))) for kind, v in errors.items()}
    residuals: dict[str, list[float]] = {}
    for i, r in _residuals(network, data, indices, constraints, error_of, device).items():
        residuals.setdefault(data.systems[i]['kind'], []).append(abs(r) * HA_TO_MHA)
    for kind, values in residuals.items():
        out[f'mae_constraint_{kind}_mha'] = float(np.mean(values))
    every = np.abs(np.concatenate([np.asarray(v) for v in errors.values()]))
    out['mae_all_mha'] = float(np.mean(every))
    out['max_abs_error_mha'] = float(np.max(every))
    if deltas:
        out['mean_abs_delta_e_mha'] = float(np.mean(deltas))
    return out


def _error(network, data: PreparedData, j: int, device, cache: dict[int, float]) -> float:
    """E_xc − target (Ha) of system ``j``, without a graph; kept in ``cache``."""
    if j not in cache:
        cs = data.load(j, device, False)
        cache[j] = evaluate_fast(network, cs, with_potential=False)[0] - cs.target
    return cache[j]


def _residuals(network, data: PreparedData, indices, constraints, errors: dict[int, float], device) -> dict[int, float]:
    """r (Ha) of the systems of ``indices`` that have a condition; ``errors`` holds theirs, sources are added."""
    return {
        i: constraints[i].residual(errors[i], lambda j: _error(network, data, j, device, errors))
        for i in indices
        if constraints and i in constraints
    }


def _distance(network, reference: list) -> float:
    """‖θ − θ⁰‖₂ over all the network's parameters: how far training moved it from where it started."""
    with torch.no_grad():
        squares = [((p - p0) ** 2).sum() for p, p0 in zip(network.parameters(), reference, strict=True)]
        return math.sqrt(float(torch.stack(squares).sum()))


def _validation_loss(
    network, data: PreparedData, indices, config: TrainConfig, want_reg: bool, device, constraints=None
) -> float:
    """The training objective (kind-weighted mean of (E − target)² + λ ΔE² + μ r²) over ``indices``, no graph."""
    total = 0.0
    errors: dict[int, float] = {}
    for i in indices:
        cs = data.load(i, device, want_reg)
        energy, v = evaluate_fast(network, cs, with_potential=want_reg)
        errors[i] = energy - cs.target
        loss = errors[i] ** 2
        if want_reg:
            delta = self_consistency_delta(cs, v, config.eta, config.regulariser_orbital_energies)
            loss += config.regulariser_weight * float(delta) ** 2
        total += config.kind_weights.get(cs.kind, 1.0) * loss
    if config.constraint_weight > 0:
        residuals = _residuals(network, data, indices, constraints, errors, device)
        total += config.constraint_weight * sum(r**2 for r in residuals.values())
    return total / len(indices)


def split_validation(n: int, config: TrainConfig) -> tuple[list[int], list[int]]:
    """(training, validation) indices of ``n`` systems: a seeded share ``validation_fraction`` held back."""
    if config.validation_fraction <= 0.0:
        return list(range(n)), []
    n_val = max(1, round(config.validation_fraction * n))
    if n_val >= n:
        raise ValueError(
            f'validation_fraction {config.validation_fraction} of {n} systems leaves none to train on '
            f'({n_val} held back)'
        )
    order = np.random.default_rng([config.seed, 1]).permutation(n)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


def _distributed() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_sum(values: list[float], world: int) -> list[float]:
    """``values`` summed over the processes (unchanged in a single process)."""
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _state_paths(state_dir: Path) -> tuple[Path, Path]:
    return state_dir / 'state.safetensors', state_dir / 'state.json'


def _save_state(state_dir: Path, network, optimizer, rng, progress: dict, best_weights: dict | None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f'net.{k}': v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    if best_weights is not None:
        tensors.update({f'best.{k}': v.detach().cpu().contiguous() for k, v in best_weights.items()})
    opt = optimizer.state_dict()
    steps = {}
    for pid, state in opt['state'].items():
        for key, value in state.items():
            if key == 'step':
                steps[str(pid)] = float(value)
            else:
                tensors[f'opt.{pid}.{key}'] = value.detach().cpu().contiguous()
    tensors_path, json_path = _state_paths(state_dir)
    tmp = tensors_path.with_suffix('.tmp')
    save_file(tensors, str(tmp))
    tmp.replace(tensors_path)
    payload = {**progress, 'steps': steps, 'rng': rng.bit_generator.state}
    tmp_json = json_path.with_suffix('.tmp')
    tmp_json.write_text(json.dumps(payload))
    tmp_json.replace(json_path)


def _load_state(state_dir: Path, network, optimizer, rng) -> tuple[dict, dict | None] | None:
    tensors_path, json_path = _state_paths(state_dir)
    if not (tensors_path.is_file() and json_path.is_file()):
        return None
    tensors = load_file(str(tensors_path))
    payload = json.loads(json_path.read_text())
    network.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith('net.')})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith('best.')} or None
    opt = optimizer.state_dict()
    for pid in list(payload['steps']):
        state = {'step': torch.tensor(payload['steps'][pid])}
        for key in ('exp_avg', 'exp_avg_sq'):
            state[key] = tensors[f'opt.{pid}.{key}']
        opt['state'][int(pid)] = state
    optimizer.load_state_dict(opt)
    rng.bit_generator.state = payload['rng']
    return payload, best


def train(
    systems: Sequence[TrainingSystem],
    config: TrainConfig,
    initial: DM21Network | None = None,
    heldout: Sequence[TrainingSystem] = (),
    state_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    walltime_seconds: float | None = None,
    prepared_dir: str | Path | None = None,
) -> TrainResult:
    """Train (or fine-tune ``initial``) on ``systems``; metrics before/after on ``systems`` and ``heldout``.

    The systems are prepared into ``prepared_dir`` (:func:`~.prepared.prepare_dataset`; systems already
    there are reused; None: a temporary folder) and read back one at a time, so memory does not grow with
    their number.  With ``walltime_seconds`` (and a ``state_dir``) training stops cleanly, state saved,
    when another epoch would probably not fit in 90 % of it; so does ``config.epochs_per_job``.
    ``interrupted`` is then True.
    """
    if not systems:
        raise ValueError('no training systems')
    config.check()
    config.check_device()
    if prepared_dir is None:
        if _distributed()[1] > 1:
            raise ValueError('data-parallel training needs a prepared_dir that every process can read')
        with tempfile.TemporaryDirectory(prefix='dm21-prepared-') as tmp:
            return train(systems, config, initial, heldout, state_dir, progress, walltime_seconds, tmp)
    train_idx, val_idx = split_validation(len(systems), config)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    network = DM21Network(initial.config if initial is not None else DM21Config())
    if initial is not None:
        network.load_state_dict(initial.state_dict())
    network = network.to(device=device, dtype=torch.float32).train()
    network.requires_grad_(True)
    # θ⁰ of the anchor and of `weight_change`: the weights before any step (a resumed run rebuilds the same ones)
    initial_weights = [param.detach().clone() for param in network.parameters()]
    say = progress or (lambda message: None)
    start = time.perf_counter()
    want_reg = config.regulariser_weight > 0
    say(
        f'preparing {len(train_idx)} training, {len(val_idx)} validation and {len(heldout)} held-out systems '
        f'(grid level {config.grid_level})'
    )
    rank, world = _distributed()
    if rank == 0:
        data = prepare_dataset(
            [*systems, *heldout], prepared_dir, config.grid_level, network.config.omegas, want_reg, progress=say
        )
    if world > 1:
        torch.distributed.barrier()  # process 0 has prepared (or found) every system
        if rank > 0:
            data = PreparedData(prepared_dir)
    heldout_idx = list(range(len(systems), len(systems) + len(heldout)))
    constraints, left_out = constraint_table([*systems, *heldout])
    use_constraints = config.constraint_weight > 0
    if use_constraints:
        n_train = sum(i in constraints for i in train_idx)
        say(
            f'exact conditions (constraint_weight {config.constraint_weight:g}): {n_train} FC/FS training systems '
            f'with their integer sources; {len(left_out)} FC/FS systems without them (no condition)'
        )
    n_points = sum(data.n_points(i) for i in train_idx)
    say(f'{n_points} grid points in the training set, ready in {time.perf_counter() - start:.1f} s')
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    history: dict[str, list] = {
        'epoch': [],
        'loss': [],
        'energy_loss': [],
        'regulariser': [],
        'learning_rate': [],
        'grad_norm': [],
        'wall_s': [],
    }
    if val_idx:
        history['validation_loss'] = []
    if use_constraints:
        history['constraint'] = []
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    progress_state = {'epoch': 0, 'global_step': 0, 'stopped_early': False, 'best': None, 'bad_epochs': 0}
    metrics: dict = {}
    best_weights = None
    state_dir = Path(state_dir) if state_dir else None
    loaded = _load_state(state_dir, network, optimizer, rng) if state_dir is not None else None
    if loaded is not None:
        payload, best_weights = loaded
        history, metrics = payload['history'], payload.get('metrics', {})
        progress_state.update({k: payload[k] for k in progress_state if k in payload})
        say(f'resumed from {state_dir} at epoch {progress_state["epoch"]}')
    first_epoch = progress_state['epoch']
    if 'before' not in metrics:  # errors of the initial model, kept across restarts
        metrics['before'] = {'train': evaluate(network, data, train_idx, want_reg, device, config, constraints)}
        if val_idx:
            metrics['before']['validation'] = evaluate(network, data, val_idx, want_reg, device, config, constraints)
        if heldout_idx:
            metrics['before']['heldout'] = evaluate(network, data, heldout_idx, want_reg, device, config, constraints)
        scf = evaluate_scf(network, config, say) if rank == 0 else {}  # process 0 writes the metrics
        if scf:
            metrics['before']['scf'] = scf
    if val_idx and progress_state['best'] is None:  # the initial model is the first candidate
        loss = _validation_loss(network, data, val_idx, config, want_reg, device, constraints)
        progress_state['best'] = {'loss': loss, 'epoch': first_epoch}
        best_weights = {k: v.detach().clone() for k, v in network.state_dict().items()}

    def save() -> None:
        if rank > 0:
            return
        payload = {**progress_state, 'history': history, 'metrics': metrics}
        with _uninterrupted():
            _save_state(state_dir, network, optimizer, rng, payload, best_weights)

    interrupted = False
    for epoch in range(first_epoch, config.epochs):
        if progress_state['stopped_early']:
            break
        done_here = epoch - first_epoch
        slowest = max(history['wall_s'], default=0.0)
        out_of_time = walltime_seconds is not None and (
            time.perf_counter() - start + 1.5 * slowest > 0.9 * walltime_seconds
        )
        stop_job = (
            state_dir is not None
            and done_here > 0
            and (out_of_time or (config.epochs_per_job > 0 and done_here >= config.epochs_per_job))
        )
        if _all_sum([float(stop_job)], world)[0] > 0:  # every process stops when one runs out of time
            save()
            say(f'stopping after epoch {epoch} to stay within the job (state saved in {state_dir})')
            interrupted = True
            break
        t_epoch = time.perf_counter()
        order = [train_idx[i] for i in rng.permutation(len(train_idx))]
        sums = {'loss': 0.0, 'energy_loss': 0.0, 'regulariser': 0.0, 'constraint': 0.0, 'grad_norm': 0.0}
        lr = config.learning_rate
        for first in range(0, len(order), config.batch_size):
            batch = order[first : first + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            bad = None
            mine = batch[rank::world]
            # exact conditions: the sources' errors first, without a graph; their share of the gradient after
            source_error: dict[int, float] = {}
            source_grad: dict[int, float] = {}  # ∂(μ Σ r²)/∂err_j, applied to err_j's graph after the systems
            if use_constraints:
                for index in mine:
                    for j, _ in constraints[index].terms if index in constraints else ():
                        _error(network, data, j, device, source_error)
            for index in mine:
                cs = data.load(index, device, want_reg)
                energy, v_xc = system_energy(network, cs, with_potential=want_reg)
                energy_loss = (energy - cs.target) ** 2
                if want_reg:
                    delta = self_consistency_delta(cs, v_xc, config.eta, config.regulariser_orbital_energies)
                    regulariser = delta**2
                else:
                    regulariser = energy.new_zeros(())
                weight = config.kind_weights.get(cs.kind, 1.0) / len(batch)
                loss = energy_loss + config.regulariser_weight * regulariser
                objective = loss * weight if weight != 1.0 else loss
                constraint = energy.new_zeros(())
                if use_constraints and index in constraints:
                    r = constraints[index].residual(energy - cs.target, source_error.__getitem__)
                    constraint = r**2
                    objective = objective + config.constraint_weight / len(batch) * constraint
                    for j, c in constraints[index].terms:
                        share = -2.0 * config.constraint_weight / len(batch) * float(r.detach()) * c
                        source_grad[j] = source_grad.get(j, 0.0) + share
                if not torch.isfinite(objective):
                    bad = NonFiniteLossError(cs.label, epoch, float(objective.detach()))
                    break
                objective.backward()
                sums['loss'] += float(loss.detach()) + config.constraint_weight * float(constraint.detach())
                sums['energy_loss'] += float(energy_loss.detach())
                sums['regulariser'] += float(regulariser.detach())
                sums['constraint'] += float(constraint.detach())
                del cs, energy, v_xc, loss, objective
            for j, share in source_grad.items() if bad is None else ():
                cs = data.load(j, device, False)
                energy, _ = system_energy(network, cs, with_potential=False)
                (share * energy).backward()
                del cs, energy
            if world > 1:  # sum the gradients (and agree on a non-finite loss) over the processes
                if _all_sum([float(bad is not None)], world)[0] > 0:
                    raise bad or NonFiniteLossError('a system of another process', epoch, float('nan'))
                for param in network.parameters():
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    torch.distributed.all_reduce(param.grad)
            elif bad is not None:
                raise bad
            if config.anchor_weight > 0:  # + α Σ (θ − θ⁰)², the same on every process (after the all-reduce)
                with torch.no_grad():
                    for param, start_value in zip(network.parameters(), initial_weights, strict=True):
                        share = 2.0 * config.anchor_weight * (param - start_value)
                        param.grad = share if param.grad is None else param.grad.add_(share)
            clip = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(), clip)
            sums['grad_norm'] += float(norm)
            lr = learning_rate_at(config, progress_state['global_step'], steps_per_epoch)
            for group in optimizer.param_groups:
                group['lr'] = lr
            optimizer.step()
            progress_state['global_step'] += 1
        history['epoch'].append(epoch + 1)
        keys = ('loss', 'energy_loss', 'regulariser', *(('constraint',) if use_constraints else ()))
        sums.update(zip(keys, _all_sum([sums[k] for k in keys], world), strict=True))
        for key in keys:
            history[key].append(sums[key] / len(train_idx))
        history['grad_norm'].append(sums['grad_norm'] / steps_per_epoch)
        history.setdefault('weight_change', []).append(_distance(network, initial_weights))
        history['learning_rate'].append(lr)
        note = ''
        if val_idx:
            val = _validation_loss(network, data, val_idx, config, want_reg, device, constraints)
            history['validation_loss'].append(val)
            if val < progress_state['best']['loss']:
                progress_state['best'] = {'loss': val, 'epoch': epoch + 1}
                progress_state['bad_epochs'] = 0
                best_weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
            else:
                progress_state['bad_epochs'] += 1
            note = f', validation loss {val:.3e}'
            if config.patience > 0 and progress_state['bad_epochs'] >= config.patience:
                progress_state['stopped_early'] = True
                note += f' (no improvement for {config.patience} epochs: stopping)'
        history['wall_s'].append(time.perf_counter() - t_epoch)
        progress_state['epoch'] = epoch + 1
        say(
            f'epoch {epoch + 1}/{config.epochs}: loss {history["loss"][-1]:.3e} '
            f'(RMS E_xc error {math.sqrt(history["energy_loss"][-1]) * HA_TO_MHA:.2f} mHa, '
            f'regulariser {history["regulariser"][-1]:.2e}), lr {lr:.2e}{note}, {history["wall_s"][-1]:.1f} s'
        )
        last = epoch + 1 == config.epochs or progress_state['stopped_early']
        if state_dir is not None and ((epoch + 1) % config.save_every == 0 or last):
            save()
    network.eval()
    arrays = {k: np.asarray(v, dtype=float) for k, v in history.items()}
    if interrupted:
        return TrainResult(network=network.cpu(), history=arrays, metrics=metrics, interrupted=True, grid=data.grid)
    if best_weights is not None:  # the weights of the lowest validation loss
        network.load_state_dict(best_weights)
        metrics['best_epoch'] = progress_state['best']['epoch']
        metrics['best_validation_loss'] = progress_state['best']['loss']
        if progress_state['stopped_early']:
            metrics['stopped_early_at_epoch'] = progress_state['epoch']
    metrics['after'] = {'train': evaluate(network, data, train_idx, want_reg, device, config, constraints)}
    if val_idx:
        metrics['after']['validation'] = evaluate(network, data, val_idx, want_reg, device, config, constraints)
    if heldout_idx:
        metrics['after']['heldout'] = evaluate(network, data, heldout_idx, want_reg, device, config, constraints)
    scf = evaluate_scf(network, config, say) if rank == 0 else {}
    if scf:
        metrics['after']['scf'] = scf
    metrics['weight_change'] = _distance(network, initial_weights)
    metrics['n_train_systems'] = len(train_idx)
    metrics['n_validation_systems'] = len(val_idx)
    metrics['n_heldout_systems'] = len(heldout_idx)
    metrics['n_grid_points'] = n_points
    metrics['grid'] = data.grid
    metrics['prepared_content_sha256'] = data.index['content_sha256']
    metrics['wall_s'] = time.perf_counter() - start
    return TrainResult(network=network.cpu(), history=arrays, metrics=metrics, grid=data.grid)


def _read_config(config_path: Path) -> tuple[dict, TrainConfig]:
    """``config.json`` and its hyper-parameters, or an :class:`_InputError` saying why not."""
    try:
        spec = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise _InputError('unsupported_input', f'{config_path.name} is unreadable: {exc}') from exc
    if not isinstance(spec, dict):
        raise _InputError('unsupported_input', f'{config_path.name} must hold a JSON object')
    problem = check_format_version(spec, config_path.name)
    if problem:
        raise _InputError('unsupported_format', problem)
    try:
        config = TrainConfig.from_dict(spec.get('hyperparameters', {}))
        config.check_device()  # here, on the machine that trains, not where the job was submitted
    except (TypeError, ValueError) as exc:
        raise _InputError('unsupported_input', f'hyper-parameters: {exc}') from exc
    try:
        check_molecules(config)
    except ValueError as exc:
        raise _InputError('unsupported_input', f'scf/fractional evaluation: {exc}') from exc
    if not isinstance(spec.get('datasets'), list) or not spec['datasets']:
        raise _InputError('unsupported_input', f'{config_path.name} names no training dataset')
    return spec, config


def _load_inputs(spec: dict, workdir: Path) -> tuple[list, list, DM21Network | None]:
    from ..functional.checkpoint import CheckpointError
    from ..reference.dataset import DatasetError

    systems, heldout = [], []
    try:
        for name in spec['datasets']:
            systems.extend(load_dataset(workdir / name)[0])
        for name in spec.get('heldout', []):
            heldout.extend(load_dataset(workdir / name)[0])
    except DatasetError as exc:
        raise _InputError('unsupported_input', str(exc)) from exc
    initial = None
    if spec.get('initial_checkpoint'):
        try:
            initial = load_network(workdir / spec['initial_checkpoint'])[0]
        except (CheckpointError, OSError) as exc:
            raise _InputError('unsupported_input', f'initial checkpoint: {exc}') from exc
    return systems, heldout, initial


def _prepared_folder(spec: dict, workdir: Path) -> Path:
    """``config.json``'s ``prepared_folder`` (relative to the working folder, or absolute), or ``prepared/``."""
    name = spec.get('prepared_folder') or PREPARED_FOLDER
    if not isinstance(name, str):
        raise _InputError('unsupported_input', f'prepared_folder must be a path, got {name!r}')
    return workdir / name


def _init_distributed(config: TrainConfig) -> TrainConfig:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); each process's config.

    gloo on CPUs, NCCL on GPUs with one GPU per process (``cuda`` becomes ``cuda:<LOCAL_RANK>``).
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1 or torch.distributed.is_initialized():
        return config
    if config.device.startswith('cuda'):
        config = dataclasses.replace(config, device=f'cuda:{int(os.environ.get("LOCAL_RANK", "0"))}')
        config.check_device()
    torch.distributed.init_process_group('nccl' if config.device.startswith('cuda') else 'gloo')
    return config


def _train_job(config_path: Path, workdir: Path, versions: dict[str, str], threads: dict[str, Any]) -> int:
    spec, config = _read_config(config_path)
    config = _init_distributed(config)
    systems, heldout, initial = _load_inputs(spec, workdir)
    rank = _distributed()[0]

    def say(message: str) -> None:
        print(message, flush=True)

    result = train(
        systems,
        config,
        initial,
        heldout,
        state_dir=workdir / STATE_FOLDER,
        progress=say,
        walltime_seconds=spec.get('walltime_seconds'),
        prepared_dir=_prepared_folder(spec, workdir),
    )
    _stop['armed'] = False  # trained: the outputs are written whole (the state of the last epoch is saved)
    if rank > 0:  # process 0 writes the results
        return EXIT_INTERRUPTED if result.interrupted else 0
    if result.interrupted:
        done = {'epochs_done': len(result.history['epoch']), 'versions': versions, 'threads': threads}
        write_json(workdir / 'interrupted.json', done)
        return EXIT_INTERRUPTED
    training = {'hyperparameters': dataclasses.asdict(config), 'grid': result.grid}
    meta = {'name': config.name, 'source': 'trained', 'training': training}
    save_checkpoint(workdir / 'checkpoint.safetensors', result.network, meta)
    curves = {
        label: result.metrics.get(which, {}).get('scf', {}).get('fractional_charge')
        for label, which in (('initial', 'before'), ('trained', 'after'))
    }
    if any(curves.values()):
        if importlib.util.find_spec('matplotlib') is None:  # the `plot` extra: the numbers are in metrics.json anyway
            print(
                'aiida-dm21 train: the fractional-charge plot is not drawn: matplotlib is not installed on this node '
                '(pip install "aiida-dm21[plot]"); the curve is in metrics.json',
                file=sys.stderr,
            )
        else:
            plot_curves(curves, workdir / FRACTIONAL_PLOT)
    tmp = workdir / 'history.npz.tmp'
    with tmp.open('wb') as handle:
        np.savez(handle, **result.history)
    tmp.replace(workdir / 'history.npz')
    # last: the others are complete
    write_json(workdir / 'metrics.json', {**result.metrics, 'versions': versions, 'threads': threads})
    return 0


def _local_processes() -> int:
    """How many training processes share this node: ``torchrun``'s ``LOCAL_WORLD_SIZE``, else 1."""
    text = os.environ.get('LOCAL_WORLD_SIZE', '1').strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) >= 1 else 1


def _catch_stop_signals() -> dict[int, Any]:
    """Make :data:`STOP_SIGNALS` raise :class:`JobInterrupted`; the handlers they had.  Nothing outside the main
    thread (where Python cannot set handlers)."""
    previous: dict[int, Any] = {}
    _stop.update(armed=False, pending=None)
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is None:
            continue
        try:
            previous[number] = signal.signal(number, _on_stop_signal)
        except ValueError:  # not the main thread
            break
    _stop['armed'] = bool(previous)
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    _stop.update(armed=False, pending=None)
    for number, handler in previous.items():
        signal.signal(number, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Compute-node entry point: ``python -m aiida_dm21.training.train config.json`` in the working folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = Path(argv[0] if argv else 'config.json')
    workdir = config_path.parent
    # A restart copies the parent's state/ folder: it must exist even when the job is killed before the first save.
    (workdir / STATE_FOLDER).mkdir(exist_ok=True)
    # A restart links the parent's prepared/ folder (the data is reused, not recomputed): it must exist too.
    prepared = workdir / PREPARED_FOLDER
    if prepared.is_symlink() and not prepared.exists():  # a link to a parent that never prepared anything
        prepared.unlink()
    prepared.mkdir(exist_ok=True)
    versions = package_versions()
    threads: dict[str, Any] | None = None
    previous = _catch_stop_signals()
    try:
        try:
            threads = apply_thread_count(processes=_local_processes())
        except ThreadCountError as exc:
            raise _InputError('unsupported_input', str(exc)) from exc
        print(thread_summary(threads), flush=True)
        return _train_job(config_path, workdir, versions, threads)
    except JobInterrupted as exc:
        _stop['armed'] = False
        epoch = _saved_epoch(workdir / STATE_FOLDER)
        print(f'stopping: {exc} (the state of epoch {epoch} is saved in {STATE_FOLDER})', flush=True)
        if _distributed()[0] == 0:
            done = {'epochs_done': epoch, 'signal': exc.signal_name, 'versions': versions, 'threads': threads}
            write_json(workdir / 'interrupted.json', done)
        return EXIT_INTERRUPTED
    except PreparedDataError as exc:
        error = {'category': 'unsupported_input', 'message': str(exc), 'type': type(exc).__name__}
        status = EXIT_BAD_INPUT
    except _InputError as exc:
        error = {'category': exc.category, 'message': str(exc), 'type': 'InputError'}
        status = EXIT_BAD_INPUT
    except NonFiniteLossError as exc:
        error = {'category': 'non_finite_loss', 'message': str(exc), 'type': type(exc).__name__}
        error.update(system=exc.label, epoch=exc.epoch + 1)
        status = EXIT_NON_FINITE_LOSS
    except Exception as exc:  # every failure ends in a categorised error.json
        error = {
            'category': 'internal_error',
            'message': f'{type(exc).__name__}: {exc}',
            'type': type(exc).__name__,
            'traceback': traceback.format_exc(limit=20),
        }
        status = EXIT_FAILED
    finally:
        _restore_signals(previous)
    # Every process of a data-parallel run writes its own error file (process 0: error.json), with the time: when
    # one process fails, torchrun SIGTERMs the others, which then stop as if for the walltime; the parser takes the
    # earliest error as the cause.
    rank = _distributed()[0]
    error.update(rank=rank, time=time.time())
    payload = {'format_version': 1, 'versions': versions, 'threads': threads, 'error': error}
    write_json(workdir / rank_error_file(rank), payload)
    where = f' (rank {rank})' if rank else ''
    print(f'aiida-dm21 training{where}: {error["category"]}: {error["message"]}', file=sys.stderr, flush=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
