"""The ``dm21.train`` runner and parser on a real (one-epoch) training and on its output broken by hand.

Every bad output ends in a named exit code, stores nothing NaN or half-written and is never reused from
the cache; a scheduler walltime kill (120, set on the node before parsing) reaches the parser and so the
training workchain's restart handler; a NaN loss ends in a categorised ``error.json``, not a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('aiida.engine')

from aiida import orm
from aiida.plugins import CalculationFactory, ParserFactory

from aiida_dm21.parsers.train import DM21TrainParser
from aiida_dm21.reference.dataset import save_dataset
from aiida_dm21.reference.fractional import fractional_spin_systems, integer_system
from aiida_dm21.reference.integer import IntegerSpec, run_integer_system
from aiida_dm21.runner.common import INPUT_FORMAT_VERSION
from aiida_dm21.training.train import main

pytestmark = pytest.mark.aiida

NAN = float('nan')
OUTPUTS = ('checkpoint.safetensors', 'history.npz', 'metrics.json')
HYPER = {'epochs': 1, 'grid_level': 0, 'save_every': 1, 'learning_rate': 1e-4}


@pytest.fixture(scope='module')
def hydrogen_systems():
    """A real one-electron reference (H, STO-3G) as an integer and a fractional-spin training system."""
    h = run_integer_system(IntegerSpec(atom='H 0 0 0', basis='sto-3g', spin=1, reference_method='fci', label='H'))
    return [integer_system(h), *fractional_spin_systems(h, (0.5,))]


def _train_folder(folder: Path, systems, **config) -> tuple[int, Path]:
    """``main`` of the training runner, in-process, in ``folder`` with ``systems`` as the dataset."""
    folder.mkdir(parents=True)
    save_dataset(folder / 'datasets_h.npz', systems)
    payload = {'format_version': INPUT_FORMAT_VERSION, 'hyperparameters': HYPER, 'datasets': ['datasets_h.npz']}
    payload.update(config)
    (folder / 'config.json').write_text(json.dumps(payload))
    status = main([str(folder / 'config.json')])
    for name in ('config.json', 'datasets_h.npz'):
        (folder / name).unlink()  # the retrieved folder holds only what the CalcJob retrieves
    return status, folder


@pytest.fixture(scope='module')
def trained(tmp_path_factory, hydrogen_systems) -> Path:
    status, folder = _train_folder(tmp_path_factory.mktemp('train') / 'job', hydrogen_systems)
    assert status == 0
    shutil.rmtree(folder / 'state')  # not retrieved
    return folder


@pytest.fixture
def train_node(retrieved_calc_node, tmp_path, trained):
    """``train_node(edit=None, drop=(), exit_status=None, files=None)``: a dm21.train CalcJobNode whose retrieved
    files are the real training's, edited in place by ``edit(folder)``."""

    def factory(edit=None, drop=(), exit_status=None, files: dict[str, bytes] | None = None):
        folder = tmp_path / 'edited'
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(trained, folder)
        if edit is not None:
            edit(folder)
        for name in drop:
            (folder / name).unlink()
        for name, content in (files or {}).items():
            (folder / name).write_bytes(content)
        return retrieved_calc_node(folder, exit_status=exit_status, plugin='dm21.train')

    return factory


def parse(node):
    return DM21TrainParser.parse_from_node(node, store_provenance=False)


def cache_valid_after(node: orm.CalcJobNode, status: int) -> bool:
    from aiida.engine import ProcessState

    node.set_process_state(ProcessState.FINISHED)
    node.set_exit_status(status)
    node.seal()
    return node.base.caching.is_valid_cache


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        payload = json.loads((folder / name).read_text())
        change(payload)
        (folder / name).write_text(json.dumps(payload))  # Python writes NaN, as the runner does

    return edit


def _edit_history(key: str, index: int, value: float):
    def edit(folder: Path) -> None:
        with np.load(folder / 'history.npz') as data:
            history = {k: data[k] for k in data.files}
        history[key][index] = value
        np.savez(folder / 'history.npz', **history)

    return edit


def test_entry_points_and_cache_rules():
    from aiida_dm21.workflows.train import DM21TrainWorkChain

    assert ParserFactory('dm21.train') is DM21TrainParser
    codes = CalculationFactory('dm21.train').exit_codes
    own = [code for code in codes.values() if code.status >= 300]
    assert own and all(code.invalidates_cache for code in own), [c for c in own if not c.invalidates_cache]
    statuses = [code.status for code in DM21TrainWorkChain.exit_codes.values()]
    assert len(statuses) == len(set(statuses))  # no exit status with two meanings


def test_real_training_is_parsed(train_node):
    node = train_node()
    results, calcfunction = parse(node)
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    metrics = results['metrics'].get_dict()
    assert set(metrics['versions']) == {'python', 'numpy', 'pyscf', 'torch', 'aiida_dm21'}
    assert metrics['n_train_systems'] == 2
    assert np.all(np.isfinite(results['loss_curves'].get_array('loss')))
    assert results['checkpoint'].base.attributes.get('source') == 'trained'
    # the checkpoint records the grid it was trained on (an SCF on another grid warns)
    content = results['checkpoint'].get_content(mode='rb')
    header = json.loads(content[8 : 8 + int.from_bytes(content[:8], 'little')])
    grid = json.loads(header['__metadata__']['aiida_dm21'])['training']['grid']
    assert grid == {'level': 0, 'radi_method': 'treutler_ahlrichs_original', 'prune': 'nwchem_prune'}
    assert metrics['grid'] == grid
    assert cache_valid_after(node, 0)


def test_scf_evaluation_and_fractional_plot_are_parsed(retrieved_calc_node, tmp_path, hydrogen_systems, upstream_dir):
    """A training with the self-consistent evaluation (DM21m on H, STO-3G, grid level 1): before/after SCF metrics,
    the fractional-charge curve's PNG as ``fractional_plot``."""
    hyper = {
        **HYPER,
        'grid_level': 1,
        'scf_evaluation': [{'label': 'H', 'atom': 'H 0 0 0', 'basis': 'sto-3g', 'spin': 1, 'e_ref': -0.4666}],
        'fractional_evaluation': {'atom': 'H 0 0 0', 'basis': 'sto-3g', 'charge': 1, 'spin': 0, 'spin_next': 1},
    }
    config = {'hyperparameters': hyper, 'initial_checkpoint': str(upstream_dir / 'DM21m')}
    status, folder = _train_folder(tmp_path / 'job', hydrogen_systems, **config)
    assert status == 0
    assert (folder / 'fractional_curve.png').is_file()
    results, calcfunction = parse(retrieved_calc_node(folder, plugin='dm21.train'))
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    metrics = results['metrics'].get_dict()
    for which in ('before', 'after'):
        scf = metrics[which]['scf']
        assert scf['species'][0]['converged'] and scf['scf_mae_mha'] == abs(scf['species'][0]['error_mha'])
        assert len(scf['fractional_charge']['energy']) == 5
    assert results['fractional_plot'].get_content(mode='rb').startswith(b'\x89PNG')
    # a NaN in the SCF metrics is never stored
    payload = json.loads((folder / 'metrics.json').read_text())
    payload['after']['scf']['species'][0]['energy'] = NAN
    (folder / 'metrics.json').write_text(json.dumps(payload))
    results, calcfunction = parse(retrieved_calc_node(folder, plugin='dm21.train'))
    assert calcfunction.exit_status == 411 and 'after.scf.species[0].energy' in calcfunction.exit_message
    assert not results


@pytest.mark.parametrize('scheduler_status', [110, 120, 140])
def test_scheduler_kill_reaches_the_parser(train_node, scheduler_status):
    """The node is not finished while it is parsed: the scheduler's code must be read all the same."""
    node = train_node(drop=OUTPUTS, exit_status=scheduler_status)
    assert not node.is_finished
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == scheduler_status, calcfunction.exit_message
    assert not results
    assert not cache_valid_after(node, scheduler_status)


def test_scheduler_walltime_with_half_written_metrics(train_node):
    node = train_node(files={'metrics.json': b'{"before": {"train": {"mae_'}, exit_status=120)
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == 120
    assert not results


@pytest.mark.parametrize('missing', OUTPUTS)
def test_missing_output_without_scheduler_verdict(train_node, missing):
    node = train_node(drop=(missing,))
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == 300 and missing in calcfunction.exit_message
    assert not results
    assert not cache_valid_after(node, 300)


def test_interrupted_training(train_node):
    node = train_node(drop=OUTPUTS, files={'interrupted.json': b'{"epochs_done": 3}'}, exit_status=120)
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == 310 and 'after 3 epochs' in calcfunction.exit_message
    assert not results


@pytest.mark.parametrize(
    ('edit', 'status', 'key'),
    [
        (
            _edit_json('metrics.json', lambda m: m['after']['train'].update(mae_all_mha=NAN)),
            411,
            'after.train.mae_all_mha',
        ),
        (_edit_json('metrics.json', lambda m: m.update(wall_s=float('inf'))), 411, '`metrics.json:wall_s`'),
        (_edit_history('loss', 0, NAN), 410, 'loss of epoch 1'),
        (_edit_history('wall_s', 0, float('inf')), 411, 'history.npz:wall_s'),
    ],
)
def test_non_finite_outputs_are_not_stored(train_node, edit, status, key):
    node = train_node(edit=edit)
    results, calcfunction = parse(node)  # orm.Dict would refuse the NaN: the process must not except
    assert calcfunction.is_finished and not calcfunction.is_excepted
    assert calcfunction.exit_status == status and key in calcfunction.exit_message
    assert not results
    assert not cache_valid_after(node, status)


def test_nan_weights_are_not_stored(train_node, tmp_path, monkeypatch):
    import torch

    from aiida_dm21.functional import checkpoint
    from aiida_dm21.functional.model import DM21Network

    network = DM21Network()
    with torch.no_grad():
        next(network.parameters()).view(-1)[0] = float('nan')
    path = tmp_path / 'nan.safetensors'
    with monkeypatch.context() as patch:  # save_checkpoint refuses NaN weights itself: write the bad file anyway
        patch.setattr(checkpoint, 'check_finite', lambda *args, **kwargs: None)
        checkpoint.save_checkpoint(path, network, {'name': 'trained', 'source': 'trained'})
    results, calcfunction = parse(train_node(files={'checkpoint.safetensors': path.read_bytes()}))
    assert calcfunction.exit_status == 411 and 'checkpoint.safetensors:' in calcfunction.exit_message
    assert not results


@pytest.mark.parametrize(
    ('category', 'scheduler', 'status'),
    [
        ('non_finite_loss', None, 410),
        ('unsupported_input', None, 420),
        ('unsupported_format', None, 421),
        ('internal_error', None, 350),
        ('internal_error', 110, 110),
    ],
)
def test_runner_errors(train_node, category, scheduler, status):
    error = {'format_version': 1, 'error': {'category': category, 'message': 'it went wrong'}}
    node = train_node(drop=OUTPUTS, files={'error.json': json.dumps(error).encode()}, exit_status=scheduler)
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == status
    if scheduler is None:
        assert 'it went wrong' in calcfunction.exit_message
    assert not results


# --- the runner itself -------------------------------------------------------------------------------------


def test_nan_loss_ends_in_a_categorised_error(tmp_path, hydrogen_systems, retrieved_calc_node, capfd, monkeypatch):
    """A real training whose energy of H blows up (NaN): error.json, exit 3, parser 410 naming the system.

    A NaN target can no longer get this far (datasets refuse non-finite values when written and read), so the
    model's energy of H is made NaN instead, as a numerical blow-up would.
    """
    from aiida_dm21.training import train as training

    real = training.system_energy

    def blowing_up(network, ps, *args, **kwargs):
        energy, *rest = real(network, ps, *args, **kwargs)
        return (energy * NAN if ps.label == 'H' else energy, *rest)

    monkeypatch.setattr(training, 'system_energy', blowing_up)
    status, folder = _train_folder(tmp_path / 'job', hydrogen_systems)
    assert status == 3
    error = json.loads((folder / 'error.json').read_text())['error']
    assert error['category'] == 'non_finite_loss' and error['system'] == 'H' and error['epoch'] == 1
    assert 'Traceback' not in capfd.readouterr().err
    assert not any((folder / name).exists() for name in OUTPUTS)
    assert (folder / 'state').is_dir()  # a restart copies it: it exists even before the first save
    results, calcfunction = parse(retrieved_calc_node(folder, plugin='dm21.train'))
    assert calcfunction.exit_status == 410 and 'non-finite loss' in calcfunction.exit_message
    assert 'on H at epoch 1' in calcfunction.exit_message
    assert not results


def test_a_stop_signal_ends_the_training_at_its_saved_state_and_the_resume_ends_where_a_straight_run_does(
    tmp_path, hydrogen_systems, retrieved_calc_node, monkeypatch
):
    """SIGTERM, as Slurm sends at the time limit, in epoch 2 of a 3-epoch training that saves its state every epoch:
    exit 4, ``interrupted.json`` with the signal and the epoch of the saved state (1), no outputs, no error.json;
    the parser says 310 (the training workchain resumes from it).  The next job in that folder (the state as the
    workchain's restart copies it) ends with the weights of an uninterrupted run, bit for bit."""
    import os
    import signal

    from safetensors.numpy import load_file

    from aiida_dm21.training import train as training

    hyper = {**HYPER, 'epochs': 3, 'seed': 11}
    status, straight = _train_folder(tmp_path / 'straight', hydrogen_systems, hyperparameters=hyper)
    assert status == 0

    real = training.system_energy
    folder = tmp_path / 'job'
    sent = []

    def terminated_in_epoch_2(network, cs, *args, **kwargs):
        if not sent and training._saved_epoch(folder / 'state') == 1:
            sent.append(cs.label)
            os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler raises here, in the middle of epoch 2
        return real(network, cs, *args, **kwargs)

    monkeypatch.setattr(training, 'system_energy', terminated_in_epoch_2)
    handler = signal.getsignal(signal.SIGTERM)
    status, _ = _train_folder(folder, hydrogen_systems, hyperparameters=hyper)
    assert signal.getsignal(signal.SIGTERM) is handler  # main gives the handlers back
    assert status == 4 and sent
    interrupted = json.loads((folder / 'interrupted.json').read_text())
    assert interrupted['signal'] == 'SIGTERM' and interrupted['epochs_done'] == 1
    assert not (folder / 'error.json').exists() and not any((folder / name).exists() for name in OUTPUTS)
    state = json.loads((folder / 'state' / 'state.json').read_text())
    assert state['epoch'] == 1 and state['history']['epoch'] == [1]  # the cut epoch 2 was not saved
    results, calcfunction = parse(retrieved_calc_node(folder, exit_status=120, plugin='dm21.train'))
    assert calcfunction.exit_status == 310 and 'after 1 epochs' in calcfunction.exit_message
    assert not results

    monkeypatch.setattr(training, 'system_energy', real)
    save_dataset(folder / 'datasets_h.npz', hydrogen_systems)
    config = {'format_version': INPUT_FORMAT_VERSION, 'hyperparameters': hyper, 'datasets': ['datasets_h.npz']}
    (folder / 'config.json').write_text(json.dumps(config))
    (folder / 'interrupted.json').unlink()  # a new job's folder has none
    assert main([str(folder / 'config.json')]) == 0
    with np.load(folder / 'history.npz') as history:
        assert list(history['epoch']) == [1, 2, 3]
    resumed, uninterrupted = (load_file(str(f / 'checkpoint.safetensors')) for f in (folder, straight))
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[key], value)


@pytest.mark.parametrize('version', [99, None])
def test_runner_refuses_an_unknown_input_format(tmp_path, hydrogen_systems, retrieved_calc_node, version):
    status, folder = _train_folder(tmp_path / 'job', hydrogen_systems, format_version=version)
    assert status == 2
    payload = json.loads((folder / 'error.json').read_text())
    assert payload['error']['category'] == 'unsupported_format'
    assert set(payload['versions']) == {'python', 'numpy', 'pyscf', 'torch', 'aiida_dm21'}
    assert not any((folder / name).exists() for name in OUTPUTS)
    _, calcfunction = parse(retrieved_calc_node(folder, plugin='dm21.train'))
    assert calcfunction.exit_status == 421 and 'reads format_version 1' in calcfunction.exit_message


def test_runner_refuses_bad_hyperparameters(tmp_path, hydrogen_systems, retrieved_calc_node):
    status, folder = _train_folder(tmp_path / 'job', hydrogen_systems, hyperparameters={'epoch': 2})
    assert status == 2
    _, calcfunction = parse(retrieved_calc_node(folder, plugin='dm21.train'))
    assert calcfunction.exit_status == 420 and 'unknown training hyper-parameters' in calcfunction.exit_message


# --- data-parallel runs: a crashed process is a failure, not a walltime -------------------------------------

KILLED_RANK_1 = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
aiida_dm21.training.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-02_13:31:43
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 4 (pid: 10533)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_13:31:43
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 10534){suffix}
  error_file: <N/A>
  traceback : {trace}
============================================================
"""
TORCHRUN_SIGTERM = """Traceback (most recent call last):
  File "/usr/lib/python3/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 84, in _terminate
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 11396 got signal: 15
"""


def _error_file(message: str, rank: int, when: float, category: str = 'internal_error') -> bytes:
    return json.dumps(
        {'format_version': 1, 'error': {'category': category, 'message': message, 'rank': rank, 'time': when}}
    ).encode()


@pytest.mark.parametrize(
    ('stderr', 'status', 'message'),
    [
        (
            KILLED_RANK_1.format(code=-9, suffix=' (SIGKILL)', trace='Signal 9 (SIGKILL) received by PID 10534'),
            350,
            'process 1 of the data-parallel run exited with code -9 (Signal 9 (SIGKILL) received by PID 10534)',
        ),
        (
            KILLED_RANK_1.format(code=-11, suffix=' (SIGSEGV)', trace='Signal 11 (SIGSEGV) received by PID 10534'),
            350,
            'exited with code -11',
        ),
        (
            KILLED_RANK_1.format(code=1, suffix='', trace='To enable traceback see: x'),
            350,
            'process 1 of the data-parallel run exited with code 1',
        ),
        (
            KILLED_RANK_1.format(code=4, suffix='', trace='To enable traceback see: x'),
            310,
            'after 3 epochs',
        ),  # Slurm signalled the workers
        (TORCHRUN_SIGTERM, 310, 'after 3 epochs'),  # Slurm's SIGTERM reached torchrun: the walltime
        ('', 310, 'after 3 epochs'),
    ],
)
def test_a_killed_process_of_a_data_parallel_run_is_a_failure_not_a_walltime(train_node, stderr, status, message):
    files = {'interrupted.json': b'{"epochs_done": 3}', '_scheduler-stderr.txt': stderr.encode()}
    results, calcfunction = parse(train_node(drop=OUTPUTS, files=files))
    assert calcfunction.exit_status == status, calcfunction.exit_message
    assert message in calcfunction.exit_message
    if status == 350:
        assert '(worker_failed)' in calcfunction.exit_message
    assert not results


def test_the_earliest_error_of_a_data_parallel_run_is_its_cause(train_node):
    """Rank 1 failed first; rank 0 then failed in the collective (gloo): the job reports rank 1's error."""
    files = {
        'error.json': _error_file('RuntimeError: Connection closed by peer [127.0.0.1]:29500', 0, 1000.5),
        'error_rank1.json': _error_file('RuntimeError: out of memory', 1, 1000.0),
        'interrupted.json': b'{"epochs_done": 3}',
    }
    results, calcfunction = parse(train_node(drop=OUTPUTS, files=files))
    assert calcfunction.exit_status == 350
    assert (
        'process 1: RuntimeError: out of memory' in calcfunction.exit_message
        and 'gloo' not in calcfunction.exit_message
    )
    # rank 1's file alone (rank 0 was stopped by torchrun's SIGTERM and wrote interrupted.json): still a failure
    files = {
        'error_rank1.json': _error_file('a NaN', 1, 5.0, 'non_finite_loss'),
        'interrupted.json': b'{"epochs_done": 3}',
    }
    results, calcfunction = parse(train_node(drop=OUTPUTS, files=files))
    assert calcfunction.exit_status == 410 and 'process 1: a NaN' in calcfunction.exit_message
    assert not results
    # an unreadable rank file is a verdict too, not a crash of the parser
    results, calcfunction = parse(train_node(drop=OUTPUTS, files={'error_rank2.json': b'{not json'}))
    assert calcfunction.exit_status == 301 and 'error_rank2.json' in calcfunction.exit_message
