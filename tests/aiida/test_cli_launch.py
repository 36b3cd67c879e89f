"""``aiida-dm21 reference launch``, ``aiida-dm21 train launch`` and ``verdi data dm21.dataset``, with click's
CliRunner inside the test profile that the fixtures loaded.

Real runs: the smallest built-in set (demo_heldout: Li+ and Li, FCI) in STO-3G through ``reference launch``,
then ``verdi data dm21.dataset list|show`` on the dataset it made; one epoch of ``train launch`` on an H dataset.
Every other case is refused before anything is stored or run, each checked with the exact input it refuses.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip('aiida.engine')

from aiida import orm

pytestmark = pytest.mark.aiida


@pytest.fixture
def h_dataset(tmp_path):
    """A stored dm21.dataset of real H/STO-3G FCI systems (integer and fractional spin)."""
    from aiida_dm21.data.dataset import DM21DatasetData
    from aiida_dm21.reference.dataset import save_dataset
    from aiida_dm21.reference.fractional import fractional_spin_systems, integer_system
    from aiida_dm21.reference.integer import IntegerSpec, run_integer_system

    h = run_integer_system(IntegerSpec(atom='H 0 0 0', basis='sto-3g', spin=1, reference_method='fci', label='H'))
    path = tmp_path / 'h.npz'
    save_dataset(path, [integer_system(h), *fractional_spin_systems(h, (0.5,))])
    return DM21DatasetData(file=path).store()


@pytest.fixture
def restore_aiida_logging():
    """verdi's verbosity option reconfigures logging for the command line: put the test session's back."""
    yield
    from aiida.common.log import configure_logging

    configure_logging(with_orm=True)


def workchains() -> int:
    return orm.QueryBuilder().append(orm.WorkChainNode).count()


def dataset_group():
    from aiida.cmdline.commands.cmd_data import verdi_data

    from aiida_dm21.cli.verdi_data import dataset_data

    return verdi_data, dataset_data


# --- --help ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('args', 'expected'),
    [
        (
            ['reference', 'launch', '--help'],
            ['SET_NAME', 'demo_heldout', '--basis', '--walltime', '--daemon', '--batch-size', '--max-retries'],
        ),
        (['train', 'launch', '--help'], ['DATASETS...', '--epochs', '--learning-rate', '--initial-checkpoint']),
        (['reference', '--help'], ['launch']),
        (['train', '--help'], ['launch']),
    ],
)
def test_help(cli, args, expected):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output


def test_verdi_data_dm21_dataset_help(restore_aiida_logging):
    _, group = dataset_group()
    runner = CliRunner()
    result = runner.invoke(group, ['--help'])
    assert result.exit_code == 0 and 'list' in result.output and 'show' in result.output, result.output
    for command in ('list', 'show'):
        result = runner.invoke(group, [command, '--help'])
        assert result.exit_code == 0, result.output


# --- reference launch: refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('args', 'status', 'message'),
    [
        (['no_such_set'], 2, "Invalid value for 'SET_NAME': 'no_such_set' is not one of 'demo_train'"),
        (
            ['demo_heldout', '--code', 'no-such-code'],
            2,
            "Invalid value for '--code': no Code found with LABEL<no-such-code>",
        ),
        (['demo_heldout', '--walltime', '-5'], 2, "Invalid value for '--walltime': -5 is not in the range x>=1"),
        (['demo_heldout', '--walltime', '0'], 2, "Invalid value for '--walltime': 0 is not in the range x>=1"),
        (['demo_heldout', '--num-cores', '0'], 2, "Invalid value for '--num-cores': 0 is not in the range x>=1"),
        (['demo_heldout', '--reference-method', 'mp2'], 2, "Invalid value for '--reference-method': 'mp2'"),
        (['demo_heldout', '--batch-size', '0'], 2, "Invalid value for '--batch-size': 0 is not in the range x>=1"),
        (
            ['demo_heldout', '--max-concurrent', '0'],
            2,
            "Invalid value for '--max-concurrent': 0 is not in the range x>=1",
        ),
        (
            ['demo_heldout', '--max-retries', '-1'],
            2,
            "Invalid value for '--max-retries': -1 is not in the range x>=0",
        ),
        (['demo_heldout', '--batch-size', 'two'], 2, "Invalid value for '--batch-size': 'two' is not a valid integer"),
        (['demo_heldout', '--basis', 'no-such-basis'], 1, "the inputs were refused: species 'Li+'"),
        (
            ['demo_heldout', '--reference-basis', 'no-such-basis'],
            1,
            "the inputs were refused: species 'Li+': cannot build 'Li 0 0 0'/no-such-basis",
        ),
    ],
)
def test_reference_launch_refuses(cli, python_code, count_nodes, args, status, message):
    before = count_nodes()
    extra = [] if '--code' in args else ['--code', python_code.pk]
    result = cli('reference', 'launch', *args, *extra)
    assert result.exit_code == status, result.output
    assert message in result.output
    assert 'Traceback' not in result.output
    assert count_nodes() == before


def test_reference_launch_passes_the_reference_basis(cli, python_code, monkeypatch):
    import aiida_dm21.cli.reference as reference_cli

    captured = {}
    monkeypatch.setattr(
        reference_cli, 'submit_to_daemon', lambda builder, *rest: captured.update(builder=builder, what=rest)
    )
    args = ['demo_heldout', '-b', 'sto-3g', '--reference-basis', 'cc-pvdz', '--daemon', '--code', python_code.pk]
    result = cli('reference', 'launch', *args)
    assert result.exit_code == 0, result.output
    assert captured['builder'].reference_basis.value == 'cc-pvdz'
    assert 'fci/cc-pvdz' in captured['what'][1]


@pytest.mark.parametrize(
    ('args', 'given', 'inputs'),
    [
        (
            ['--batch-size', 2, '--max-concurrent', 3, '--max-retries', 0],
            {'batch_size': 2, 'max_concurrent': 3, 'max_retries': 0},
            {'batch_size': 2, 'max_concurrent': 3, 'max_retries': 0},
        ),
        (['--max-retries', 4], {'max_retries': 4}, {'batch_size': 1, 'max_retries': 4}),
        ([], {}, {'batch_size': 1, 'max_retries': 1}),  # the workchain's defaults; no max_concurrent: all at once
    ],
)
def test_reference_launch_passes_the_batching_inputs(cli, python_code, count_nodes, monkeypatch, args, given, inputs):
    """--batch-size, --max-concurrent and --max-retries reach the builder, and the process inputs made from it."""
    import aiida_dm21.cli.reference as reference_cli
    from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain

    captured = {}
    monkeypatch.setattr(reference_cli, 'submit_to_daemon', lambda builder, *_: captured.update(builder=builder))
    before = count_nodes()
    result = cli('reference', 'launch', 'demo_heldout', '-b', 'sto-3g', *args, '--daemon', '--code', python_code.pk)
    assert result.exit_code == 0, result.output
    assert count_nodes() == before  # the (faked) submission is the first thing that would store anything
    builder = captured['builder']
    names = ('batch_size', 'max_concurrent', 'max_retries')
    assert {name: builder[name].value for name in names if name in builder} == given
    spec = ReferenceDataWorkChain.spec().inputs
    processed = spec.pre_process({key: builder[key] for key in builder if key != 'metadata'})  # + the defaults
    assert spec.validate(processed) is None
    assert {name: processed[name].value for name in names if name in processed} == inputs


def test_reference_launch_daemon_needs_a_broker(cli, python_code):
    """The test profile has no broker: a clear error, and no workchain node left behind."""
    before = workchains()
    result = cli('reference', 'launch', 'demo_heldout', '--basis', 'sto-3g', '--daemon', '--code', python_code.pk)
    assert result.exit_code == 1, result.output
    assert 'cannot submit to the daemon' in result.output and 'run without --daemon' in result.output
    assert workchains() == before


# --- train launch: refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('args', 'status', 'message'),
    [
        (['999999'], 2, "Invalid value for 'DATASETS...': no DM21DatasetData found with ID<999999>"),
        (
            ['{dataset}', '--heldout', '999999'],
            2,
            "Invalid value for '--heldout': no DM21DatasetData found with ID<999999>",
        ),
        (
            ['{dataset}', '--code', 'no-such-code'],
            2,
            "Invalid value for '--code': no Code found with LABEL<no-such-code>",
        ),
        (['{dataset}', '--walltime', '-5'], 2, "Invalid value for '--walltime': -5 is not in the range x>=1"),
        (['{dataset}', '--epochs', '0'], 2, "Invalid value for '--epochs': 0 is not in the range x>=1"),
        (['{dataset}', '--lr', '-1'], 1, '`learning_rate` must be a finite number > 0, got -1.0'),
        (['{dataset}', '--lr', 'nan'], 1, '`learning_rate` must be a finite number > 0, got nan'),
        (['{dataset}', '--name', ''], 1, "`name` must be a non-empty string, got ''"),
        (['{dataset}', '--device', 'gpu'], 1, 'the training parameters were refused'),
        (['{dataset}', '--initial-checkpoint', 'DM99'], 1, "functional 'DM99' is not installed"),
        (['{dataset}', '--initial-checkpoint', '999999'], 1, "no checkpoint node '999999'"),
        (['{dataset}', '--heldout', '{dataset}'], 1, 'cannot be both trained on and held out'),
    ],
)
def test_train_launch_refuses(cli, python_code, h_dataset, count_nodes, args, status, message, tmp_path, monkeypatch):
    monkeypatch.setenv('AIIDA_DM21_WEIGHTS_DIR', str(tmp_path))  # no installed weights: DM99 is not there
    before = count_nodes()
    args = [arg.format(dataset=h_dataset.pk) for arg in args]
    extra = [] if '--code' in args else ['--code', python_code.pk]
    result = cli('train', 'launch', *args, *extra)
    assert result.exit_code == status, result.output
    assert message in result.output
    assert 'Traceback' not in result.output
    assert count_nodes() == before


def test_train_launch_refuses_a_node_of_another_type(cli, python_code):
    other = orm.Int(3).store()
    result = cli('train', 'launch', other.pk, '--code', python_code.pk)
    assert result.exit_code == 2, result.output
    assert "Invalid value for 'DATASETS...'" in result.output and str(other.pk) in result.output


def test_train_launch_daemon_needs_a_broker(cli, python_code, h_dataset):
    before = workchains()
    result = cli('train', 'launch', h_dataset.pk, '--epochs', 1, '--daemon', '--code', python_code.pk)
    assert result.exit_code == 1, result.output
    assert 'cannot submit to the daemon' in result.output
    assert workchains() == before


def test_train_launch_builds_the_inputs(cli, python_code, h_dataset, checkpoint_node, monkeypatch):
    """What reaches the workchain: datasets, held-out, hyper-parameters, checkpoint by pk, scheduler options."""
    import aiida_dm21.cli.train as train_cli

    captured = {}

    def fake_submit(builder, label, what):
        captured.update(builder=builder, label=label, what=what)

    monkeypatch.setattr(train_cli, 'submit_to_daemon', fake_submit)
    held = orm.load_node(h_dataset.pk).clone().store()
    result = cli(
        'train', 'launch', h_dataset.pk, '--heldout', held.pk, '--epochs', 3, '--lr', '2e-4', '--grid-level', 1,
        '--name', 'mine', '-i', checkpoint_node.pk, '--walltime', 600, '--queue', 'short', '--num-cores', 4,
        '--daemon', '--code', python_code.pk,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    train = captured['builder'].train
    assert captured['label'] == 'dm21.train'
    assert {key: node.pk for key, node in train.datasets.items()} == {f'dataset_{h_dataset.pk}': h_dataset.pk}
    assert [node.pk for node in train.heldout.values()] == [held.pk]
    assert train.parameters.get_dict() == {'epochs': 3, 'learning_rate': 2e-4, 'grid_level': 1, 'name': 'mine'}
    assert train.initial_checkpoint.pk == checkpoint_node.pk
    assert train.metadata.options.max_wallclock_seconds == 600 and train.metadata.options.queue_name == 'short'
    assert train.metadata.options.resources == {
        'num_machines': 1,
        'num_mpiprocs_per_machine': 1,
        'num_cores_per_mpiproc': 4,
    }
    assert train.code.pk == python_code.pk


# --- the real runs: reference launch -> verdi data dm21.dataset; train launch -------------------------------------


def test_reference_launch_runs_in_process(cli, python_code, restore_aiida_logging, monkeypatch):
    monkeypatch.setenv('COLUMNS', '200')  # rich's tables: every column in full
    result = cli('reference', 'launch', 'demo_heldout', '--basis', 'sto-3g', '--code', python_code.pk)
    assert result.exit_code == 0, result.output
    node = orm.QueryBuilder().append(orm.WorkChainNode, tag='w').order_by({'w': {'id': 'desc'}}).first()[0]
    assert node.process_label == 'ReferenceDataWorkChain' and node.is_finished_ok
    references = [calc for calc in node.called if isinstance(calc, orm.CalcJobNode)]
    assert sorted(calc.inputs.parameters['label'] for calc in references) == ['Li', 'Li+']
    dataset = node.outputs.dataset
    assert dataset.basis == ['sto-3g'] and dataset.n_systems > 0
    assert f'dm21.reference_data<{node.pk}> demo_heldout/sto-3g (fci, 2 species): dm21.dataset<{dataset.pk}>' in (
        result.output
    )
    assert f'aiida-dm21 train launch {dataset.pk}' in result.output
    for calc in references:  # every runner recorded its thread choice
        assert set(calc.outputs.output_parameters['threads']['libraries']) == {'pyscf', 'blas'}

    _, group = dataset_group()
    runner = CliRunner()
    result = runner.invoke(group, ['list'])
    assert result.exit_code == 0, result.output
    assert str(dataset.pk) in result.output and dataset.checksum[:12] in result.output
    result = runner.invoke(group, ['list', '--element', 'Li', '--basis', 'sto-3g'])
    assert result.exit_code == 0 and str(dataset.pk) in result.output, result.output
    result = runner.invoke(group, ['list', '--element', 'Xe'])
    assert result.exit_code == 0 and "no dm21.dataset nodes with element 'Xe'" in result.output, result.output
    result = runner.invoke(group, ['show', str(dataset.pk)])
    assert result.exit_code == 0, result.output
    assert dataset.uuid in result.output and f'ReferenceDataWorkChain<{node.pk}>' in result.output
    assert 'n_systems' in result.output and 'reference_method' in result.output


def test_verdi_data_dm21_dataset_refuses(h_dataset, restore_aiida_logging):
    _, group = dataset_group()
    runner = CliRunner()
    result = runner.invoke(group, ['show', '999999'])
    assert result.exit_code != 0 and '999999' in result.output, result.output
    other = orm.Int(4).store()
    result = runner.invoke(group, ['show', str(other.pk)])
    assert result.exit_code != 0, result.output
    result = runner.invoke(group, ['show', str(h_dataset.pk)])
    assert result.exit_code == 0 and h_dataset.uuid in result.output and '(stored by hand)' in result.output


def test_the_dataset_group_is_declared_as_a_verdi_data_entry_point():
    """pyproject's ``aiida.cmdline.data`` entry point ``dm21.dataset`` names this group (an install made before the
    entry point existed lists it under ``verdi data`` only once the package is reinstalled)."""
    import importlib
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / 'pyproject.toml').read_text())
    value = pyproject['project']['entry-points']['aiida.cmdline.data']['dm21.dataset']
    module, _, attribute = value.partition(':')
    _, group = dataset_group()
    assert getattr(importlib.import_module(module), attribute) is group
    assert group.name == 'dm21.dataset'


def test_train_launch_runs_in_process(cli, python_code, h_dataset):
    """One epoch on the H dataset (grid level 0), from random weights."""
    result = cli(
        'train', 'launch', h_dataset.pk, '--epochs', 1, '--grid-level', 0, '--name', 'h-cli', '--code', python_code.pk
    )
    assert result.exit_code == 0, result.output
    train = orm.QueryBuilder().append(orm.WorkChainNode, tag='w').order_by({'w': {'id': 'desc'}}).first()[0]
    assert train.process_label == 'DM21TrainWorkChain' and train.is_finished_ok
    checkpoint = train.outputs.checkpoint
    assert checkpoint.name == 'h-cli'
    assert f'dm21.train<{train.pk}> 1 dataset(s), {h_dataset.n_systems} systems, 1 epochs' in result.output
    assert f"dm21.checkpoint<{checkpoint.pk}> 'h-cli'" in result.output and 'E_xc MAE' in result.output
    assert set(train.outputs.metrics['threads']['libraries']) == {'torch', 'numba', 'pyscf', 'blas'}
