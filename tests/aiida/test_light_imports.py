"""The plugin layer is light: importing it, loading its entry points and validating inputs imports no PyTorch.

The design rule (issue 11): the submitting machine should not need PyTorch to validate inputs.  Every module
under ``aiida_dm21/{calculations,workflows,parsers,data,cli}`` is imported in a fresh interpreter, every
``aiida.calculations``/``aiida.workflows``/``aiida.parsers``/``aiida.data`` entry point of the package is loaded
through the ``aiida.plugins`` factories, a ``dm21.checkpoint`` node is made from a file and the port validators of
``dm21.scf`` run: ``torch``, ``numba`` and ``pyscf`` must still be absent from ``sys.modules``.  The cross-check of
the whole ``dm21.scf`` namespace builds the molecule in PySCF (is the basis set there for these elements?), so
there only ``torch`` and ``numba`` must be absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aiida_dm21

pytestmark = pytest.mark.aiida


SCRIPT = r"""
import importlib, json, pkgutil, sys
from importlib.metadata import entry_points

report = {}
HEAVY = ('torch', 'numba', 'pyscf')  # what the submitting machine must not need

def loaded():
    return sorted(name for name in HEAVY if name in sys.modules)

import aiida_dm21
for subpackage in ('calculations', 'workflows', 'parsers', 'data', 'cli'):
    package = importlib.import_module(f'aiida_dm21.{subpackage}')
    for info in pkgutil.walk_packages(package.__path__, prefix=f'{package.__name__}.'):
        importlib.import_module(info.name)
report['modules'] = loaded()

from aiida import load_profile, orm
from aiida.plugins import CalculationFactory, DataFactory, ParserFactory, WorkflowFactory

load_profile(sys.argv[1], allow_switch=True)
factories = {
    'aiida.calculations': CalculationFactory,
    'aiida.workflows': WorkflowFactory,
    'aiida.parsers': ParserFactory,
    'aiida.data': DataFactory,
}
names = []
for group, factory in factories.items():
    for entry_point in entry_points(group=group):
        if entry_point.value.startswith('aiida_dm21.'):
            factory(entry_point.name)
            names.append(f'{group}:{entry_point.name}')
report['entry_point_names'] = names
report['entry_points'] = loaded()

from aiida_dm21.calculations.scf import DM21ScfCalculation, validate_parameters, validate_structure
from aiida_dm21.data.checkpoint import DM21CheckpointData

structure = orm.StructureData(cell=[[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]], pbc=(False, False, False))
for position in ((0.0, 0.0, 0.0), (0.0, 0.0, 0.74)):
    structure.append_atom(position=position, symbols='H')
parameters = orm.Dict({'basis': 'sto-3g', 'grid_level': 0})
report['port_messages'] = [
    validate_structure(structure),
    validate_parameters(parameters),
    validate_parameters(orm.Dict({'basis': 'sto-3g', 'grid_level': 'fine'})),
]
checkpoint = DM21CheckpointData(file=sys.argv[2])
report['checkpoint_sha256'] = checkpoint.weights_sha256
report['validators'] = loaded()

inputs = {
    'code': orm.load_node(int(sys.argv[3])),
    'structure': structure,
    'parameters': parameters,
    'checkpoint': checkpoint,
    'metadata': {'options': {'max_wallclock_seconds': 600, 'resources': {'num_machines': 1}}},
}
namespace = DM21ScfCalculation.spec().inputs
report['namespace_ok'] = namespace.validate(inputs)
inputs['parameters'] = orm.Dict({'basis': 'no-such-basis', 'grid_level': 0})
report['namespace_refused'] = namespace.validate(inputs)
report['namespace'] = loaded()
print('REPORT', json.dumps(report, default=str))
"""


_REPORT: dict = {}


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """A valid checkpoint of a small DM21-architecture network (written here, with PyTorch: not in the subprocess)."""
    from aiida_dm21.functional.checkpoint import save_checkpoint
    from aiida_dm21.functional.model import DM21Config, DM21Network

    path = tmp_path / 'small.safetensors'
    save_checkpoint(path, DM21Network(DM21Config(hidden=8, n_blocks=1)), {'name': 'small', 'source': 'test'})
    return path


@pytest.fixture
def report(aiida_profile, small_checkpoint, aiida_localhost):
    """What the fresh interpreter found (see :data:`SCRIPT`): run once, for the first test that asks."""
    if _REPORT:
        return _REPORT
    from aiida import orm

    from aiida_dm21.functional.checkpoint import read_checkpoint

    code = orm.InstalledCode(label='dm21-light-python', computer=aiida_localhost, filepath_executable=sys.executable)
    code.store()
    env = dict(os.environ)
    root = str(Path(aiida_dm21.__file__).resolve().parents[1])  # this checkout, as in the test process
    env['PYTHONPATH'] = os.pathsep.join([root, *filter(None, [env.get('PYTHONPATH')])])
    done = subprocess.run(
        [sys.executable, '-c', SCRIPT, aiida_profile.name, str(small_checkpoint), str(code.pk)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith('REPORT '))
    _REPORT.update(json.loads(line[len('REPORT ') :]))
    _REPORT['file_sha256'] = read_checkpoint(small_checkpoint)[1]['weights_sha256']  # the core reader (PyTorch)
    return _REPORT


def test_importing_the_plugin_modules_imports_no_torch_numba_or_pyscf(report):
    assert report['modules'] == []


def test_loading_every_entry_point_imports_no_torch_numba_or_pyscf(report):
    names = report['entry_point_names']
    for expected in ('aiida.calculations:dm21.scf', 'aiida.workflows:dm21.pipeline', 'aiida.data:dm21.checkpoint'):
        assert expected in names
    assert {name.split(':')[0] for name in names} == {
        'aiida.calculations',
        'aiida.workflows',
        'aiida.parsers',
        'aiida.data',
    }
    assert report['entry_points'] == []


def test_port_validators_and_a_checkpoint_from_a_file_import_no_torch_numba_or_pyscf(report):
    structure, parameters, refused = report['port_messages']
    assert structure is None and parameters is None
    assert refused and 'grid_level' in refused
    assert report['checkpoint_sha256'] == report['file_sha256']  # the same hash without PyTorch
    assert report['validators'] == []


def test_validating_a_whole_scf_namespace_imports_no_torch_or_numba(report):
    """The basis check builds the molecule in PySCF (imported then, inside the validator): never PyTorch."""
    assert report['namespace_ok'] is None
    assert report['namespace_refused'] and 'no-such-basis' in report['namespace_refused']
    assert 'torch' not in report['namespace'] and 'numba' not in report['namespace']
