"""Failures that heal (issue 11): the daemon killed while a workchain runs, started again, and the work finishes.

The ``dm21.scf`` workchain of stretched LiH in STO-3G (grid level 0, ``max_cycle`` 1 from the core-Hamiltonian
guess) runs four ``dm21.scf`` CalcJobs in sequence: three do not converge (400, with 1, 2 and 4 cycles) and each
is restarted from its density with a new strategy, the fourth (Newton solver) converges.  On ``core.psql_dos`` +
RabbitMQ (the production set-up), in a private ``AIIDA_PATH`` (``backend_driver.py``):

1. the undisturbed run: submitted, run by the daemon to its end: the reference;
2. the same workchain again, with the daemon crashed (SIGKILL to circus and its workers, no shutdown code runs) and
   started again at three moments: while the first CalcJob's job is with the scheduler (the job runs on without a
   daemon and the new worker finds it again), just after the second CalcJob was created (its upload/submission
   and the step of the workchain that launched it), and while the third CalcJob's job is with the scheduler; then
   once ``verdi daemon stop`` (the orderly way) when the fourth exists, and started again.

The second run must finish with exit 0 and have exactly the CalcJobs of the first: one per iteration label
(``iteration_01`` ... ``iteration_04``), none lost, none twice, each finished once with the same exit status,
inputs and energy (to :data:`SAME_ENERGY` Ha converged, :data:`UNCONVERGED_ENERGY` not), each restarted from its
predecessor's density, and no CalcJob outside the two workchains.  A handler applied twice (a step that is not
idempotent on reload) would show as different parameters (e.g. ``max_cycle`` doubled twice).
"""

from __future__ import annotations

import collections
import copy
import itertools
import os
import subprocess
import sys
import time

import pytest

import aiida_dm21

pytest.importorskip('aiida.engine')

pytestmark = pytest.mark.aiida

LABELS = ['iteration_01', 'iteration_02', 'iteration_03', 'iteration_04']
#: what a CalcJob has to have for the energies of two runs to be compared
COMPARED = ('label', 'exit_status', 'inputs', 'cycles', 'converged')
#: Ha: how far apart two runs of the converged CalcJob (the last one) may end.  Converged to ``conv_tol``, it does
#: not remember the noise of the path (here 1e-10 Ha apart between the two chains).
SAME_ENERGY = 2e-6
#: Ha: how far apart two runs of an unconverged CalcJob may end.  The jobs are identical (inputs, cycles and restart
#: densities are compared exactly) and end bitwise equal on the development machine (threads 1 or 2, cold or warm
#: numba cache, other heap layouts, oneDNN or MKL, fused kernels or PyTorch's), but on the CI machine the first
#: CalcJob of the two chains twice ended apart: 6.9e-7 Ha (-7.7949883084 vs -7.7949890006), and 2.6e-5 Ha
#: (-7.7950145873 vs -7.7949890006): DM21 at the core-Hamiltonian guess already differed by 2.7e-6 Ha, and one
#: undamped cycle (|ddm| 1.6) amplified it ten times.  The cause of the 2.7e-6 (the float32 network's last bits on
#: that CPU, about 30 times what switching any back end moves here) is not found.  The chain's iterations are
#: 1e-3 to 0.24 Ha apart, so a job that ran another iteration's computation is still caught.
UNCONVERGED_ENERGY = 1e-4


def _module_file_seen_by(process) -> str:
    """The ``aiida_dm21`` that a Python with the environment (``PYTHONPATH``) of ``process`` imports."""
    environ = process.environ()
    done = subprocess.run(
        [sys.executable, '-c', 'import aiida_dm21; print(aiida_dm21.__file__)'],
        env={key: environ[key] for key in ('PATH', 'PYTHONPATH') if key in environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def _check_chain(summary: dict, logs: str) -> None:
    """One finished workchain: four CalcJobs, one per iteration label, each restarted from the previous density."""
    jobs = summary['calcjobs']
    assert summary['process_state'] == 'finished', f'{summary}\n{logs}'
    assert summary['exit_status'] == 0, f'{summary}\n{logs}'
    counts = collections.Counter(job['label'] for job in jobs)
    assert counts == collections.Counter(LABELS), f'CalcJobs per label: {dict(counts)}\n{summary["report"]}'
    assert [job['process_state'] for job in jobs] == ['finished'] * 4
    assert [job['exit_status'] for job in jobs] == [400, 400, 400, 0]
    assert [job['inputs']['max_cycle'] for job in jobs] == [1, 2, 4, 8]
    assert len({job['job_id'] for job in jobs} - {None}) == 4  # four scheduler jobs, each its own
    assert jobs[0]['restart_density'] is None
    for before, after in itertools.pairwise(jobs):
        assert after['restart_density'] == before['output_density']
    assert jobs[-1]['converged'] is True
    assert summary['output_density'] == jobs[-1]['output_density']


def _check_same_jobs(undisturbed: dict, disturbed: dict) -> None:
    """The two chains ran the same CalcJobs: the same :data:`COMPARED` entries, energies within :data:`SAME_ENERGY`
    (converged) or :data:`UNCONVERGED_ENERGY`."""
    for calm, shaken in zip(undisturbed['calcjobs'], disturbed['calcjobs'], strict=True):
        assert {key: shaken[key] for key in COMPARED} == {key: calm[key] for key in COMPARED}
        print(f'{calm["label"]}: e_tot {calm["e_tot"]!r} (undisturbed), {shaken["e_tot"]!r} (disturbed)')
        tolerance = SAME_ENERGY if calm['converged'] else UNCONVERGED_ENERGY
        assert abs(shaken['e_tot'] - calm['e_tot']) < tolerance, (calm, shaken)
    assert disturbed['e_tot'] == disturbed['calcjobs'][-1]['e_tot']
    assert abs(disturbed['e_tot'] - undisturbed['e_tot']) < SAME_ENERGY


@pytest.mark.slow
def test_daemon_killed_three_times_mid_workchain(isolated, services, dm21_checkpoint_file):
    """On ``core.psql_dos`` + RabbitMQ only: with ``verdi presto --use-zeromq`` the broker dies with the daemon, and
    in 2 of 5 runs here a CalcJob created just before the crash stayed ``waiting`` for ever (its task was lost), so
    a ZeroMQ profile is not crash-safe (docs/aiida.md)."""
    aiida = isolated(services['name'].replace('_', '-'))
    aiida.setup_psql_rabbitmq(services)
    # a cold numba cache: the first job compiles the kernels, the later ones load them (the two once gave energies
    # 1e-8 Ha apart, which this test found first; tests/test_kernel_cache.py)
    aiida.env['NUMBA_CACHE_DIR'] = str(aiida.root / 'numba-cache')
    checkpoint = str(dm21_checkpoint_file)
    moments = []
    with aiida.daemon():
        start = time.monotonic()
        reference = aiida.driver('restart-chain', '--checkpoint', checkpoint)
        undisturbed = aiida.driver('chain-summary', '--pk', str(reference['pk']), '--timeout', '240')
        undisturbed_s = time.monotonic() - start
        _check_chain(undisturbed, aiida.logs())

        # the workers import the code under test, the test's own (PYTHONPATH reaches them via `verdi daemon start`)
        workers = aiida.daemon_workers()
        assert workers, aiida.logs()
        assert _module_file_seen_by(workers[0]) == aiida_dm21.__file__

        start = time.monotonic()
        chain = aiida.driver('restart-chain', '--checkpoint', checkpoint)
        pk = str(chain['pk'])
        for calcjobs, submitted, how in ((1, True, 'kill'), (2, False, 'kill'), (3, True, 'kill'), (4, False, 'stop')):
            args = ['--submitted'] if submitted else []
            seen = aiida.driver('watch', '--pk', pk, '--calcjobs', str(calcjobs), *args, '--timeout', '180')
            assert seen['reached'], f'moment {calcjobs}: {seen}\n{aiida.logs()}'
            assert seen['process_state'] not in ('finished', 'excepted', 'killed'), seen  # mid-workchain
            before = {p.pid for p in aiida.daemon_workers()}
            if how == 'kill':
                killed = aiida.kill_daemon()
                assert len(killed) >= 2  # circus and at least one worker
            else:
                aiida.stop_daemon()
            aiida.start_daemon()
            after = {p.pid for p in aiida.daemon_workers()}
            assert after and not after & before  # new workers, the old ones are gone
            last = seen['calcjobs'][calcjobs - 1]
            moments.append(f'{how} when CalcJob {calcjobs} was {last["process_state"]}/{last["calc_state"]}')
        disturbed = aiida.driver('chain-summary', '--pk', pk, '--timeout', '240')
        disturbed_s = time.monotonic() - start
    print(f'undisturbed {undisturbed_s:.0f} s, disturbed {disturbed_s:.0f} s; ' + '; '.join(moments))
    print('\n'.join(disturbed['report']))

    _check_chain(disturbed, aiida.logs())
    _check_same_jobs(undisturbed, disturbed)
    # no CalcJob outside the two workchains (one created and then lost by a crashed step would be there)
    assert disturbed['n_calcjobs_in_profile'] == 8
    assert disturbed['n_workflows_in_profile'] == 2
    if os.environ.get('AIIDA_DM21_DAEMON_RESTARTS_VERBOSE'):
        print(aiida.logs(tail=20000))


# --- the checks themselves: each catches what it is there for ----------------------------------------------


def _summary(jobs: list[dict]) -> dict:
    return {
        'process_state': 'finished',
        'exit_status': 0,
        'calcjobs': jobs,
        'report': [],
        'output_density': jobs[-1]['output_density'],
    }


def _jobs() -> list[dict]:
    """Four CalcJobs as an undisturbed run leaves them (what ``chain-summary`` reports)."""
    jobs = []
    for i, (label, status, cycles) in enumerate(zip(LABELS, [400, 400, 400, 0], [1, 2, 4, 8], strict=True)):
        jobs.append(
            {
                'label': label,
                'process_state': 'finished',
                'exit_status': status,
                'inputs': {'max_cycle': cycles},
                'job_id': str(100 + i),
                'restart_density': f'density-{i - 1}' if i else None,
                'output_density': f'density-{i}',
                'converged': status == 0,
            }
        )
    return jobs


@pytest.mark.parametrize(
    'damage',
    [
        'duplicate',  # a CalcJob launched twice for one iteration
        'lost',  # an iteration without its CalcJob
        'rerun_job',  # two CalcJobs sharing one scheduler job
        'handler_twice',  # max_cycle doubled twice: a handler applied again on reload
        'wrong_density',  # a restart from another density than its predecessor's
        'excepted',  # a CalcJob that did not finish
    ],
)
def test_check_chain_catches(damage):
    jobs = _jobs()
    _check_chain(_summary(jobs), '')  # the intact chain passes
    if damage == 'duplicate':
        jobs.insert(2, {**jobs[1], 'job_id': '999'})
    elif damage == 'lost':
        del jobs[2]
    elif damage == 'rerun_job':
        jobs[2]['job_id'] = jobs[1]['job_id']
    elif damage == 'handler_twice':
        jobs[2]['inputs'] = {'max_cycle': 8}
    elif damage == 'wrong_density':
        jobs[3]['restart_density'] = 'density-0'
    else:
        jobs[1]['process_state'] = 'excepted'
    with pytest.raises(AssertionError):
        _check_chain(_summary(jobs), '')


@pytest.mark.parametrize(
    ('which', 'shift', 'passes'),
    [
        ('all', 0.0, True),
        ('all', 1e-6, True),
        ('unconverged', 2.6e-5, True),  # the noise seen in CI after one cycle from the guess
        ('unconverged', 1e-3, False),  # another iteration's computation
        ('converged', 1e-5, False),  # a converged energy that moved
        ('all', 1e-5, False),
    ],
)
def test_check_same_jobs_catches_other_energies(which, shift, passes):
    """Noise of the unconverged jobs passes, another computation or a converged energy that moved does not."""
    calm = _summary(
        [{**job, 'cycles': job['inputs']['max_cycle'], 'e_tot': -7.79 - 1e-2 * i} for i, job in enumerate(_jobs())]
    )
    calm['e_tot'] = calm['calcjobs'][-1]['e_tot']
    shaken = _summary(copy.deepcopy(calm['calcjobs']))
    for job in shaken['calcjobs']:
        if which == 'all' or (which == 'converged') == job['converged']:
            job['e_tot'] += shift
    shaken['e_tot'] = shaken['calcjobs'][-1]['e_tot']
    if passes:
        _check_same_jobs(calm, shaken)
    else:
        with pytest.raises(AssertionError):
            _check_same_jobs(calm, shaken)
