"""Driver run as a subprocess by the tests of private AiiDA set-ups (backends, archive, Slurm, daemon restarts).

It is executed with the test session's Python under a private ``AIIDA_PATH`` (never the in-process test
profile) and loads that folder's default profile.  Each command prints one JSON object as the last line of
its stdout::

    python backend_driver.py submit --checkpoint DM21.safetensors [--grid-level 1] [--wait TIMEOUT]  # -> {"pk" ...}
    python backend_driver.py wait --pk PK [--timeout 90]          # -> state, exit status, outputs, e_tot ...
    python backend_driver.py inspect-import --uuid UUID           # -> links, checkpoint attributes, re-run energy
    python backend_driver.py slurm-computer --label L --transport core.local|core.ssh --workdir W --pythonpath P
    python backend_driver.py slurm-code --computer L --label C --executable X --pythonpath P  # another code there
    python backend_driver.py slurm-scf --computer L --checkpoint F --options JSON [--wait T]   # dm21.scf workchain
        [--code C] [--molecule h2|lih] [--parameters JSON] [--walltime-factor F]
    python backend_driver.py slurm-dry-run --computer L --checkpoint F --options JSON --parameters JSON
    python backend_driver.py slurm-reference --computer L --options JSON [--wait T]  # dm21.reference_data, H+ and H
    python backend_driver.py slurm-train --computer L --dataset PK --checkpoint F --options JSON [--wait T]
        [--code C] [--parameters JSON]
    python backend_driver.py restart-chain --checkpoint F     # dm21.scf workchain, stretched LiH: four CalcJobs
    python backend_driver.py watch --pk PK --calcjobs N [--submitted] [--timeout 120]  # until its N-th CalcJob
    python backend_driver.py chain-summary --pk PK [--timeout 240]  # wait, then each CalcJob of the workchain

``submit`` sets up what a fresh profile lacks (a ``localhost`` computer with ``core.local``/``core.direct`` and
an ``InstalledCode`` ``dm21-python`` whose executable is this Python), stores the checkpoint and submits one
``dm21.scf`` of H2/STO-3G to the daemon (``aiida.engine.submit``).

The ``slurm-*`` commands (``test_slurm.py``) make a ``core.slurm`` computer (``core.local`` transport on
``localhost`` or ``core.ssh`` to ``127.0.0.1``) with a code ``dm21-python@LABEL`` whose ``prepend_text`` puts
``--pythonpath`` (the repository under test) first on ``PYTHONPATH``, submit workchains there and report each
CalcJob's scheduler job id, its retrieved scheduler stdout and stderr and the ``_aiidasubmit.sh`` read back from
the remote working directory through the computer's own transport.  ``slurm-code`` adds a code with another
executable (a wrapper script of the tests) and the same ``prepend_text``.

``restart-chain``, ``watch`` and ``chain-summary`` (``test_daemon_restarts.py``) submit a ``dm21.scf`` workchain
that needs four CalcJobs in sequence, wait for a moment of it (its N-th CalcJob created, or with its job at the
scheduler) and report its CalcJobs: call label, states, job id, inputs, energy and restart density.

The tests import :class:`IsolatedAiida` from this file (by path, in ``conftest.py``): the test-side handle of
such a private ``AIIDA_PATH``, which runs ``verdi``, this driver and the daemon there (also crashes it:
:meth:`IsolatedAiida.kill_daemon`) and always stops the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

H2 = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]
#: the services of ``.ci/services.sh``: PostgreSQL (trust authentication for ``postgres``) and RabbitMQ (guest)
PG = {'host': '127.0.0.1', 'port': 5432, 'user': 'postgres'}
RABBITMQ = ('127.0.0.1', 5672)


def _load():
    from aiida import load_profile

    return load_profile()


def _localhost():
    """The ``localhost`` computer (``verdi presto`` makes one; a ``verdi profile setup`` profile has none)."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        computer = orm.load_computer('localhost')
    except NotExistent:
        workdir = _config_dir() / 'scratch'
        computer = orm.Computer(
            label='localhost',
            hostname='localhost',
            transport_type='core.local',
            scheduler_type='core.direct',
            workdir=str(workdir),
        ).store()
        computer.set_default_mpiprocs_per_machine(1)
    if not computer.is_configured:
        computer.configure(safe_interval=0)
    computer.set_minimum_job_poll_interval(0.5)
    return computer


def _config_dir() -> Path:
    from aiida.manage.configuration import get_config

    return Path(get_config().dirpath)


def _code(computer):
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        return orm.load_code('dm21-python@localhost')
    except NotExistent:
        return orm.InstalledCode(
            label='dm21-python',
            computer=computer,
            filepath_executable=sys.executable,
            default_calc_job_plugin='dm21.scf',
        ).store()


def submit(args) -> dict:
    _load()
    from aiida import orm
    from aiida.engine import submit as submit_process
    from aiida.plugins import CalculationFactory, DataFactory

    computer = _localhost()
    structure = orm.StructureData(pbc=(False, False, False))
    for symbol, position in H2:
        structure.append_atom(symbols=symbol, position=position)
    builder = CalculationFactory('dm21.scf').get_builder()
    builder.code = _code(computer)
    builder.structure = structure
    builder.checkpoint = DataFactory('dm21.checkpoint').get_or_create(args.checkpoint)
    builder.parameters = orm.Dict({'basis': 'sto-3g', 'grid_level': args.grid_level})
    builder.metadata.options.max_wallclock_seconds = 600
    node = submit_process(builder)
    result = {'pk': node.pk, 'uuid': node.uuid}
    if args.wait is not None:
        result.update(_wait(node.pk, args.wait))
    return result


def _state(pk: int) -> tuple[str | None, int | None]:
    """Process state and exit status read with a fresh query (another process, the daemon, writes them)."""
    from aiida import orm
    from aiida.manage import get_manager

    session = get_manager().get_profile_storage().get_session()
    session.rollback()  # end the read transaction so the next query sees the daemon's commits
    builder = orm.QueryBuilder().append(
        orm.ProcessNode, filters={'id': pk}, project=['attributes.process_state', 'attributes.exit_status']
    )
    state, exit_status = builder.one()
    return state, exit_status


def wait(args) -> dict:
    _load()
    return _wait(args.pk, args.timeout)


def _wait(pk: int, timeout: float) -> dict:
    """Wait until the process ``pk`` is terminated (or ``timeout`` s have passed); what it produced."""
    from aiida import orm
    from aiida.common.links import LinkType

    start = time.monotonic()
    state = None
    while time.monotonic() - start < timeout:
        state, _ = _state(pk)
        if state in ('finished', 'excepted', 'killed'):
            break
        time.sleep(0.5)
    waited = time.monotonic() - start
    node = orm.load_node(pk)
    # a workchain's outputs are its RETURN links (its CALL links name the processes it ran)
    outputs = node.base.links.get_outgoing(link_type=(LinkType.CREATE, LinkType.RETURN)).all_link_labels()
    incoming = {entry.link_label: entry.node for entry in node.base.links.get_incoming().all()}
    # the checkpoint of a dm21.scf CalcJob, of a dm21.scf workchain (namespace scf) or a dm21.train workchain
    checkpoint = next(
        (incoming[k] for k in ('checkpoint', 'scf__checkpoint', 'train__initial_checkpoint') if k in incoming), None
    )
    result = {
        'process_state': state,
        'waited_s': round(waited, 1),
        'exit_status': node.exit_status,
        'exit_message': node.exit_message,
        'outputs': sorted(outputs),
        'storage_backend': node.backend.profile.storage_backend,
        'broker_backend': node.backend.profile.process_control_backend,
        'checkpoint_sha256': checkpoint.weights_sha256 if checkpoint is not None else None,
    }
    if 'output_parameters' in node.outputs:
        parameters = node.outputs.output_parameters.get_dict()
        result['e_tot'] = parameters['e_tot']
        result['converged'] = parameters['converged']
        result['functional_sha256'] = parameters['functional']['weights_sha256']
    return result


def _energy_from_inputs(calc, network) -> float:
    """The core ``KS(mol, network)`` on the molecule and settings of a ``dm21.scf`` node."""
    from pyscf import gto

    from aiida_dm21.functional.scf import KS

    structure = calc.inputs.structure
    parameters = calc.inputs.parameters.get_dict()
    atoms = [(site.kind_name, site.position) for site in structure.sites]
    spin = parameters.get('multiplicity', 1) - 1
    mol = gto.M(atom=atoms, basis=parameters['basis'], charge=parameters.get('charge', 0), spin=spin, unit='Angstrom')
    mol.verbose = 0
    mf = KS(mol, network)
    mf.grids.level = parameters.get('grid_level', 3)
    return float(mf.kernel())


def inspect_import(args) -> dict:
    """What an imported ``dm21.scf`` node looks like in this (fresh) profile."""
    _load()
    from aiida import orm

    calc = orm.load_node(args.uuid)
    checkpoint = calc.inputs.checkpoint
    incoming = {(entry.link_label, entry.node.uuid) for entry in calc.base.links.get_incoming().all()}
    outgoing = {entry.link_label: entry.node.uuid for entry in calc.base.links.get_outgoing().all()}
    content = checkpoint.get_content(mode='rb')
    network = checkpoint.load_network()
    return {
        'n_nodes': orm.QueryBuilder().append(orm.Node).count(),
        'process_type': calc.process_type,
        'exit_status': calc.exit_status,
        'incoming': sorted(incoming),
        'outgoing': outgoing,
        'checkpoint_class': type(checkpoint).__name__,
        'checkpoint_uuid': checkpoint.uuid,
        'checkpoint_attributes': checkpoint.base.attributes.all,
        'checkpoint_file_sha256': hashlib.sha256(content).hexdigest(),
        'n_network_parameters': sum(p.numel() for p in network.parameters()),
        'archived_e_tot': calc.outputs.output_parameters['e_tot'],
        'rerun_e_tot': _energy_from_inputs(calc, network),
    }


# --- Slurm computers (test_slurm.py) --------------------------------------------------------------------------


def slurm_computer(args) -> dict:
    """A ``core.slurm`` computer ``args.label`` and its code ``dm21-python@label`` (both made once)."""
    _load()
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        computer = orm.load_computer(args.label)
    except NotExistent:
        computer = orm.Computer(
            label=args.label,
            hostname='localhost' if args.transport == 'core.local' else '127.0.0.1',
            transport_type=args.transport,
            scheduler_type='core.slurm',
            workdir=args.workdir,
        )
        # the job's own record of where it ran: compared with the job id AiiDA got from sbatch
        computer.set_prepend_text(
            'echo "dm21-slurm-job $SLURM_JOB_ID node=$SLURMD_NODENAME partition=$SLURM_JOB_PARTITION'
            ' account=$SLURM_JOB_ACCOUNT nodes=$SLURM_JOB_NUM_NODES cpus_per_task=$SLURM_CPUS_PER_TASK'
            ' mem=$SLURM_MEM_PER_NODE"'
        )
        computer.store()
        computer.set_default_mpiprocs_per_machine(1)
    if not computer.is_configured:
        if args.transport == 'core.ssh':
            computer.configure(
                username=args.ssh_user,
                port=args.ssh_port,
                key_filename=args.ssh_key,
                look_for_keys=False,
                allow_agent=False,
                key_policy='AutoAddPolicy',
                timeout=30,
                safe_interval=0,
            )
        else:
            computer.configure(safe_interval=0)
    computer.set_minimum_job_poll_interval(0.5)
    code = _slurm_code(computer, 'dm21-python', sys.executable, args.pythonpath)
    with computer.get_transport() as transport:  # the transport works and sees Slurm there
        rc, stdout, stderr = transport.exec_command_wait('sinfo -h -o "%P %t"')
    return {
        'computer': computer.label,
        'transport': computer.transport_type,
        'scheduler': computer.scheduler_type,
        'code': code.full_label,
        'sinfo': [rc, stdout.strip(), stderr.strip()],
    }


def _slurm_code(computer, label: str, executable: str, pythonpath: str):
    """The code ``label@computer`` (made once): ``executable``, with ``pythonpath`` first on ``PYTHONPATH``."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        return orm.load_code(f'{label}@{computer.label}')
    except NotExistent:
        return orm.InstalledCode(
            label=label,
            computer=computer,
            filepath_executable=executable,
            prepend_text=f'export PYTHONPATH={pythonpath}${{PYTHONPATH:+:$PYTHONPATH}}\nexport OMP_NUM_THREADS=1',
        ).store()


def slurm_code(args) -> dict:
    """The code ``args.label`` on the ``core.slurm`` computer ``args.computer``, running ``args.executable``."""
    _load()
    from aiida import orm

    code = _slurm_code(orm.load_computer(args.computer), args.label, args.executable, args.pythonpath)
    return {'code': code.full_label, 'executable': str(code.filepath_executable)}


def _h2():
    return _molecule(H2)


def _molecule(atoms):
    from aiida import orm

    structure = orm.StructureData(pbc=(False, False, False))
    for symbol, position in atoms:
        structure.append_atom(symbols=symbol, position=position)
    return structure


def _calcjobs(node) -> list:
    """What the CalcJobs called by the workchain ``node`` left: job id, scheduler stdout, submit script."""
    from aiida import orm

    jobs = []
    for calc in sorted(node.called_descendants, key=lambda n: n.pk):
        if not isinstance(calc, orm.CalcJobNode):
            continue
        entry = {
            'pk': calc.pk,
            'process_type': calc.process_type,
            'exit_status': calc.exit_status,
            'computer': calc.computer.label,
            'exit_message': calc.exit_message,
            'job_id': calc.get_job_id(),
            'max_wallclock_seconds': calc.get_option('max_wallclock_seconds'),
            'scheduler_stdout': None,
            'scheduler_stderr': None,
            'submit_script': None,
            'remote_path': None,
            # dm21.scf: which density it started from, which it left, what it reported
            'restart_density': calc.inputs.restart_density.uuid if 'restart_density' in calc.inputs else None,
            'output_density': calc.outputs.output_density.uuid if 'output_density' in calc.outputs else None,
            'output_parameters': None,
        }
        if 'output_parameters' in calc.outputs:
            parameters = calc.outputs.output_parameters.get_dict()
            keys = ('e_tot', 'converged', 'cycles', 'restarted', 'error', 'exit_status')
            entry['output_parameters'] = {key: parameters.get(key) for key in keys}
        retrieved = calc.outputs.retrieved if 'retrieved' in calc.outputs else None
        names = retrieved.base.repository.list_object_names() if retrieved is not None else []
        for key, name in (('scheduler_stdout', '_scheduler-stdout.txt'), ('scheduler_stderr', '_scheduler-stderr.txt')):
            if name in names:
                entry[key] = retrieved.base.repository.get_object_content(name)
        if 'remote_folder' in calc.outputs:
            remote = calc.outputs.remote_folder
            entry['remote_path'] = remote.get_remote_path()
            with tempfile.TemporaryDirectory() as folder:  # through the computer's transport, not the local disk
                remote.getfile('_aiidasubmit.sh', os.path.join(folder, 'script'))
                entry['submit_script'] = Path(folder, 'script').read_text()
        jobs.append(entry)
    return jobs


def _submit_and_report(builder, args) -> dict:
    from aiida import orm
    from aiida.engine import submit as submit_process

    node = submit_process(builder)
    result = {'pk': node.pk, 'uuid': node.uuid}
    if args.wait is not None:
        result.update(_wait(node.pk, args.wait))
        node = orm.load_node(node.pk)
        result['calcjobs'] = _calcjobs(node)
        result['report'] = [log.message for log in sorted(orm.Log.collection.get_logs_for(node), key=lambda x: x.time)]
    return result


#: the molecules of ``slurm-scf --molecule``
MOLECULES = {'h2': H2, 'lih': [('Li', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 1.6))]}


def slurm_scf(args) -> dict:
    """The ``dm21.scf`` workchain of ``--molecule`` (H2) in STO-3G (grid ``--grid-level``, and ``--parameters``)
    with the code ``--code`` on computer ``args.computer``."""
    _load()
    from aiida import orm
    from aiida.plugins import DataFactory, WorkflowFactory

    builder = WorkflowFactory('dm21.scf').get_builder()
    builder.scf.code = orm.load_code(f'{args.code}@{args.computer}')
    builder.scf.structure = _molecule(MOLECULES[args.molecule])
    builder.scf.checkpoint = DataFactory('dm21.checkpoint').get_or_create(args.checkpoint)
    parameters = {'basis': 'sto-3g', 'grid_level': args.grid_level, **json.loads(args.parameters)}
    builder.scf.parameters = orm.Dict(parameters)
    builder.scf.metadata.options = json.loads(args.options)
    if args.walltime_factor is not None:
        builder.walltime_factor = orm.Float(args.walltime_factor)
    return _submit_and_report(builder, args)


def slurm_dry_run(args) -> dict:
    """A ``dm21.scf`` CalcJob prepared but not submitted (``dry_run``): its ``_aiidasubmit.sh`` and input."""
    _load()
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.plugins import CalculationFactory, DataFactory

    builder = CalculationFactory('dm21.scf').get_builder()
    builder.code = orm.load_code(f'dm21-python@{args.computer}')
    builder.structure = _h2()
    builder.checkpoint = DataFactory('dm21.checkpoint').get_or_create(args.checkpoint)
    builder.parameters = orm.Dict({'basis': 'sto-3g', 'grid_level': 0, **json.loads(args.parameters)})
    builder.metadata.options = json.loads(args.options)
    builder.metadata.dry_run = True
    builder.metadata.store_provenance = False
    _, node = run_get_node(builder)
    folder = Path(node.dry_run_info['folder'])
    result = {
        'submit_script': (folder / '_aiidasubmit.sh').read_text(),
        'files': sorted(p.name for p in folder.iterdir()),
        'input': json.loads((folder / 'input.json').read_text()) if (folder / 'input.json').is_file() else None,
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


#: the smallest reference set of the test suite (test_training_chain.py): H+ and H, FCI, three systems
REFERENCE_SPECIES = [
    {'label': 'H+', 'atom': 'H 0 0 0', 'charge': 1, 'multiplicity': 1},
    {'label': 'H', 'atom': 'H 0 0 0', 'charge': 0, 'multiplicity': 2},
]


def slurm_reference(args) -> dict:
    """``dm21.reference_data`` on H+ and H (FCI, 6-31G): two ``dm21.reference`` jobs, one dataset."""
    _load()
    from aiida import orm
    from aiida.plugins import WorkflowFactory

    builder = WorkflowFactory('dm21.reference_data').get_builder()
    builder.code = orm.load_code(f'dm21-python@{args.computer}')
    builder.species = orm.List(REFERENCE_SPECIES)
    builder.fractional = orm.Dict({'fractional_charge': [['H+', 'H']], 'fractional_spin': ['H'], 'integer': ['H']})
    builder.reference_method = orm.Str('fci')
    builder.deltas = orm.List([0.5])
    builder.spin_fractions = orm.List([0.5])
    builder.options = orm.Dict(json.loads(args.options))
    result = _submit_and_report(builder, args)
    node = orm.load_node(result['pk'])
    if 'dataset' in node.outputs:
        dataset = node.outputs.dataset
        result['dataset'] = {'pk': dataset.pk, 'n_systems': dataset.n_systems, 'kinds': dataset.kinds}
    return result


def slurm_train(args) -> dict:
    """``dm21.train`` (workchain), one epoch (or ``--parameters``) from DM21 on the dataset ``args.dataset``, with
    the code ``--code``; for each job also what it resumed from and the ``state/state.json`` it left."""
    _load()
    from aiida import orm
    from aiida.plugins import DataFactory, WorkflowFactory

    builder = WorkflowFactory('dm21.train').get_builder()
    builder.train.code = orm.load_code(f'{args.code}@{args.computer}')
    builder.train.datasets = {'hydrogen': orm.load_node(args.dataset)}
    parameters = {'epochs': 1, 'learning_rate': 1e-4, 'grid_level': 0, **json.loads(args.parameters)}
    builder.train.parameters = orm.Dict(parameters)
    builder.train.seed = orm.Int(3)
    builder.train.initial_checkpoint = DataFactory('dm21.checkpoint').get_or_create(args.checkpoint)
    builder.train.metadata.options = json.loads(args.options)
    result = _submit_and_report(builder, args)
    node = orm.load_node(result['pk'])
    if 'checkpoint' in node.outputs:
        result['trained'] = {
            'source': node.outputs.checkpoint.base.attributes.get('source'),
            'weights_sha256': node.outputs.checkpoint.weights_sha256,
            'epochs': [float(x) for x in node.outputs.loss_curves.get_array('epoch')],
            'loss': [float(x) for x in node.outputs.loss_curves.get_array('loss')],
            'wall_s': [float(x) for x in node.outputs.loss_curves.get_array('wall_s')],
        }
    for entry in result.get('calcjobs', []):
        entry.update(_train_job_record(orm.load_node(entry['pk'])))
    return result


def _train_job_record(calc) -> dict:
    """A ``dm21.train`` job: the remote folder it resumed from, what its log says about resuming and stopping, and
    the ``state/state.json`` it left (read through the transport; ``None`` if it saved none)."""
    record = {
        'parent_folder': calc.inputs.parent_folder.uuid if 'parent_folder' in calc.inputs else None,
        'remote_folder': calc.outputs.remote_folder.uuid if 'remote_folder' in calc.outputs else None,
        'log': [],
        'state': None,
    }
    if 'retrieved' in calc.outputs and 'aiida.out' in calc.outputs.retrieved.base.repository.list_object_names():
        text = calc.outputs.retrieved.base.repository.get_object_content('aiida.out')
        record['log'] = [line for line in text.splitlines() if line.startswith(('resumed from', 'stopping', 'epoch'))]
    if 'remote_folder' in calc.outputs:
        with tempfile.TemporaryDirectory() as folder:
            target = os.path.join(folder, 'state.json')
            try:
                calc.outputs.remote_folder.getfile('state/state.json', target)
            except OSError:
                return record
            state = json.loads(Path(target).read_text())
        history = state['history']
        record['state'] = {'epoch': state['epoch'], 'epochs': history['epoch'], 'loss': history['loss'],
                           'wall_s': history['wall_s']}  # fmt: skip
    return record


# --- daemon restarts (test_daemon_restarts.py) ------------------------------------------------------------

#: stretched LiH from the core-Hamiltonian guess with max_cycle 1: the dm21.scf workchain restarts three times
#: (400 with 1, 2 and 4 cycles, then the Newton solver converges), four CalcJobs in sequence (test_scf_workchain.py)
LIH_STRETCHED = [('Li', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 2.4))]


def restart_chain(args) -> dict:
    """Submit the ``dm21.scf`` workchain of stretched LiH that needs four CalcJobs on ``localhost``."""
    _load()
    from aiida import orm
    from aiida.engine import submit as submit_process
    from aiida.plugins import DataFactory, WorkflowFactory

    computer = _localhost()
    structure = orm.StructureData(pbc=(False, False, False))
    for symbol, position in LIH_STRETCHED:
        structure.append_atom(symbols=symbol, position=position)
    builder = WorkflowFactory('dm21.scf').get_builder()
    builder.scf.code = _code(computer)
    builder.scf.structure = structure
    builder.scf.checkpoint = DataFactory('dm21.checkpoint').get_or_create(args.checkpoint)
    builder.scf.parameters = orm.Dict({'basis': 'sto-3g', 'grid_level': 0, 'max_cycle': 1, 'init_guess': '1e'})
    builder.scf.metadata.options.max_wallclock_seconds = 600
    node = submit_process(builder)
    return {'pk': node.pk, 'uuid': node.uuid}


def _chain_calcjobs(pk: int) -> list[dict]:
    """The CalcJobs the workchain ``pk`` called, oldest first, read with a fresh query (the daemon writes them)."""
    from aiida import orm
    from aiida.manage import get_manager

    get_manager().get_profile_storage().get_session().rollback()
    builder = orm.QueryBuilder()
    builder.append(orm.WorkflowNode, filters={'id': pk}, tag='chain')
    builder.append(
        orm.CalcJobNode,
        with_incoming='chain',
        edge_project=['label'],
        project=['id', 'attributes.process_state', 'attributes.state', 'attributes.job_id', 'attributes.exit_status'],
    )
    rows = sorted(builder.all(), key=lambda row: row[0])
    keys = ('pk', 'process_state', 'calc_state', 'job_id', 'exit_status', 'label')
    return [dict(zip(keys, row, strict=True)) for row in rows]


#: the ``CalcJobState`` values of a CalcJob from its job's submission on (a terminated one has none left)
_FROM_SUBMITTED = ('withscheduler', 'retrieving', 'parsing')
_TERMINATED = ('finished', 'excepted', 'killed')


def watch(args) -> dict:
    """Wait until the workchain ``pk`` has called ``--calcjobs`` CalcJobs (and, with ``--submitted``, the last of
    them has its job with the scheduler or is further on), or has terminated; what it looks like then."""
    _load()
    start = time.monotonic()
    while True:
        state, _ = _state(args.pk)
        jobs = _chain_calcjobs(args.pk)
        last = jobs[args.calcjobs - 1] if len(jobs) >= args.calcjobs else None
        reached = last is not None and (
            not args.submitted or last['calc_state'] in _FROM_SUBMITTED or last['process_state'] in _TERMINATED
        )
        terminated = state in _TERMINATED
        if reached or terminated or time.monotonic() - start > args.timeout:
            return {'reached': reached, 'process_state': state, 'waited_s': round(time.monotonic() - start, 1),
                    'calcjobs': jobs}  # fmt: skip
        time.sleep(0.1)


def chain_summary(args) -> dict:
    """Wait for the workchain ``pk`` (as ``wait``), then each CalcJob of it and of the whole profile: its call
    label, states, job id, parameters, energy, and which density it restarted from."""
    _load()
    from aiida import orm

    result = _wait(args.pk, args.timeout)
    node = orm.load_node(args.pk)
    jobs = []
    for entry in _chain_calcjobs(args.pk):
        calc = orm.load_node(entry['pk'])
        parameters = calc.outputs.output_parameters.get_dict() if 'output_parameters' in calc.outputs else {}
        restart = calc.inputs.restart_density.uuid if 'restart_density' in calc.inputs else None
        density = calc.outputs.output_density.uuid if 'output_density' in calc.outputs else None
        entry.update(
            uuid=calc.uuid,
            is_finished_ok=calc.is_finished_ok,
            inputs=calc.inputs.parameters.get_dict(),
            e_tot=parameters.get('e_tot'),
            cycles=parameters.get('cycles'),
            converged=parameters.get('converged'),
            restart_density=restart,
            output_density=density,
            remote_path=calc.outputs.remote_folder.get_remote_path() if 'remote_folder' in calc.outputs else None,
        )
        jobs.append(entry)
    logs = sorted(orm.Log.collection.get_logs_for(node), key=lambda log: log.time)
    result.update(
        calcjobs=jobs,
        n_calcjobs_in_profile=orm.QueryBuilder().append(orm.CalcJobNode).count(),
        n_workflows_in_profile=orm.QueryBuilder().append(orm.WorkflowNode).count(),
        report=[log.message for log in logs],
        output_density=node.outputs.output_density.uuid if 'output_density' in node.outputs else None,
    )
    return result


# --- the test side: a private AIIDA_PATH driven through subprocesses ---------------------------------------


class IsolatedAiida:
    """A private ``AIIDA_PATH`` (``root``) whose profile ``profile`` is used only through subprocesses.

    ``verdi`` runs as ``python -m aiida`` with this Python; ``PATH`` starts with this Python's folder so that the
    daemon (which launches ``verdi`` workers by name) uses the same environment.  ``AIIDA_PROFILE`` of the caller
    is dropped: the subprocesses see only ``root``'s configuration, never the in-process test profile.
    """

    def __init__(self, root: Path, profile: str) -> None:
        self.root = Path(root)
        self.profile = profile
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {key: value for key, value in os.environ.items() if key not in ('AIIDA_PATH', 'AIIDA_PROFILE')}
        self.env['AIIDA_PATH'] = str(self.root)
        self.env['PATH'] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get('PATH', '')])
        self.env['PYTHONUNBUFFERED'] = '1'
        self.timings: list[tuple[str, float]] = []  # (command, seconds), for the record
        self._processes: list = []  # psutil processes of the daemons started here
        self._sockets: set[Path] = set()  # their circus socket folders

    @property
    def config_dir(self) -> Path:
        return self.root / '.aiida'

    def run(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )
        label = ' '.join(args).replace(str(Path(__file__).resolve()), 'backend_driver.py')
        self.timings.append((label, round(time.monotonic() - start, 1)))
        if check and done.returncode != 0:
            raise AssertionError(
                f'`{" ".join(args)}` failed ({done.returncode})\n--- stdout\n{done.stdout[-3000:]}'
                f'\n--- stderr\n{done.stderr[-3000:]}\n{self.logs()}'
            )
        return done

    def verdi(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        return self.run('-m', 'aiida', *args, timeout=timeout, check=check)

    def driver(self, *args: str, timeout: float = 300) -> dict:
        """Run a command of this driver in the profile; its JSON answer."""
        done = self.run(str(Path(__file__).resolve()), *args, timeout=timeout)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def logs(self, tail: int = 4000) -> str:
        """The last lines of the daemon's logs (for failure messages)."""
        parts = []
        for path in sorted((self.config_dir / 'daemon' / 'log').glob('*.log')):
            parts.append(f'--- {path.name}\n{path.read_text(errors="replace")[-tail:]}')
        return '\n'.join(parts)

    def setup_psql_rabbitmq(self, services: dict) -> None:
        """``verdi profile setup core.psql_dos`` with RabbitMQ: the database and user ``services['name']``
        (``services['password']``) at :data:`PG`, the broker at :data:`RABBITMQ`, vhost ``services['vhost']``
        (the default one if empty); the ``services`` fixture of ``conftest.py`` makes them."""
        self.verdi(
            'profile', 'setup', 'core.psql_dos', '--non-interactive', '--profile-name', self.profile,
            '--set-as-default', '--email', 'dm21@test', '--first-name', 'DM21', '--last-name', 'Test',
            '--institution', 'aiida-dm21', '--database-hostname', PG['host'], '--database-port', str(PG['port']),
            '--database-username', services['name'], '--database-password', services['password'],
            '--database-name', services['name'], '--repository-uri', (self.root / 'repository').as_uri(),
            '--broker', 'core.rabbitmq',
        )  # fmt: skip
        if services['vhost']:  # `--broker core.rabbitmq` above took the defaults (guest@127.0.0.1:5672, vhost '/')
            self.verdi(
                'profile', 'configure-broker', 'core.rabbitmq', self.profile, '--non-interactive', '--force',
                '--broker-protocol', 'amqp', '--broker-username', 'guest', '--broker-password', 'guest',
                '--broker-host', RABBITMQ[0], '--broker-port', str(RABBITMQ[1]),
                '--broker-virtual-host', services['vhost'],
            )  # fmt: skip

    def setup_sqlite_zeromq(self) -> None:
        """``verdi presto --use-zeromq``: ``core.sqlite_dos`` storage, the ZeroMQ broker run inside the daemon."""
        self.verdi(
            'presto', '--non-interactive', '--use-zeromq', '--profile-name', self.profile, '--email', 'dm21@test'
        )

    # --- the daemon --------------------------------------------------------------------------------------------

    def _daemon_processes(self, recursive: bool = True) -> list:
        """The circus process of this profile's daemon and its descendants (workers, ZeroMQ broker), or only its
        children with ``recursive=False``."""
        try:
            import psutil
        except ImportError:  # pragma: no cover (circus, hence aiida-core, depends on psutil)
            return []
        pid_file = self.config_dir / 'daemon' / f'circus-{self.profile}.pid'
        try:
            circus = psutil.Process(int(pid_file.read_text().strip()))
            return [circus, *circus.children(recursive=recursive)]
        except (OSError, ValueError, psutil.Error):
            return []

    def _remember(self) -> None:
        """Record the daemon's processes and its circus socket folder, to end and remove them in the end."""
        self._processes += [p for p in self._daemon_processes() if p not in self._processes]
        sockets_file = self.config_dir / 'daemon' / f'circus-{self.profile}.sockets'
        if sockets_file.is_file():
            self._sockets.add(Path(sockets_file.read_text().strip()))

    def start_daemon(self, workers: int = 1) -> float:
        """``verdi daemon start``; the seconds it took."""
        start = time.monotonic()
        self.verdi('-p', self.profile, 'daemon', 'start', '--timeout', '60', str(workers), timeout=120)
        elapsed = time.monotonic() - start
        self._remember()
        return elapsed

    def daemon_workers(self) -> list:
        """The ``psutil`` processes of the daemon's workers (the children of circus that run ``daemon worker``)."""
        return [p for p in self._daemon_processes(recursive=False)[1:] if 'worker' in p.cmdline()]

    def kill_daemon(self) -> list[int]:
        """A crash of the daemon: SIGKILL to circus, then at once to its children (the workers, a ZeroMQ broker), so
        that no shutdown code runs; returns their PIDs once all are gone.  The jobs of the ``core.direct`` scheduler
        are not children of circus (their shell has exited): they keep running, as on a cluster."""
        import psutil

        self._remember()
        processes = self._daemon_processes(recursive=False)
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        _, alive = psutil.wait_procs(processes, timeout=30)
        if alive:
            raise AssertionError(f'daemon processes survived SIGKILL: {alive}')
        return [p.pid for p in processes]

    def stop_daemon(self) -> None:
        """``verdi daemon stop``; then end any process of this daemon still alive (by PID, recorded while it ran) and
        remove the circus socket folders (they live in a temporary folder outside ``AIIDA_PATH``, path length)."""
        self._remember()
        self.verdi('-p', self.profile, 'daemon', 'stop', '--timeout', '60', timeout=120, check=False)
        _end_processes(self._processes)
        self._processes = []
        for sockets in self._sockets:
            if sockets.parent == Path(tempfile.gettempdir()):
                shutil.rmtree(sockets, ignore_errors=True)
        self._sockets = set()

    @contextlib.contextmanager
    def daemon(self, workers: int = 1) -> t.Iterator[float]:
        """``verdi daemon start``; yields the seconds it took.  Always :meth:`stop_daemon` on exit, also after
        :meth:`kill_daemon` and :meth:`start_daemon` inside."""
        try:
            yield self.start_daemon(workers)
        finally:
            self.stop_daemon()


def _end_processes(processes: list, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the given ``psutil`` processes that are still running (ours: the test's daemon)."""
    if not processes:
        return
    import psutil

    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    one = commands.add_parser('submit')
    one.add_argument('--checkpoint', required=True)
    one.add_argument('--grid-level', type=int, default=0)
    one.add_argument('--wait', type=float, metavar='TIMEOUT', help='then wait for the process, as `wait` does')
    one.set_defaults(func=submit)
    one = commands.add_parser('wait')
    one.add_argument('--pk', type=int, required=True)
    one.add_argument('--timeout', type=float, default=90.0)
    one.set_defaults(func=wait)
    one = commands.add_parser('inspect-import')
    one.add_argument('--uuid', required=True)
    one.set_defaults(func=inspect_import)
    one = commands.add_parser('slurm-computer')
    one.add_argument('--label', required=True)
    one.add_argument('--transport', choices=['core.local', 'core.ssh'], required=True)
    one.add_argument('--workdir', required=True)
    one.add_argument('--pythonpath', required=True, help='put first on PYTHONPATH of the jobs (the repository)')
    one.add_argument('--ssh-port', type=int, default=22)
    one.add_argument('--ssh-key')
    one.add_argument('--ssh-user', default='root')
    one.set_defaults(func=slurm_computer)
    for name, func in (('slurm-scf', slurm_scf), ('slurm-reference', slurm_reference), ('slurm-train', slurm_train)):
        one = commands.add_parser(name)
        one.add_argument('--computer', required=True)
        one.add_argument('--options', required=True, help='metadata.options (JSON)')
        one.add_argument('--wait', type=float, metavar='TIMEOUT', help='then wait for the process, as `wait` does')
        if name != 'slurm-reference':
            one.add_argument('--checkpoint', required=True)
        one.add_argument('--grid-level', type=int, default=0)
        one.add_argument('--dataset', type=int)
        if name == 'slurm-scf':
            one.add_argument('--code', default='dm21-python', help='the label of the code on --computer')
            one.add_argument('--molecule', choices=sorted(MOLECULES), default='h2')
            one.add_argument('--parameters', default='{}', help='over {basis: sto-3g, grid_level} (JSON)')
            one.add_argument('--walltime-factor', type=float, help="the workchain's walltime_factor")
        if name == 'slurm-train':
            one.add_argument('--code', default='dm21-python', help='the label of the code on --computer')
            one.add_argument('--parameters', default='{}', help='over {epochs: 1, learning_rate, grid_level} (JSON)')
        one.set_defaults(func=func)
    one = commands.add_parser('slurm-code')
    one.add_argument('--computer', required=True)
    one.add_argument('--label', required=True)
    one.add_argument('--executable', required=True, help='absolute path on the computer')
    one.add_argument('--pythonpath', required=True, help='put first on PYTHONPATH of the jobs (the repository)')
    one.set_defaults(func=slurm_code)
    one = commands.add_parser('restart-chain')
    one.add_argument('--checkpoint', required=True)
    one.set_defaults(func=restart_chain)
    one = commands.add_parser('watch')
    one.add_argument('--pk', type=int, required=True)
    one.add_argument('--calcjobs', type=int, required=True, help='wait until the workchain called this many')
    one.add_argument('--submitted', action='store_true', help='... and the last of them has its job submitted')
    one.add_argument('--timeout', type=float, default=120.0)
    one.set_defaults(func=watch)
    one = commands.add_parser('chain-summary')
    one.add_argument('--pk', type=int, required=True)
    one.add_argument('--timeout', type=float, default=240.0)
    one.set_defaults(func=chain_summary)
    one = commands.add_parser('slurm-dry-run')
    one.add_argument('--computer', required=True)
    one.add_argument('--checkpoint', required=True)
    one.add_argument('--options', required=True, help='metadata.options (JSON)')
    one.add_argument('--parameters', default='{}', help='over {basis: sto-3g, grid_level: 0} (JSON)')
    one.set_defaults(func=slurm_dry_run)
    args = parser.parse_args(argv)
    result = args.func(args)
    print(json.dumps(result, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
