"""``aiida-dm21 setup``: register a Python with aiida-dm21 as a code on localhost or on any other AiiDA computer,
with click's CliRunner inside the test profile that the fixtures loaded.

Every case runs against real computers and codes of that profile: the default (this Python on localhost), a code
on a second ``core.local``/``core.direct`` computer, a repeat that reuses the code, and the refusals (unknown
computer, no ``--python`` for a computer other than localhost, the same label set up differently), each of which
stores nothing.
"""

from __future__ import annotations

import sys
import uuid

import pytest

pytest.importorskip('aiida.engine')

from aiida import orm

pytestmark = pytest.mark.aiida


@pytest.fixture
def cluster(aiida_computer):
    """A second computer (core.local transport, core.direct scheduler), not called localhost."""
    return aiida_computer(label=f'cluster-{uuid.uuid4().hex[:8]}')


def codes_called(label: str, computer: orm.Computer) -> list[orm.AbstractCode]:
    builder = orm.QueryBuilder().append(orm.Computer, filters={'id': computer.pk}, tag='computer')
    builder.append(orm.AbstractCode, with_computer='computer', filters={'label': label})
    return [row[0] for row in builder.all()]


def test_setup_help(cli):
    result = cli('setup', '--help')
    assert result.exit_code == 0, result.output
    for text in ('--computer', '--python', '--label', '--prepend-text', '--append-text', '--profile'):
        assert text in result.output


def test_setup_default_is_this_python_on_localhost(cli, aiida_localhost):
    label = f'dm21-{uuid.uuid4().hex[:8]}'
    result = cli('setup', '--label', label)
    assert result.exit_code == 0, result.output
    (code,) = codes_called(label, aiida_localhost)
    assert isinstance(code, orm.InstalledCode)
    assert str(code.filepath_executable) == sys.executable
    assert code.prepend_text == '' and code.append_text == ''
    assert f'registered code {label}@localhost (pk {code.pk}) -> {sys.executable}' in result.output
    assert f'--code {label}@localhost' in result.output


def test_setup_on_a_second_computer_and_again(cli, cluster, count_nodes):
    """A code on another computer with prepend/append text; the same command again reuses it (nothing stored)."""
    prepend = 'module load python; source ~/venv/bin/activate'
    args = (
        'setup', '--computer', cluster.label, '--python', sys.executable, '--label', 'dm21-python',
        '--prepend-text', prepend, '--append-text', 'echo done',
    )  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.output
    (code,) = codes_called('dm21-python', cluster)
    assert isinstance(code, orm.InstalledCode) and code.computer.pk == cluster.pk
    assert str(code.filepath_executable) == sys.executable
    assert code.prepend_text == prepend and code.append_text == 'echo done'
    assert f'registered code dm21-python@{cluster.label} (pk {code.pk})' in result.output
    assert f'aiida-dm21 scf launch h2 --code dm21-python@{cluster.label}' in result.output
    assert orm.load_code(f'dm21-python@{cluster.label}').pk == code.pk

    before = count_nodes()
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert f'already registered: code dm21-python@{cluster.label} (pk {code.pk})' in again.output
    assert count_nodes() == before
    assert [node.pk for node in codes_called('dm21-python', cluster)] == [code.pk]
    spelled = cli(*[f'{sys.executable}/' if arg == sys.executable else arg for arg in args])  # the same path
    assert spelled.exit_code == 0 and 'already registered' in spelled.output, spelled.output


def test_setup_by_computer_pk_with_python_on_path(cli, cluster):
    """--computer takes a pk too; a bare `python` (the one on PATH after --prepend-text) is kept as given."""
    result = cli('setup', '--computer', cluster.pk, '--python', 'python', '--prepend-text', 'conda activate dm21')
    assert result.exit_code == 0, result.output
    (code,) = codes_called('dm21-python', cluster)
    assert str(code.filepath_executable) == 'python' and code.prepend_text == 'conda activate dm21'


@pytest.mark.parametrize(
    ('changed', 'message'),
    [
        (('--python', '/opt/other/bin/python3'), "executable: stored '{python}', asked '/opt/other/bin/python3'"),
        (('--prepend-text', 'module load python/3.12'), "prepend_text: stored 'module load python', asked"),
        (('--append-text', 'echo bye'), "append_text: stored '', asked 'echo bye'"),
    ],
)
def test_setup_refuses_the_same_label_set_up_differently(cli, cluster, count_nodes, changed, message):
    prepend = 'module load python'
    first = cli('setup', '--computer', cluster.label, '--python', sys.executable, '--prepend-text', prepend)
    assert first.exit_code == 0, first.output
    (code,) = codes_called('dm21-python', cluster)
    before = count_nodes()
    args = {'--python': sys.executable, '--prepend-text': 'module load python', '--append-text': ''}
    args[changed[0]] = changed[1]
    flat = [item for pair in args.items() for item in pair]
    result = cli('setup', '--computer', cluster.label, *flat)
    assert result.exit_code == 1, result.output
    assert f'code dm21-python@{cluster.label} (pk {code.pk}) exists with a different set-up' in result.output
    assert message.format(python=sys.executable) in result.output
    assert 'Traceback' not in result.output
    assert count_nodes() == before
    stored = orm.load_code(code.pk)
    assert str(stored.filepath_executable) == sys.executable and stored.prepend_text == 'module load python'


@pytest.mark.parametrize(
    ('args', 'status', 'message'),
    [
        (
            ['--computer', 'no-such-computer', '--python', '/usr/bin/python3'],
            2,
            "Invalid value for '--computer': no Computer found with LABEL<no-such-computer>",
        ),
        (['--computer', '{cluster}'], 1, "--python is required for computer '{cluster}'"),
        (['--computer', '{cluster}', '--python', ''], 1, '--python must not be empty'),
        (
            ['--computer', '{cluster}', '--python', '/no/such/bin/python'],
            1,
            "--python /no/such/bin/python: no such file on this machine (computer '{cluster}' uses core.local)",
        ),
        (['--computer', '{cluster}', '--python', 'python', '--label', 'a@b'], 1, '--label must be a non-empty'),
    ],
)
def test_setup_refuses(cli, cluster, count_nodes, args, status, message):
    before = count_nodes()
    result = cli('setup', *[arg.format(cluster=cluster.label) for arg in args])
    assert result.exit_code == status, result.output
    assert message.format(cluster=cluster.label) in result.output
    assert 'Traceback' not in result.output
    assert count_nodes() == before
    assert codes_called('dm21-python', cluster) == []
