"""Real jobs through the AiiDA daemon as Slurm jobs: ``core.slurm`` with the ``core.local`` and ``core.ssh`` transports.

Needs a single-node Slurm (``.ci/slurm.sh``) and, for the ``core.ssh`` tests, the private sshd on 127.0.0.1
(``.ci/sshd.sh``: port ``AIIDA_DM21_SSHD_PORT``, 2222, key ``$AIIDA_DM21_SSHD_DIR/id_ed25519``).  Without them the
tests skip and say why; with ``AIIDA_DM21_REQUIRE_SLURM=1`` (CI) they fail instead.

One private ``AIIDA_PATH`` (``verdi presto --use-zeromq``) and one daemon serve the whole module, driven through
``backend_driver.py`` as in ``test_backends.py``.  Two ``core.slurm`` computers: ``slurm-local`` (``core.local`` on
``localhost``) and ``slurm-ssh`` (``core.ssh`` to 127.0.0.1 only: files and ``sbatch`` go through SSH, nothing reads
the submitting side's disk directly).  Their code ``dm21-python`` is this Python with ``PYTHONPATH`` starting at
this repository (code ``prepend_text``), so the jobs import the ``aiida_dm21`` under test, also in a clean clone.

Two tests have Slurm itself cut a job at a one-minute time limit (its shortest): a wrapper of that Python
(:data:`STALLING_PYTHON`) makes the real runner stall on its first attempt, so only Slurm's SIGTERM ends the job;
the ``dm21.scf`` workchain must restart from the density the runner saved, the ``dm21.train`` workchain resume
from the saved training state.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip('aiida.engine')

pytestmark = [pytest.mark.aiida, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
H2 = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]
PARTITION = os.environ.get('AIIDA_DM21_SLURM_PARTITION', 'debug')
SSHD_PORT = int(os.environ.get('AIIDA_DM21_SSHD_PORT', '2222'))
SSHD_KEY = Path(os.environ.get('AIIDA_DM21_SSHD_DIR', '/var/lib/aiida-dm21-sshd')) / 'id_ed25519'
ACCOUNT = 'dm21-ci'  # without an accounting database Slurm takes any account name and passes it to the job
#: what the SCF jobs ask of Slurm, and the #SBATCH lines AiiDA's core.slurm must write for it
OPTIONS = {
    'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1, 'num_cores_per_mpiproc': 2},
    'max_wallclock_seconds': 1230,
    'max_memory_kb': 2 * 1024 * 1024,
    'queue_name': PARTITION,
    'account': ACCOUNT,
}
SBATCH = [
    '#SBATCH --nodes=1',
    '#SBATCH --ntasks-per-node=1',
    '#SBATCH --cpus-per-task=2',
    '#SBATCH --time=00:20:30',
    '#SBATCH --mem=2048',
    f'#SBATCH --partition={PARTITION}',
    f'#SBATCH --account={ACCOUNT}',
]
#: the reference and training jobs: one core each (the two reference jobs run side by side on two cores)
SMALL = {
    'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1, 'num_cores_per_mpiproc': 1},
    'max_wallclock_seconds': 600,
    'queue_name': PARTITION,
}
SCF_OUTPUTS = ['output_density', 'output_parameters', 'remote_folder', 'retrieved']

#: LiH (1.6 Å, STO-3G, grid level 0) from the core-Hamiltonian guess: 21 SCF cycles with DM21 to 1e-9 Ha in this
#: process (H2/STO-3G converges in one, its density fixed by symmetry), so a job can be cut with the density of
#: cycle 2 to restart from
LIH = [('Li', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 1.6))]
LIH_PARAMETERS = {'basis': 'sto-3g', 'grid_level': 0, 'init_guess': '1e', 'conv_tol': 1e-9}
#: the jobs cut by Slurm: Slurm's shortest time limit, one minute
CUT = {**SMALL, 'max_wallclock_seconds': 60}
#: a Python that runs the real runner (``-m MODULE``) after, on its first attempt only (counted in the folder of the
#: test: the jobs run elsewhere), making it stall where ``HOOK`` says until a signal ends it, so that only Slurm's
#: SIGTERM at the time limit can stop that job.  ``scf``: the Fock build of SCF cycle 3 (the 4th call of
#: ``DM21RKS.get_veff``: the guess's, then one a cycle); ``train``: the first energy of a training epoch once the
#: state of epoch 1 is saved (``state/state.json``), i.e. in epoch 2.  When it started, stalled and (if an
#: exception reached the stall: the runner's signal handler) was interrupted goes to ``first-attempt.json``.
STALLING_PYTHON = """#!{python}
\"\"\"This Python's aiida-dm21 runner stalls ({hook}) on its first attempt (aiida-dm21 tests, test_slurm.py).\"\"\"
import json
import runpy
import sys
import time
from pathlib import Path

FOLDER = Path({folder!r})
HOOK = {hook!r}
RECORD = {{'started': time.time()}}


def record(**entries):
    RECORD.update(entries)
    (FOLDER / 'first-attempt.json').write_text(json.dumps(RECORD))


def stall(where):
    record(stalled=time.time(), where=where)
    try:
        time.sleep(3600)
    except BaseException as exc:  # a signal handler of the runner raises here
        record(interrupted=time.time(), type=type(exc).__name__, message=str(exc))
        raise


def install_scf():
    from aiida_dm21.functional import scf

    original = scf.DM21RKS.get_veff
    calls = []

    def get_veff(self, *args, **kwargs):
        calls.append(time.time())
        if len(calls) == 4:
            stall('SCF cycle 3')
        return original(self, *args, **kwargs)

    scf.DM21RKS.get_veff = get_veff  # the runner builds its SCF from this class when it runs


def install_train():
    from aiida_dm21.training import prepared

    original = prepared.compact_energy
    state = Path('state', 'state.json')  # in the job's working folder

    def compact_energy(*args, **kwargs):
        if state.is_file() and json.loads(state.read_text())['epoch'] >= 1:
            stall('training epoch 2')
        return original(*args, **kwargs)

    prepared.compact_energy = compact_energy  # the training module takes it from there when it runs


attempts = FOLDER / 'attempts'
attempt = int(attempts.read_text()) + 1 if attempts.exists() else 1
attempts.write_text(str(attempt))
if attempt == 1:
    {{'scf': install_scf, 'train': install_train}}[HOOK]()
    record()
if sys.argv[1:2] != ['-m'] or len(sys.argv) < 3:
    raise SystemExit('usage: python -m MODULE [ARGS]')
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def _driver_module():
    spec = importlib.util.spec_from_file_location('dm21_backend_driver', Path(__file__).with_name('backend_driver.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IsolatedAiida = _driver_module().IsolatedAiida


# --- is Slurm / sshd up? -------------------------------------------------------------------------------------


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def _slurm_problem() -> str | None:
    """Why no Slurm job can run here, or ``None``."""
    for tool in ('sbatch', 'squeue', 'sinfo', 'scontrol'):
        if shutil.which(tool) is None:
            return f'`{tool}` is not installed'
    done = _run('scontrol', 'ping')
    if done.returncode != 0 or 'UP' not in done.stdout:
        return f'slurmctld does not answer `scontrol ping`: {(done.stdout + done.stderr).strip()}'
    done = _run('sinfo', '-h', '-p', PARTITION, '-o', '%t')
    states = done.stdout.split()
    if done.returncode != 0 or not any(s.rstrip('*~#').startswith(('idle', 'mix', 'alloc')) for s in states):
        return f'no node of partition {PARTITION!r} is up (sinfo: {(done.stdout + done.stderr).strip() or "nothing"})'
    return None


def _sshd_problem() -> str | None:
    """Why the private sshd on 127.0.0.1 cannot be used, or ``None``."""
    if not SSHD_KEY.is_file():
        return f'no client key {SSHD_KEY}'
    try:
        socket.create_connection(('127.0.0.1', SSHD_PORT), timeout=5).close()
    except OSError as exc:
        return f'nothing listens on 127.0.0.1:{SSHD_PORT}: {exc}'
    return None


def _require(problem: str | None, what: str, script: str) -> None:
    if problem is None:
        return
    message = f'{what} (start it with {script}): {problem}'
    if os.environ.get('AIIDA_DM21_REQUIRE_SLURM') == '1':
        pytest.fail(message)  # CI starts Slurm and sshd: a skip there would hide a broken set-up
    pytest.skip(message)


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def reference_energy(dm21_checkpoint_file) -> float:
    """H2/STO-3G, grid level 0, with the core ``KS`` in this process."""
    from pyscf import gto

    from aiida_dm21.functional.scf import KS

    mol = gto.M(atom=H2, basis='sto-3g', unit='Angstrom', verbose=0)
    mf = KS(mol, dm21_checkpoint_file)
    mf.grids.level = 0
    return float(mf.kernel())


@pytest.fixture(scope='module')
def lih_energy(dm21_checkpoint_file) -> float:
    """LiH of :data:`LIH_PARAMETERS` with the core ``KS`` in this process, from the same guess."""
    from pyscf import gto

    from aiida_dm21.functional.scf import KS

    mol = gto.M(atom=LIH, basis='sto-3g', unit='Angstrom', verbose=0)
    mf = KS(mol, dm21_checkpoint_file)
    mf.grids.level = 0
    mf.init_guess = '1e'
    mf.conv_tol = 1e-9
    energy = float(mf.kernel())
    assert mf.converged
    return energy


@pytest.fixture(scope='module')
def slurm_aiida(tmp_path_factory):
    """A private profile with the computers ``slurm-local`` (and ``slurm-ssh`` if sshd is up) and a daemon.

    Yields ``(aiida, computers)``: ``computers`` maps label to what ``slurm-computer`` answered, or to the reason
    the computer could not be made."""
    _require(_slurm_problem(), 'Slurm tests need a running single-node Slurm', '.ci/slurm.sh')
    root = tmp_path_factory.mktemp('slurm-aiida')
    aiida = IsolatedAiida(root / 'aiida', f'dm21-slurm-{uuid.uuid4().hex[:8]}')
    aiida.verdi('presto', '--non-interactive', '--use-zeromq', '--profile-name', aiida.profile, '--email', 'dm21@test')
    computers: dict[str, dict | str] = {}
    computers['slurm-local'] = aiida.driver(
        'slurm-computer', '--label', 'slurm-local', '--transport', 'core.local',
        '--workdir', str(root / 'work-local'), '--pythonpath', str(REPO),
    )  # fmt: skip
    problem = _sshd_problem()
    if problem is None:
        computers['slurm-ssh'] = aiida.driver(
            'slurm-computer', '--label', 'slurm-ssh', '--transport', 'core.ssh',
            '--workdir', str(root / 'work-ssh'), '--pythonpath', str(REPO),
            '--ssh-port', str(SSHD_PORT), '--ssh-key', str(SSHD_KEY), '--ssh-user', _user(),
        )  # fmt: skip
    else:
        computers['slurm-ssh'] = problem
    try:
        with aiida.daemon():
            yield aiida, computers
    finally:
        print('\n'.join(f'{seconds:6.1f} s  {command}' for command, seconds in aiida.timings))


def _user() -> str:
    import getpass

    return getpass.getuser()


def _computer(slurm_aiida, label: str):
    aiida, computers = slurm_aiida
    if isinstance(computers[label], str):
        _require(computers[label], 'The core.ssh tests need the private sshd on 127.0.0.1', '.ci/sshd.sh')
    info = computers[label]
    assert info['scheduler'] == 'core.slurm'
    assert info['sinfo'][0] == 0 and PARTITION in info['sinfo'][1], info  # the transport reaches Slurm
    return aiida, info


def _check_slurm_job(job: dict, computer: str, lines: list[str]) -> None:
    """The CalcJob ran as a Slurm job on ``computer``: its job id, the job's own record, the #SBATCH lines."""
    assert job['computer'] == computer
    assert job['job_id'] and job['job_id'].isdigit(), job
    record = re.search(r'^dm21-slurm-job (\S+) node=(\S*) partition=(\S*) .*$', job['scheduler_stdout'] or '', re.M)
    assert record, job['scheduler_stdout']
    assert record.group(1) == job['job_id'] and record.group(2) == socket.gethostname().split('.')[0]
    assert record.group(3) == PARTITION
    script = job['submit_script']
    assert script and script.startswith('#!/bin/bash'), job
    sbatch = [line.strip() for line in script.splitlines() if line.startswith('#SBATCH')]
    for line in lines:
        assert line in sbatch, f'{line!r} not in the submitted script:\n{script}'
    assert f'export PYTHONPATH={REPO}' in script  # the code's prepend_text: the jobs import this repository


def _check_scf(result: dict, reference: float, logs: str) -> dict:
    assert result['process_state'] == 'finished', f'{result}\n{logs}'
    assert result['exit_status'] == 0, f'{result}\n{logs}'
    assert result['outputs'] == SCF_OUTPUTS
    assert result['converged'] is True
    assert result['functional_sha256'] == result['checkpoint_sha256']
    assert abs(result['e_tot'] - reference) < 1e-6, (result['e_tot'], reference)
    jobs = result['calcjobs']
    assert len(jobs) == 1 and jobs[0]['process_type'] == 'aiida.calculations:dm21.scf', jobs
    assert jobs[0]['exit_status'] == 0
    return jobs[0]


def _stalling_code(aiida, computer: str, folder: Path, hook: str) -> Path:
    """The code ``dm21-stalling-HOOK`` on ``computer``: :data:`STALLING_PYTHON` in ``folder``; returns ``folder``."""
    folder.mkdir()
    script = folder / 'python'
    script.write_text(STALLING_PYTHON.format(python=sys.executable, folder=str(folder), hook=hook))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    aiida.driver(
        'slurm-code', '--computer', computer, '--label', f'dm21-stalling-{hook}', '--executable', str(script),
        '--pythonpath', str(REPO),
    )  # fmt: skip
    return folder


def _cancelled_by_time_limit(job: dict) -> float:
    """Slurm's own line in the job's stderr (slurmstepd): cancelled at the time limit; when (Unix time)."""
    import datetime

    line = rf'\*\*\* JOB {job["job_id"]} ON \S+ CANCELLED AT (\S+) DUE TO TIME LIMIT \*\*\*'
    found = re.search(line, job['scheduler_stderr'] or '')
    assert found, job['scheduler_stderr']
    return datetime.datetime.fromisoformat(found.group(1)).timestamp()  # slurmstepd writes the local time


# --- the tests -----------------------------------------------------------------------------------------------


def _cut_then_resumed(aiida, result: dict, folder: Path, kind: str, computer: str):
    """The two ``dm21.<kind>`` jobs of a workchain whose first job (one minute of Slurm) stalled until Slurm cut it at
    the time limit: ``(first, second, stall, summary, logs)``, ``stall`` what the stalling code recorded.  Checks
    that there were two jobs, two attempts, the first a Slurm job of one minute, cancelled by Slurm for its time
    limit, its stop signal when Slurm's line says (55-150 s after the start: Slurm checks the limits every 30 s)."""
    logs = aiida.logs()
    jobs = result['calcjobs']
    summary = json.dumps({k: result[k] for k in ('process_state', 'exit_status', 'report')}, indent=1)
    assert [j['process_type'] for j in jobs] == [f'aiida.calculations:dm21.{kind}'] * 2, f'{summary}\n{jobs}\n{logs}'
    first, second = jobs
    assert (folder / 'attempts').read_text() == '2'
    _check_slurm_job(first, computer, ['#SBATCH --time=00:01:00'])
    cancelled = _cancelled_by_time_limit(first)
    stall = json.loads((folder / 'first-attempt.json').read_text())
    after = stall['interrupted'] - stall['started']
    print(
        f'first job: stalled {stall["stalled"] - stall["started"]:.1f} s after its start, SIGTERM at {after:.1f} s '
        f'(Slurm: cancelled at {cancelled - stall["started"]:.0f} s)'
    )
    assert 55 < after < 150 and abs(stall['interrupted'] - cancelled) < 5, stall
    return first, second, stall, summary, logs


@pytest.mark.parametrize('label', ['slurm-local', 'slurm-ssh'])
def test_scf_workchain_as_slurm_job(slurm_aiida, label, dm21_checkpoint_file, reference_energy):
    """``dm21.scf`` (workchain) of H2/STO-3G on a ``core.slurm`` computer: OK, the in-process energy, and the
    ``_aiidasubmit.sh`` in the remote working directory (read through the transport) asks what the options say."""
    aiida, info = _computer(slurm_aiida, label)
    assert info['transport'] == ('core.local' if label == 'slurm-local' else 'core.ssh')
    result = aiida.driver(
        'slurm-scf', '--computer', label, '--checkpoint', str(dm21_checkpoint_file),
        '--options', json.dumps(OPTIONS), '--wait', '240', timeout=300,
    )  # fmt: skip
    job = _check_scf(result, reference_energy, aiida.logs())
    _check_slurm_job(job, label, SBATCH)
    record = re.search(r'^dm21-slurm-job .*$', job['scheduler_stdout'], re.M).group(0)
    # what Slurm granted, as the job saw it (only what Slurm exports to every batch job)
    assert f'account={ACCOUNT}' in record and 'nodes=1' in record and 'cpus_per_task=2' in record, record
    assert 'mem=2048' in record, record


def test_gpu_request_in_submit_script(slurm_aiida, dm21_checkpoint_file):
    """A GPU job as one would submit it to a GPU partition: ``custom_scheduler_commands`` carries ``--gres``
    (AiiDA's ``core.slurm`` has no GPU resource) and ``device: cuda`` reaches the runner's input.  Only prepared
    (``dry_run``), never submitted: there is no GPU here."""
    aiida, _ = _computer(slurm_aiida, 'slurm-local')
    options = {**OPTIONS, 'queue_name': 'gpu', 'custom_scheduler_commands': '#SBATCH --gres=gpu:1'}
    result = aiida.driver(
        'slurm-dry-run', '--computer', 'slurm-local', '--checkpoint', str(dm21_checkpoint_file),
        '--options', json.dumps(options), '--parameters', json.dumps({'device': 'cuda'}),
    )  # fmt: skip
    sbatch = [line for line in result['submit_script'].splitlines() if line.startswith('#SBATCH')]
    assert '#SBATCH --gres=gpu:1' in sbatch, result['submit_script']
    assert '#SBATCH --partition=gpu' in sbatch
    assert '#SBATCH --cpus-per-task=2' in sbatch and '#SBATCH --mem=2048' in sbatch
    assert result['input'] is not None and result['input']['device'] == 'cuda', result['input']


@pytest.fixture(scope='module')
def slurm_reference(slurm_aiida) -> dict:
    """``dm21.reference_data`` (H+ and H, FCI: two ``dm21.reference`` Slurm jobs on ``slurm-local``), once for the
    trainings on ``slurm-ssh``; what ``slurm-reference`` answered."""
    aiida, _ = _computer(slurm_aiida, 'slurm-ssh')  # both computers first: no skip after half the work
    aiida, _ = _computer(slurm_aiida, 'slurm-local')
    return aiida.driver(
        'slurm-reference', '--computer', 'slurm-local', '--options', json.dumps(SMALL), '--wait', '240', timeout=300
    )


def _dataset(slurm_aiida, reference: dict) -> int:
    aiida, _ = slurm_aiida
    assert reference['process_state'] == 'finished' and reference['exit_status'] == 0, f'{reference}\n{aiida.logs()}'
    return reference['dataset']['pk']


def test_reference_data_then_training_as_slurm_jobs(slurm_aiida, slurm_reference, dm21_checkpoint_file):
    """``dm21.reference_data`` (H+ and H, FCI: two ``dm21.reference`` Slurm jobs on ``slurm-local``), then the
    ``dm21.train`` workchain, one epoch from DM21 on that dataset, as a Slurm job on ``slurm-ssh`` (the dataset and
    the checkpoint go up, the trained weights come back, through SSH)."""
    aiida, _ = _computer(slurm_aiida, 'slurm-ssh')
    reference = slurm_reference
    logs = aiida.logs()
    assert reference['process_state'] == 'finished' and reference['exit_status'] == 0, f'{reference}\n{logs}'
    assert reference['dataset']['n_systems'] == 3 and reference['dataset']['kinds'] == {'fc': 1, 'fs': 1, 'integer': 1}
    jobs = reference['calcjobs']
    assert [j['process_type'] for j in jobs] == ['aiida.calculations:dm21.reference'] * 2, jobs
    for job in jobs:
        assert job['exit_status'] == 0, job
        _check_slurm_job(job, 'slurm-local', ['#SBATCH --cpus-per-task=1', '#SBATCH --time=00:10:00'])
    assert len({j['job_id'] for j in jobs}) == 2

    train = aiida.driver(
        'slurm-train', '--computer', 'slurm-ssh', '--dataset', str(reference['dataset']['pk']),
        '--checkpoint', str(dm21_checkpoint_file), '--options', json.dumps(SMALL), '--wait', '300', timeout=360,
    )  # fmt: skip
    assert train['process_state'] == 'finished' and train['exit_status'] == 0, f'{train}\n{aiida.logs()}'
    assert train['trained']['source'] == 'trained' and train['trained']['epochs'] == [1.0]
    assert train['checkpoint_sha256'] and train['trained']['weights_sha256'] != train['checkpoint_sha256']
    jobs = train['calcjobs']
    assert [j['process_type'] for j in jobs] == ['aiida.calculations:dm21.train'], jobs
    _check_slurm_job(jobs[0], 'slurm-ssh', ['#SBATCH --cpus-per-task=1', f'#SBATCH --partition={PARTITION}'])


def test_scf_cut_by_slurm_time_limit_resumes_from_its_density(slurm_aiida, tmp_path, dm21_checkpoint_file, lih_energy):
    """Issue 11 (4): the ``dm21.scf`` workchain's first job, asking Slurm for one minute, stalls in SCF cycle 3
    (:data:`STALLING_PYTHON`) until Slurm itself ends it at the time limit: SIGTERM reaches the runner, whose handler
    stops the SCF and saves the density of cycle 2; the parser says 311 with that density, the workchain's walltime
    handler restarts from it with the walltime × ``walltime_factor`` (4: four minutes), and the second job converges
    to the in-process energy."""
    aiida, _ = _computer(slurm_aiida, 'slurm-local')
    folder = _stalling_code(aiida, 'slurm-local', tmp_path / 'stalling', 'scf')
    result = aiida.driver(
        'slurm-scf', '--computer', 'slurm-local', '--code', 'dm21-stalling-scf', '--molecule', 'lih',
        '--parameters', json.dumps(LIH_PARAMETERS), '--walltime-factor', '4',
        '--checkpoint', str(dm21_checkpoint_file), '--options', json.dumps(CUT), '--wait', '420', timeout=480,
    )  # fmt: skip
    first, second, stall, summary, logs = _cut_then_resumed(aiida, result, folder, 'scf', 'slurm-local')
    # the runner's SIGTERM handler raised in the stalled cycle (its deadline check, after a cycle, never ran there)
    assert stall.get('type') == 'WalltimeExceeded' and stall['message'] == 'received signal SIGTERM', stall
    # ... saved the density of cycle 2; the parser: 311 (the runner stopped for the walltime) with that density
    assert first['exit_status'] == 311, first
    assert first['output_density'] is not None
    assert first['output_parameters']['cycles'] == 2 and first['output_parameters']['converged'] is False
    assert first['output_parameters']['error']['category'] == 'walltime'
    assert first['output_parameters']['error']['message'] == 'received signal SIGTERM'

    # the workchain's walltime handler: from that density, four times the walltime
    assert any(
        f'<{first["pk"]}> ran out of walltime (exit 311): restarting from the density' in line
        and 'max_wallclock_seconds 60 -> 240' in line
        for line in result['report']
    ), result['report']
    assert second['restart_density'] == first['output_density']
    assert second['max_wallclock_seconds'] == 240
    _check_slurm_job(second, 'slurm-local', ['#SBATCH --time=00:04:00'])
    assert second['job_id'] != first['job_id']
    assert 'DUE TO TIME LIMIT' not in (second['scheduler_stderr'] or '')
    assert second['exit_status'] == 0, second
    assert second['output_parameters']['restarted'] is True and second['output_parameters']['converged'] is True
    print(f'second job: {second["output_parameters"]["cycles"]} cycles from the density of cycle 2')

    # and the workchain: OK, with the second job's energy, the one of the SCF in this process
    assert result['process_state'] == 'finished' and result['exit_status'] == 0, f'{summary}\n{logs}'
    assert result['converged'] is True
    assert result['e_tot'] == second['output_parameters']['e_tot']
    assert abs(result['e_tot'] - lih_energy) < 1e-6, (result['e_tot'], lih_energy)


def test_training_cut_by_slurm_time_limit_resumes_from_its_saved_state(
    slurm_aiida, slurm_reference, tmp_path, dm21_checkpoint_file
):
    """Issue 11 (4): the ``dm21.train`` workchain's first job (two epochs, the state saved after each, one minute of
    Slurm) stalls in epoch 2 (:data:`STALLING_PYTHON`) until Slurm ends it at the time limit: SIGTERM reaches the
    training runner, which stops with the state of epoch 1 (310); the workchain resumes from that state in the job's
    remote folder (through SSH), and the second job trains epoch 2 only."""
    dataset = _dataset(slurm_aiida, slurm_reference)
    aiida, _ = _computer(slurm_aiida, 'slurm-ssh')
    folder = _stalling_code(aiida, 'slurm-ssh', tmp_path / 'stalling', 'train')
    parameters = {'epochs': 2, 'save_every': 1, 'learning_rate': 1e-4, 'grid_level': 0}
    result = aiida.driver(
        'slurm-train', '--computer', 'slurm-ssh', '--code', 'dm21-stalling-train', '--dataset', str(dataset),
        '--parameters', json.dumps(parameters), '--checkpoint', str(dm21_checkpoint_file),
        '--options', json.dumps(CUT), '--wait', '420', timeout=480,
    )  # fmt: skip
    first, second, stall, summary, logs = _cut_then_resumed(aiida, result, folder, 'train', 'slurm-ssh')
    assert stall['where'] == 'training epoch 2', stall
    # ... through the training runner's SIGTERM handler, which stopped it with the state of epoch 1: 310
    assert stall.get('type') == 'JobInterrupted' and stall['message'] == 'received signal SIGTERM', stall
    assert first['exit_status'] == 310 and 'after 1 epochs' in first['exit_message'], first
    assert 'stopping: received signal SIGTERM (the state of epoch 1 is saved in state)' in first['log'], first['log']
    assert first['state'] is not None and first['state']['epoch'] == 1 and first['state']['epochs'] == [1], first

    # the workchain resumed from that state: the second job starts at epoch 2 and trains only that one
    assert any(
        f'<{first["pk"]}> stopped for walltime' in line and 'resuming from its saved state' in line
        for line in result['report']
    ), result['report']
    assert second['parent_folder'] == first['remote_folder']
    _check_slurm_job(second, 'slurm-ssh', ['#SBATCH --time=00:01:00'])
    assert second['job_id'] != first['job_id'] and second['exit_status'] == 0, second
    assert second['log'][0] == 'resumed from state at epoch 1', second['log']
    assert [line.split(':')[0] for line in second['log'][1:]] == ['epoch 2/2'], second['log']
    print(f'second job: {second["log"]}')

    # the workchain: OK, two epochs, the first one's numbers those the first job saved (its wall time too: not redone)
    assert result['process_state'] == 'finished' and result['exit_status'] == 0, f'{summary}\n{logs}'
    trained = result['trained']
    assert trained['source'] == 'trained' and trained['epochs'] == [1.0, 2.0]
    assert trained['loss'][0] == first['state']['loss'][0] and trained['wall_s'][0] == first['state']['wall_s'][0]
    assert trained['weights_sha256'] != result['checkpoint_sha256']
