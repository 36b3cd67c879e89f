"""The AiiDA commands of ``aiida-dm21`` (``scf launch``, ``pipeline launch``, ``checkpoint list|show|export``,
``weights --store``) and ``verdi data dm21.checkpoint``, with click's CliRunner inside the test profile that the
fixtures loaded.

One real run (H2, STO-3G, grid level 0); every other case fails before anything is stored or run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

pytest.importorskip('aiida.engine')

from aiida import orm

from aiida_dm21.cli.scf import resolve_structure

pytestmark = pytest.mark.aiida


@pytest.fixture
def dm21_installed(dm21_checkpoint_file, monkeypatch):
    """The weights folder holds DM21 (so ``--functional DM21`` resolves by name)."""
    monkeypatch.setenv('AIIDA_DM21_WEIGHTS_DIR', str(dm21_checkpoint_file.parent))
    return dm21_checkpoint_file


def last_workchain() -> orm.WorkChainNode | None:
    builder = orm.QueryBuilder().append(orm.WorkChainNode, tag='wc').order_by({'wc': {'id': 'desc'}}).limit(1)
    found = builder.first()
    return found[0] if found else None


# --- scf launch -------------------------------------------------------------------------------------------


def test_scf_launch_runs_in_process(cli, dm21_installed, python_code, checkpoint_node):
    result = cli(
        'scf', 'launch', 'h2', '--functional', 'DM21', '--basis', 'sto-3g', '--grid-level', 0,
        '--protocol', 'fast', '--code', python_code.pk,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    node = last_workchain()
    assert node is not None and node.is_finished_ok
    assert node.process_label == 'DM21ScfWorkChain'
    energy = node.outputs.output_parameters['e_tot']
    assert -1.3 < energy < -1.0
    assert f'dm21.scf<{node.pk}> DM21/sto-3g H2 (fast): E = {energy:.10f} Ha' in result.stdout
    scf = node.inputs.scf
    assert scf.checkpoint.pk == checkpoint_node.pk  # the installed file resolved to the stored node (same weights)
    assert scf.parameters['grid_level'] == 0 and scf.parameters['conv_tol'] == 1e-5  # --grid-level over `fast`


@pytest.mark.parametrize(
    ('args', 'message'),
    [
        (['unobtainium'], "unknown structure 'unobtainium': not a molecule name (water, h2"),
        (['h2', '--functional', '999999'], "no checkpoint node '999999'"),
        (['h2', '--functional', 'DM99'], "functional 'DM99' is not installed"),
        (['h2', '--functional', 'missing.safetensors'], 'does not exist'),
        (['h2', '--protocol', 'ultra'], "unknown protocol 'ultra'; available protocols: fast, balanced, stringent"),
        (['h2', '--multiplicity', '2', '--basis', 'sto-3g'], 'the inputs were refused'),
        (['h2', '--basis', 'no-such-basis'], "basis 'no-such-basis' cannot be used"),
        (['h2', '--code', 'no-such-code'], "no code 'no-such-code'"),
    ],
)
def test_scf_launch_bad_input(cli, dm21_installed, python_code, count_nodes, args, message):
    before = count_nodes()
    extra = [] if '--code' in args else ['--code', python_code.pk]
    result = cli('scf', 'launch', *args, *extra)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert 'Traceback' not in result.output
    if 'DM99' in args or '999999' in args or 'unobtainium' in args:
        assert count_nodes() == before


def test_scf_launch_structure_pk_of_another_type(cli, dm21_installed, checkpoint_node):
    result = cli('scf', 'launch', checkpoint_node.pk)
    assert result.exit_code == 1
    assert f'node {checkpoint_node.pk} is a DM21CheckpointData, not a StructureData' in result.output


def test_scf_launch_daemon_needs_a_broker(cli, dm21_installed, python_code, count_nodes):
    """The test profile has no broker: a clear error, and no workchain node left behind."""
    workchains = orm.QueryBuilder().append(orm.WorkChainNode).count()
    result = cli('scf', 'launch', 'h2', '--basis', 'sto-3g', '--daemon', '--code', python_code.pk)
    assert result.exit_code == 1
    assert 'cannot submit to the daemon' in result.output and 'run without --daemon' in result.output
    assert orm.QueryBuilder().append(orm.WorkChainNode).count() == workchains


def test_resolve_structure(tmp_path, make_structure):
    water, multiplicity = resolve_structure('Water')
    assert water.get_formula() == 'H2O' and multiplicity == 1 and not any(water.pbc)
    assert resolve_structure('h')[1] == 2
    xyz = tmp_path / 'lih.xyz'
    xyz.write_text('2\nlithium hydride\nLi 0 0 0\nh 0 0 1.6\n')
    lih, multiplicity = resolve_structure(str(xyz))
    assert lih.get_formula() == 'HLi' and multiplicity is None
    assert lih.sites[1].position == (0.0, 0.0, 1.6)
    stored = make_structure([('H', (0.0, 0.0, 0.0))]).store()
    assert resolve_structure(str(stored.pk))[0].uuid == stored.uuid
    xyz.write_text('Li 0 0\n')
    with pytest.raises(click.ClickException, match='atom line 1'):
        resolve_structure(str(xyz))


# --- pipeline launch --------------------------------------------------------------------------------------


def test_pipeline_launch_help(cli):
    result = cli('pipeline', 'launch', '--help')
    assert result.exit_code == 0, result.output
    for option in ('--code', '--train-code', '--daemon', '--walltime [STEP=]SECONDS', '--queue [STEP=]NAME'):
        assert option in result.output
    assert 'STEP=VALUE for one of reference, train, scf' in result.output


def test_pipeline_launch_builds_per_step_options(cli, python_code, monkeypatch):
    """Values for every step, then a step's own: what the pipeline gets (the submission itself is replaced)."""
    from aiida_dm21.cli import pipeline as pipeline_cli

    submitted: dict = {}
    monkeypatch.setattr(pipeline_cli, 'submit_to_daemon', lambda builder, *_: submitted.update(builder=builder))
    result = cli(
        'pipeline', 'launch', '--code', python_code.pk, '--daemon', '--epochs', 2,
        '--walltime', 3600, '--walltime', 'train=86400', '--queue', 'short', '--queue', 'train=gpu',
        '--account', 'scf=proj42', '--num-mpiprocs', 'train=4',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    builder = submitted['builder']
    assert builder.code.pk == python_code.pk and 'train_code' not in builder
    assert builder.training.get_dict() == {'epochs': 2, 'learning_rate': 1e-4}
    assert builder.reference_options.get_dict() == {'max_wallclock_seconds': 3600, 'queue_name': 'short'}
    assert builder.train_options.get_dict() == {
        'max_wallclock_seconds': 86400,
        'queue_name': 'gpu',
        'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 4},
    }
    assert builder.scf_options.get_dict() == {'max_wallclock_seconds': 3600, 'queue_name': 'short', 'account': 'proj42'}


@pytest.mark.parametrize(
    ('args', 'exit_code', 'message'),
    [
        (['--walltime', 'relax=60'], 2, "unknown step 'relax' in 'relax=60'; steps: reference, train, scf"),
        (['--walltime', 'train=0'], 2, '0 is not in the range x>=1'),
        (['--train-set', 'no_such_set'], 1, "the inputs were refused: `train_set`: unknown set 'no_such_set'"),
        (['--scf-code', 'no-such-code'], 1, "no code 'no-such-code'"),
    ],
)
def test_pipeline_launch_bad_input(cli, python_code, count_nodes, args, exit_code, message):
    before = count_nodes()
    result = cli('pipeline', 'launch', '--code', python_code.pk, *args)
    assert result.exit_code == exit_code, result.output
    assert message in result.output
    assert 'Traceback' not in result.output
    assert count_nodes() == before


def test_pipeline_launch_daemon_needs_a_broker(cli, python_code):
    """The test profile has no broker: a clear error, and no workchain node left behind."""
    workchains = orm.QueryBuilder().append(orm.WorkChainNode).count()
    result = cli('pipeline', 'launch', '--code', python_code.pk, '--walltime', 600, '--daemon')
    assert result.exit_code == 1
    assert 'cannot submit to the daemon' in result.output and 'run without --daemon' in result.output
    assert orm.QueryBuilder().append(orm.WorkChainNode).count() == workchains


def test_pipeline_launch_foreground_reports_a_failed_step(cli, python_code, aiida_code_installed):
    """In this process, with a reference code that fails every job: exit 401 from the pipeline, said in one line."""
    broken = aiida_code_installed(label='no-python', filepath_executable='/bin/false')
    result = cli(
        'pipeline', 'launch', '--code', python_code.pk, '--reference-code', broken.pk, '--walltime', 'reference=120'
    )
    assert result.exit_code == 1, result.output
    node = last_workchain()
    while node is not None and node.caller is not None:
        node = node.caller
    assert node is not None and node.process_label == 'PipelineWorkChain' and node.exit_status == 401
    assert f'dm21.pipeline<{node.pk}> failed: exit 401 The reference data workchain failed.' in result.output
    references = [job for child in node.called for job in child.called]
    assert references and all(job.inputs.code.pk == broken.pk for job in references)
    assert all(job.get_option('max_wallclock_seconds') == 120 for job in references)
    assert not any(child.process_label == 'DM21TrainWorkChain' for child in node.called)


# --- checkpoint list | show | export -----------------------------------------------------------------------


def test_checkpoint_list_show_export(cli, checkpoint_node, tmp_path):
    result = cli('checkpoint', 'list')
    assert result.exit_code == 0, result.output
    assert str(checkpoint_node.pk) in result.output and 'deepmind:DM21' in result.output
    assert checkpoint_node.weights_sha256[:12] in result.output
    result = cli('checkpoint', 'show', checkpoint_node.uuid)
    assert result.exit_code == 0, result.output
    assert 'weights_sha256' in result.output and 'n_parameters' in result.output
    target = tmp_path / 'copy.safetensors'
    result = cli('checkpoint', 'export', checkpoint_node.pk, target)
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == checkpoint_node.get_content('rb')
    result = cli('checkpoint', 'export', checkpoint_node.pk, target)
    assert result.exit_code == 1 and 'exists: use --overwrite' in result.output
    assert cli('checkpoint', 'export', checkpoint_node.pk, target, '--overwrite').exit_code == 0
    result = cli('checkpoint', 'export', checkpoint_node.pk, tmp_path)  # a folder: the node's file name
    assert result.exit_code == 0 and (tmp_path / checkpoint_node.filename).is_file()


def test_checkpoint_show_errors(cli, checkpoint_node):
    result = cli('checkpoint', 'show', 999999)
    assert result.exit_code == 1 and "no checkpoint node '999999'" in result.output
    other = orm.Int(1).store()
    result = cli('checkpoint', 'show', other.pk)
    assert result.exit_code == 1 and f'node {other.pk} is a Int, not a dm21.checkpoint' in result.output


@pytest.fixture
def restore_aiida_logging():
    """verdi's verbosity option reconfigures logging for the command line (no database handler): put the
    test session's configuration back, or later processes' reports would no longer be stored as logs."""
    yield
    from aiida.common.log import configure_logging

    configure_logging(with_orm=True)


def test_verdi_data_dm21_checkpoint(checkpoint_node, tmp_path, restore_aiida_logging):
    from aiida.cmdline.commands.cmd_data import verdi_data

    group = verdi_data.get_command(click.Context(verdi_data), 'dm21.checkpoint')  # found through the entry point
    assert group is not None and set(group.list_commands(click.Context(group))) == {'list', 'show', 'export'}
    runner = CliRunner()
    result = runner.invoke(group, ['list'])
    assert result.exit_code == 0 and 'deepmind:DM21' in result.output, result.output
    result = runner.invoke(group, ['show', str(checkpoint_node.pk)])
    assert result.exit_code == 0 and checkpoint_node.uuid in result.output, result.output
    result = runner.invoke(group, ['export', str(checkpoint_node.pk), str(tmp_path / 'v.safetensors')])
    assert result.exit_code == 0 and (tmp_path / 'v.safetensors').read_bytes() == checkpoint_node.get_content('rb')
    result = runner.invoke(group, ['export', str(checkpoint_node.pk), str(tmp_path / 'v.safetensors')])
    assert result.exit_code != 0 and 'exists: use --overwrite' in result.output
    result = runner.invoke(group, ['show', str(orm.Int(2).store().pk)])
    assert result.exit_code != 0


# --- weights import --store / --no-store ---------------------------------------------------------------------


def test_weights_import_stores_in_the_loaded_profile(cli, upstream_dir, tmp_path, checkpoint_node):
    result = cli('weights', 'import', upstream_dir / 'DM21', '--dest', tmp_path)
    assert result.exit_code == 0, result.output
    assert f'already stored as dm21.checkpoint<{checkpoint_node.pk}>' in result.output  # same weights: no new node
    result = cli('weights', 'import', upstream_dir / 'DM21', '--dest', tmp_path, '--store', '-p', 'no-such-profile')
    assert result.exit_code == 1 and 'cannot store the checkpoints in AiiDA' in result.output


def test_weights_import_no_store_needs_no_profile(upstream_dir, tmp_path):
    """``--no-store`` in a fresh process with an empty AiiDA folder: files only, AiiDA never imported."""
    env = {**os.environ, 'AIIDA_PATH': str(tmp_path / 'aiida')}
    (tmp_path / 'aiida').mkdir()
    command = [sys.executable, '-m', 'aiida_dm21', 'weights', 'import', str(upstream_dir / 'DM21')]
    done = subprocess.run(
        [*command, '--dest', str(tmp_path / 'w'), '--no-store'], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / 'w' / 'DM21.safetensors').is_file()
    assert 'stored' not in done.stdout + done.stderr
    assert not (tmp_path / 'aiida' / '.aiida').exists(), 'AiiDA was imported (it creates its folder)'
