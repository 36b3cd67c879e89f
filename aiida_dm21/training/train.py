"""The training loop (no AiiDA): Adam on (E_xc − target)² + λ ΔE², deterministic with a seed, resumable.

    python -m aiida_dm21.training.train config.json      # what the dm21.train CalcJob runs

``config.json`` holds ``format_version`` (must be :data:`~aiida_dm21.runner.common.INPUT_FORMAT_VERSION`),
the dataset files, the initial checkpoint (optional) and the hyper-parameters; the run writes
``checkpoint.safetensors``, ``history.npz`` and, last, ``metrics.json`` (with the package ``versions``)
and, every ``save_every`` epochs, a resumable ``state/`` (weights, Adam moments, epoch, RNG state, history).
Stopped early for the walltime it writes ``interrupted.json`` instead.  Any failure ends in ``error.json``:
``{"format_version", "versions", "error": {"category", "message", "type"}}`` with a category of
:data:`ERROR_CATEGORIES` (a NaN loss is ``non_finite_loss``), never in a bare traceback.

Exit status: 0 trained, 4 interrupted (state saved), 3 non-finite loss, 2 bad input or input format, 1 other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..functional.checkpoint import load_network, save_checkpoint
from ..functional.model import DM21Config, DM21Network
from ..reference.dataset import load_dataset
from ..reference.fractional import TrainingSystem
from ..runner.common import check_format_version, package_versions, write_json
from .loss import PreparedSystem, prepare_system, self_consistency_delta, system_energy

__all__ = ['ERROR_CATEGORIES', 'NonFiniteLossError', 'TrainConfig', 'TrainResult', 'evaluate', 'main', 'train']

HA_TO_MHA = 1000.0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3
EXIT_INTERRUPTED = 4
ERROR_FILE = 'error.json'
STATE_FOLDER = 'state'

#: Error categories written to ``error.json["error"]["category"]``.
ERROR_CATEGORIES: dict[str, str] = {
    'unsupported_input': 'config.json, a hyper-parameter, a dataset or the initial checkpoint cannot be used',
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


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 20
    learning_rate: float = 1e-4
    regulariser_weight: float = 1.0  # λ
    eta: float = 1e-2  # Ha, regularisation of near-degenerate orbital pairs in ΔE
    grid_level: int = 1
    seed: int = 0
    save_every: int = 5  # epochs between resumable states
    epochs_per_job: int = 0  # > 0: stop cleanly (state saved) after this many epochs in one job, as at walltime
    device: str = 'cpu'
    name: str = 'trained'

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f'unknown training hyper-parameters: {sorted(unknown)}; known: {sorted(known)}')
        config = cls(**data)
        if config.epochs < 0 or config.learning_rate <= 0 or config.regulariser_weight < 0 or config.eta <= 0:
            raise ValueError('epochs >= 0, learning_rate > 0, regulariser_weight >= 0 and eta > 0 are required')
        if config.device.startswith('cuda') and not torch.cuda.is_available():
            raise ValueError(f'device {config.device!r} requested but CUDA is not available')
        return config


@dataclasses.dataclass
class TrainResult:
    network: DM21Network
    history: dict[str, np.ndarray]
    metrics: dict
    interrupted: bool = False  # stopped early (walltime / epochs_per_job); the state is saved, resume later


def evaluate(network: DM21Network, prepared: Sequence[PreparedSystem], with_regulariser: bool = True) -> dict:
    """Errors of E_xc (mHa) per system kind, and the mean |ΔE| (mHa)."""
    errors: dict[str, list[float]] = {}
    deltas = []
    for ps in prepared:
        energy, v = system_energy(network, ps, with_potential=with_regulariser)
        errors.setdefault(ps.system.kind, []).append((float(energy.detach()) - ps.target) * HA_TO_MHA)
        if with_regulariser:
            deltas.append(abs(float(self_consistency_delta(ps, v.detach()))) * HA_TO_MHA)
    out = {f'mae_{kind}_mha': float(np.mean(np.abs(v))) for kind, v in errors.items()}
    out['mae_all_mha'] = float(np.mean(np.abs(np.concatenate([np.asarray(v) for v in errors.values()]))))
    out['max_abs_error_mha'] = float(np.max(np.abs(np.concatenate([np.asarray(v) for v in errors.values()]))))
    if deltas:
        out['mean_abs_delta_e_mha'] = float(np.mean(deltas))
    return out


def _state_paths(state_dir: Path) -> tuple[Path, Path]:
    return state_dir / 'state.safetensors', state_dir / 'state.json'


def _save_state(state_dir: Path, network, optimizer, epoch: int, rng, history: dict, metrics: dict) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f'net.{k}': v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
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
    payload = {'epoch': epoch, 'steps': steps, 'rng': rng.bit_generator.state, 'history': history, 'metrics': metrics}
    tmp_json = json_path.with_suffix('.tmp')
    tmp_json.write_text(json.dumps(payload))
    tmp_json.replace(json_path)


def _load_state(state_dir: Path, network, optimizer, rng) -> tuple[int, dict, dict] | None:
    tensors_path, json_path = _state_paths(state_dir)
    if not (tensors_path.is_file() and json_path.is_file()):
        return None
    tensors = load_file(str(tensors_path))
    payload = json.loads(json_path.read_text())
    network.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith('net.')})
    opt = optimizer.state_dict()
    for pid in list(payload['steps']):
        state = {'step': torch.tensor(payload['steps'][pid])}
        for key in ('exp_avg', 'exp_avg_sq'):
            state[key] = tensors[f'opt.{pid}.{key}']
        opt['state'][int(pid)] = state
    optimizer.load_state_dict(opt)
    rng.bit_generator.state = payload['rng']
    return payload['epoch'], payload['history'], payload.get('metrics', {})


def train(
    systems: Sequence[TrainingSystem],
    config: TrainConfig,
    initial: DM21Network | None = None,
    heldout: Sequence[TrainingSystem] = (),
    state_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    walltime_seconds: float | None = None,
) -> TrainResult:
    """Train (or fine-tune ``initial``) on ``systems``; metrics before/after on ``systems`` and ``heldout``.

    With ``walltime_seconds`` (and a ``state_dir``) training stops cleanly, state saved, when another epoch
    would probably not fit in 90 % of it; so does ``config.epochs_per_job``.  ``interrupted`` is then True.
    """
    if not systems:
        raise ValueError('no training systems')
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    network = DM21Network(initial.config if initial is not None else DM21Config())
    if initial is not None:
        network.load_state_dict(initial.state_dict())
    network = network.to(device=device, dtype=torch.float32).train()
    network.requires_grad_(True)
    say = progress or (lambda message: None)
    start = time.perf_counter()
    say(f'preparing {len(systems)} training and {len(heldout)} held-out systems (grid level {config.grid_level})')
    prepared = [prepare_system(s, config.grid_level, network.config.omegas, device) for s in systems]
    prepared_heldout = [prepare_system(s, config.grid_level, network.config.omegas, device) for s in heldout]
    n_points = sum(ps.n_points for ps in prepared)
    say(f'{n_points} grid points in the training set, prepared in {time.perf_counter() - start:.1f} s')
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    history: dict[str, list] = {'epoch': [], 'loss': [], 'energy_loss': [], 'regulariser': [], 'wall_s': []}
    first_epoch = 0
    metrics: dict = {}
    state_dir = Path(state_dir) if state_dir else None
    loaded = _load_state(state_dir, network, optimizer, rng) if state_dir is not None else None
    if loaded is not None:
        first_epoch, history, metrics = loaded
        say(f'resumed from {state_dir} at epoch {first_epoch}')
    if 'before' not in metrics:  # errors of the initial model, kept across restarts
        metrics['before'] = {'train': evaluate(network, prepared)}
        if prepared_heldout:
            metrics['before']['heldout'] = evaluate(network, prepared_heldout)
    interrupted = False
    for epoch in range(first_epoch, config.epochs):
        done_here = epoch - first_epoch
        slowest = max(history['wall_s'], default=0.0)
        out_of_time = walltime_seconds is not None and (
            time.perf_counter() - start + 1.5 * slowest > 0.9 * walltime_seconds
        )
        if (
            state_dir is not None
            and done_here > 0
            and (out_of_time or (config.epochs_per_job > 0 and done_here >= config.epochs_per_job))
        ):
            _save_state(state_dir, network, optimizer, epoch, rng, history, metrics)
            say(f'stopping after epoch {epoch} to stay within the job (state saved in {state_dir})')
            interrupted = True
            break
        t_epoch = time.perf_counter()
        order = rng.permutation(len(prepared))
        sums = {'loss': 0.0, 'energy_loss': 0.0, 'regulariser': 0.0}
        for index in order:
            ps = prepared[index]
            optimizer.zero_grad(set_to_none=True)
            want_reg = config.regulariser_weight > 0
            energy, v_xc = system_energy(network, ps, with_potential=want_reg)
            energy_loss = (energy - ps.target) ** 2
            regulariser = self_consistency_delta(ps, v_xc, config.eta) ** 2 if want_reg else energy.new_zeros(())
            loss = energy_loss + config.regulariser_weight * regulariser
            if not torch.isfinite(loss):
                raise NonFiniteLossError(ps.system.label, epoch, float(loss.detach()))
            loss.backward()
            optimizer.step()
            sums['loss'] += float(loss)
            sums['energy_loss'] += float(energy_loss)
            sums['regulariser'] += float(regulariser)
        history['epoch'].append(epoch + 1)
        for key, value in sums.items():
            history[key].append(value / len(prepared))
        history['wall_s'].append(time.perf_counter() - t_epoch)
        say(
            f'epoch {epoch + 1}/{config.epochs}: loss {history["loss"][-1]:.3e} '
            f'(RMS E_xc error {math.sqrt(history["energy_loss"][-1]) * HA_TO_MHA:.2f} mHa, '
            f'regulariser {history["regulariser"][-1]:.2e}) {history["wall_s"][-1]:.1f} s'
        )
        if state_dir is not None and ((epoch + 1) % config.save_every == 0 or epoch + 1 == config.epochs):
            _save_state(state_dir, network, optimizer, epoch + 1, rng, history, metrics)
    network.eval()
    if interrupted:
        arrays = {k: np.asarray(v, dtype=float) for k, v in history.items()}
        return TrainResult(network=network.cpu(), history=arrays, metrics=metrics, interrupted=True)
    metrics['after'] = {'train': evaluate(network, prepared)}
    if prepared_heldout:
        metrics['after']['heldout'] = evaluate(network, prepared_heldout)
    metrics['n_train_systems'] = len(prepared)
    metrics['n_heldout_systems'] = len(prepared_heldout)
    metrics['n_grid_points'] = n_points
    metrics['wall_s'] = time.perf_counter() - start
    arrays = {k: np.asarray(v, dtype=float) for k, v in history.items()}
    return TrainResult(network=network.cpu(), history=arrays, metrics=metrics)


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
    except (TypeError, ValueError) as exc:
        raise _InputError('unsupported_input', f'hyper-parameters: {exc}') from exc
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


def _train_job(config_path: Path, workdir: Path, versions: dict[str, str]) -> int:
    spec, config = _read_config(config_path)
    systems, heldout, initial = _load_inputs(spec, workdir)

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
    )
    if result.interrupted:
        done = {'epochs_done': len(result.history['epoch']), 'versions': versions}
        write_json(workdir / 'interrupted.json', done)
        return EXIT_INTERRUPTED
    meta = {'name': config.name, 'source': 'trained', 'training': {'hyperparameters': dataclasses.asdict(config)}}
    save_checkpoint(workdir / 'checkpoint.safetensors', result.network, meta)
    tmp = workdir / 'history.npz.tmp'
    with tmp.open('wb') as handle:
        np.savez(handle, **result.history)
    tmp.replace(workdir / 'history.npz')
    write_json(workdir / 'metrics.json', {**result.metrics, 'versions': versions})  # last: the others are complete
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Compute-node entry point: ``python -m aiida_dm21.training.train config.json`` in the working folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = Path(argv[0] if argv else 'config.json')
    workdir = config_path.parent
    # A restart copies the parent's state/ folder: it must exist even when the job is killed before the first save.
    (workdir / STATE_FOLDER).mkdir(exist_ok=True)
    versions = package_versions()
    try:
        return _train_job(config_path, workdir, versions)
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
    write_json(workdir / ERROR_FILE, {'format_version': 1, 'versions': versions, 'error': error})
    print(f'aiida-dm21 training: {error["category"]}: {error["message"]}', file=sys.stderr, flush=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
