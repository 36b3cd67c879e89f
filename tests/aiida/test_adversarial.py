"""Bad inputs to the AiiDA layer: each must end in a clear message (nothing stored) or an exit code.

Through the ``dm21.scf`` CalcJob and workchain (run in this process: a refused input raises ``ValueError`` and must
leave no node at all, counted with ``count_nodes``), the ``dm21.reference_data`` workchain (validated before any
reference calculation runs), the data types (``dm21.checkpoint``, ``dm21.dataset``) and the ``aiida-dm21`` commands
(click's CliRunner: a usage error, exit 2, or a one-line error, exit 1; never a traceback).  Last, Ctrl-C on a
foreground ``scf launch`` must kill the workchain *and* its calculation.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
import typing as t
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip('aiida.engine')

from aiida import orm
from aiida.engine import run_get_node

from aiida_dm21.calculations.scf import DM21ScfCalculation
from aiida_dm21.cli import main
from aiida_dm21.data.checkpoint import DM21CheckpointData
from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.functional.checkpoint import METADATA_KEY, read_checkpoint, weights_sha256
from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain
from aiida_dm21.workflows.scf import DM21ScfWorkChain

pytestmark = pytest.mark.aiida

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = next(
    (p for p in (REPO.parent / 'shared' / 'dm21' / 'upstream', REPO / 'shared' / 'dm21' / 'upstream') if p.is_dir()),
    REPO.parent / 'shared' / 'dm21' / 'upstream',
)
H2 = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]
I2 = [('I', (0.0, 0.0, 0.0)), ('I', (0.0, 0.0, 2.66))]
NAN, INF = float('nan'), float('inf')


def refused(count_nodes: t.Callable[[], int], launch: t.Callable[[], t.Any], message: str) -> None:
    """``launch()`` raises ``ValueError`` containing ``message`` and stores no node."""
    before = count_nodes()
    with pytest.raises(ValueError) as info:
        launch()
    assert message in str(info.value), str(info.value)
    assert count_nodes() == before, 'a refused input left nodes behind'


@pytest.fixture
def scf_inputs(python_code, checkpoint_node, make_structure):
    """``scf_inputs(atoms=H2, structure=None, options=None, **parameters)``: inputs of a small dm21.scf run."""

    def factory(atoms=None, structure=None, options=None, **parameters):
        parameters = {'basis': 'sto-3g', 'grid_level': 0, **parameters}
        return {
            'code': python_code,
            'structure': structure if structure is not None else make_structure(atoms or H2),
            'parameters': orm.Dict({k: v for k, v in parameters.items() if v is not ...}),
            'checkpoint': checkpoint_node,
            'metadata': {'options': {'max_wallclock_seconds': 600, **(options or {})}},
        }

    return factory


# --- dm21.scf: parameters ----------------------------------------------------------------------------------

BAD_PARAMETERS = {
    'conv_tol-inf': ({'conv_tol': INF}, '`conv_tol` must be a finite number'),
    'conv_tol-minus-inf': ({'conv_tol': -INF}, '`conv_tol` must be a finite number'),
    'conv_tol-nan': ({'conv_tol': NAN}, '`conv_tol` must be a finite number'),
    'conv_tol-zero': ({'conv_tol': 0}, '`conv_tol`: 0 must be > 0'),
    'conv_tol-negative': ({'conv_tol': -1e-6}, '`conv_tol`: -1e-06 must be > 0'),
    'conv_tol-string': ({'conv_tol': '1e-6'}, '`conv_tol` must be float or int'),
    'conv_tol_grad-inf': ({'conv_tol_grad': INF}, '`conv_tol_grad` must be a finite number'),
    'conv_tol_grad-nan': ({'conv_tol_grad': NAN}, '`conv_tol_grad` must be a finite number'),
    'level_shift-inf': ({'level_shift': INF}, '`level_shift` must be a finite number'),
    'level_shift-nan': ({'level_shift': NAN}, '`level_shift` must be a finite number'),
    'level_shift-negative': ({'level_shift': -0.1}, '`level_shift`: -0.1 must be >= 0'),
    'damp-one': ({'damp': 1.0}, '`damp`: 1.0 is outside [0, 1)'),
    'damp-negative': ({'damp': -0.5}, '`damp`: -0.5 is outside [0, 1)'),
    'damp-nan': ({'damp': NAN}, '`damp` must be a finite number'),
    'grid_level-negative': ({'grid_level': -1}, '`grid_level`: -1 is outside [0, 9]'),
    'grid_level-ten': ({'grid_level': 10}, '`grid_level`: 10 is outside [0, 9]'),
    'grid_level-float': ({'grid_level': 3.0}, '`grid_level` must be int'),
    'grid_level-bool': ({'grid_level': True}, '`grid_level` must be int'),
    'max_cycle-zero': ({'max_cycle': 0}, '`max_cycle`: 0 must be >= 1'),
    'max_cycle-negative': ({'max_cycle': -5}, '`max_cycle`: -5 must be >= 1'),
    'max_cycle-float': ({'max_cycle': 1.5}, '`max_cycle` must be int'),
    'charge-float': ({'charge': 0.5}, '`charge` must be int'),
    'charge-string': ({'charge': '0'}, '`charge` must be int'),
    'charge-no-electrons': ({'charge': 2}, 'charge 2 leaves 0 electrons in HH'),
    'charge-too-many-electrons': ({'charge': -100}, 'do not fit in the 2 basis functions'),
    'multiplicity-zero': ({'multiplicity': 0}, '`multiplicity`: 0 must be >= 1'),
    'multiplicity-negative': ({'multiplicity': -1}, '`multiplicity`: -1 must be >= 1'),
    'multiplicity-parity': ({'multiplicity': 2}, 'multiplicity 2 are impossible for HH'),
    'multiplicity-too-high': ({'multiplicity': 5}, 'multiplicity 5 are impossible'),
    'scf_type-unknown': ({'scf_type': 'GKS'}, "`scf_type`: 'GKS' is not one of"),
    'scf_type-lowercase': ({'scf_type': 'rks'}, "`scf_type`: 'rks' is not one of"),
    'scf_type-rks-open-shell': ({'scf_type': 'RKS', 'multiplicity': 3}, 'scf_type RKS needs multiplicity 1'),
    'init_guess-unknown': ({'init_guess': 'sad'}, "`init_guess`: 'sad' is not one of"),
    'init_guess-broken-symmetry-restricted': (
        {'init_guess': 'b3lyp_broken_symmetry'},
        'this one runs RKS (scf_type auto, multiplicity 1)',
    ),
    'init_guess-broken-symmetry-roks': (
        {'init_guess': 'b3lyp_broken_symmetry', 'scf_type': 'ROKS', 'multiplicity': 3},
        'init_guess b3lyp_broken_symmetry breaks the spin symmetry of an unrestricted SCF, but this one runs ROKS',
    ),
    'direction-nan': ({'open_shell_direction': [NAN, 0.0, 0.0]}, 'neither'),
    'direction-inf': ({'open_shell_direction': [INF, 0.0, 0.0]}, 'neither'),
    'direction-zero': ({'open_shell_direction': [0, 0, 0]}, 'non-zero 3-vector'),
    'direction-word': ({'open_shell_direction': 'up'}, "'up' is neither 'lowest'"),
    'direction-short': ({'open_shell_direction': [1.0, 2.0]}, 'non-zero 3-vector'),
    'newton-string': ({'newton': 'yes'}, '`newton` must be bool'),
    'smearing-negative': ({'smearing': -0.02}, '`smearing`: -0.02 must be >= 0'),
    'smearing-nan': ({'smearing': NAN}, '`smearing` must be a finite number'),
    'smearing-inf': ({'smearing': INF}, '`smearing` must be a finite number'),
    'smearing-bool': ({'smearing': True}, '`smearing` must be'),
    'smearing-with-newton': ({'smearing': 0.02, 'newton': True}, '`smearing` and `newton` cannot be combined'),
    'basis-empty': ({'basis': ''}, '`basis`: must not be empty'),
    'basis-blank': ({'basis': '   '}, '`basis`: must not be empty'),
    'basis-number': ({'basis': 5}, '`basis` must be str'),
    'basis-missing': ({'basis': ...}, '`basis` is required'),
    'basis-unknown': ({'basis': 'no-such-basis'}, "basis 'no-such-basis' cannot be used for this molecule"),
    'unknown-key': ({'xc': 'b3lyp'}, "unknown parameters 'xc'"),
}


@pytest.mark.parametrize('case', list(BAD_PARAMETERS))
def test_scf_bad_parameters(case, scf_inputs, count_nodes):
    parameters, message = BAD_PARAMETERS[case]
    refused(count_nodes, lambda: run_get_node(DM21ScfCalculation, **scf_inputs(**parameters)), message)


# --- dm21.scf: structures (geometry, elements, ECP bases, basis size) ------------------------------------------


def _alloy():
    structure = orm.StructureData(pbc=(False, False, False))
    structure.append_atom(position=(0, 0, 0), symbols=('H', 'He'), weights=(0.5, 0.5), name='HHe')
    return structure


def _vacancy():
    structure = orm.StructureData(pbc=(False, False, False))
    structure.append_atom(position=(0, 0, 0), symbols='H', weights=0.5)
    return structure


BAD_STRUCTURES = {
    'periodic': (lambda make: make(H2, pbc=(True, True, True)), {}, 'the structure is periodic'),
    'empty': (lambda make: make([]), {}, 'the structure has no atoms'),
    'placeholder': (lambda make: make([('X', (0, 0, 0)), ('H', (0, 0, 1))]), {}, "unknown element 'X'"),
    'alloy': (lambda make: _alloy(), {}, 'is an alloy or has vacancies'),
    'vacancy': (lambda make: _vacancy(), {}, 'is an alloy or has vacancies'),
    'coincident': (lambda make: make([('H', (0, 0, 0)), ('H', (0, 0, 0))]), {}, 'are 0 Angstrom apart'),
    'near-coincident': (lambda make: make([('H', (0, 0, 0)), ('H', (0, 0, 0.05))]), {}, 'closer than 0.1'),
    'duplicated-atom': (
        lambda make: make([('O', (0, 0, 0)), ('H', (0, 0.76, 0.59)), ('H', (0, 0.76, 0.59))]),
        {'multiplicity': 1},
        'atoms 2 (H) and 3 (H)',
    ),
    'nan-position': (lambda make: make([('H', (0, 0, 0)), ('H', (0, 0, NAN))]), {}, 'non-finite atomic positions'),
    'iodine-def2-svp-ecp': (lambda make: make(I2), {'basis': 'def2-svp'}, 'effective core potentials for I'),
    'xenon-def2-svp-ecp': (lambda make: make([('Xe', (0, 0, 0))]), {'basis': 'def2-svp'}, 'potentials for Xe'),
    'caesium-def2-tzvp-ecp': (
        lambda make: make([('Cs', (0, 0, 0))]),
        {'basis': 'def2-tzvp', 'multiplicity': 2},
        'potentials for Cs',
    ),
    'iodine-cc-pvdz-pp-ecp': (lambda make: make(I2), {'basis': 'cc-pvdz-pp'}, 'effective core potentials for I'),
    'helium-anion-sto-3g': (
        lambda make: make([('He', (0, 0, 0))]),
        {'charge': -1, 'multiplicity': 2},
        '2 alpha and 1 beta electrons do not fit in the 1 basis functions',
    ),
    'neon-anion-sto-3g': (
        lambda make: make([('Ne', (0, 0, 0))]),
        {'charge': -1, 'multiplicity': 2},
        '6 alpha and 5 beta electrons do not fit in the 5 basis functions',
    ),
    'element-not-in-basis': (
        lambda make: make([('U', (0, 0, 0))]),
        {'basis': 'cc-pvdz', 'multiplicity': 5},
        "basis 'cc-pvdz' cannot be used for this molecule",
    ),
}


@pytest.mark.parametrize('case', list(BAD_STRUCTURES))
def test_scf_bad_structure(case, scf_inputs, make_structure, count_nodes):
    build, parameters, message = BAD_STRUCTURES[case]
    inputs = scf_inputs(structure=build(make_structure), **parameters)
    refused(count_nodes, lambda: run_get_node(DM21ScfCalculation, **inputs), message)


# --- dm21.scf: restart density and options -------------------------------------------------------------------


def _density(name='density_matrix', array=None):
    node = orm.ArrayData()
    node.set_array(name, np.eye(2) if array is None else np.asarray(array))
    return node


BAD_RESTARTS = {
    'wrong-array-name': (lambda: _density('dm'), 'has no array named "density_matrix"'),
    'vector': (lambda: _density(array=np.ones(3)), 'expected (nao, nao) or (2, nao, nao)'),
    'not-square': (lambda: _density(array=np.ones((2, 3))), 'has shape (2, 3)'),
    'three-spins': (lambda: _density(array=np.ones((3, 2, 2))), 'has shape (3, 2, 2)'),
    'nan': (lambda: _density(array=[[NAN, 0.0], [0.0, 1.0]]), 'contains NaN or infinite values'),
    'inf': (lambda: _density(array=np.full((2, 2, 2), INF)), 'contains NaN or infinite values'),
    'wrong-basis-size': (lambda: _density(array=np.eye(3)), 'restart_density is for 3 basis functions'),
}


@pytest.mark.parametrize('case', list(BAD_RESTARTS))
def test_scf_bad_restart_density(case, scf_inputs, count_nodes):
    density, message = BAD_RESTARTS[case]
    inputs = {**scf_inputs(), 'restart_density': density()}
    refused(count_nodes, lambda: run_get_node(DM21ScfCalculation, **inputs), message)


BAD_OPTIONS = {
    'walltime-zero': ({'max_wallclock_seconds': 0}, 'metadata.options.max_wallclock_seconds must be >= 1'),
    'walltime-negative': ({'max_wallclock_seconds': -10}, 'metadata.options.max_wallclock_seconds must be >= 1'),
    'memory-zero': ({'max_memory_kb': 0}, 'metadata.options.max_memory_kb must be >= 1'),
    'walltime-string': ({'max_wallclock_seconds': 'long'}, 'max_wallclock_seconds'),
}


@pytest.mark.parametrize('case', list(BAD_OPTIONS))
def test_scf_bad_options(case, scf_inputs, count_nodes):
    options, message = BAD_OPTIONS[case]
    refused(count_nodes, lambda: run_get_node(DM21ScfCalculation, **scf_inputs(options=options)), message)


# --- the dm21.scf workchain ------------------------------------------------------------------------------------

BAD_WORKCHAIN = {
    'walltime_factor-nan': ({'walltime_factor': NAN}, 'walltime_factor must be a finite number >= 1'),
    'walltime_factor-inf': ({'walltime_factor': INF}, 'walltime_factor must be a finite number >= 1'),
    'walltime_factor-half': ({'walltime_factor': 0.5}, 'walltime_factor must be a finite number >= 1'),
    'max_iterations-zero': ({'max_iterations': 0}, 'max_iterations must be an integer >= 1'),
    'max_iterations-negative': ({'max_iterations': -3}, 'max_iterations must be an integer >= 1'),
    'conv_tol-inf-in-namespace': ({'conv_tol': INF}, '`conv_tol` must be a finite number'),
    'ecp-basis-in-namespace': ({'basis': 'def2-svp', 'atoms': I2}, 'effective core potentials for I'),
}


@pytest.mark.parametrize('case', list(BAD_WORKCHAIN))
def test_scf_workchain_bad_inputs(case, scf_inputs, count_nodes):
    """Refused when the builder is filled (port validators run there) or at the latest when it is run."""
    changes = dict(BAD_WORKCHAIN[case][0])
    parameters = {k: changes.pop(k) for k in list(changes) if k in ('conv_tol', 'basis')}
    inputs = scf_inputs(atoms=changes.pop('atoms', None), **parameters)

    def launch():
        builder = DM21ScfWorkChain.get_builder()
        for key, value in inputs.items():
            if key != 'metadata':
                builder.scf[key] = value
        builder.scf.metadata.options.max_wallclock_seconds = 600
        for key, value in changes.items():
            builder[key] = orm.Float(value) if isinstance(value, float) else orm.Int(value)
        return run_get_node(builder)

    refused(count_nodes, launch, BAD_WORKCHAIN[case][1])


@pytest.mark.parametrize(
    ('overrides', 'message'),
    [
        ({'scf': {'parameters': {'conv_tol': INF}}}, '`conv_tol` must be a finite number'),
        ({'scf': {'parameters': {'grid_level': 12}}}, '`grid_level`: 12 is outside [0, 9]'),
        ({'scf': {'parameters': {'electronic_temperature': 300.0}}}, 'electronic_temperature'),
        ({'walltime_factor': NAN}, 'walltime_factor'),
    ],
    ids=['protocol-conv_tol-inf', 'protocol-grid_level', 'protocol-unknown-parameter', 'protocol-walltime_factor-nan'],
)
def test_scf_protocol_bad_overrides(overrides, message, python_code, checkpoint_node, make_structure, count_nodes):
    def launch():
        builder = DM21ScfWorkChain.get_builder_from_protocol(
            python_code, make_structure(H2), checkpoint_node, protocol='fast', overrides=overrides
        )
        return run_get_node(builder)

    refused(count_nodes, launch, message)


# --- dm21.reference_data: everything checked before the first reference calculation ----------------------------

SPECIES = [
    {'label': 'H+', 'atom': 'H 0 0 0', 'charge': 1, 'multiplicity': 1},
    {'label': 'H', 'atom': 'H 0 0 0', 'charge': 0, 'multiplicity': 2},
    {'label': 'H-', 'atom': 'H 0 0 0', 'charge': -1, 'multiplicity': 1},
    {'label': 'He', 'atom': 'He 0 0 0', 'charge': 0, 'multiplicity': 1},
    {'label': 'Hfar', 'atom': 'H 0 0 1', 'charge': 0, 'multiplicity': 2},
]


def _species(*extra, base=SPECIES):
    return [*base, *extra]


BAD_REFERENCE = {
    'pair-unknown-label': ({'fractional': {'fractional_charge': [['H+', 'Li']]}}, "no species 'Li'"),
    'pair-two-unknown': ({'fractional': {'fractional_charge': [['X1', 'X2']]}}, "no species 'X1', 'X2'"),
    'pair-not-n-n-plus-1': ({'fractional': {'fractional_charge': [['H+', 'H-']]}}, 'needs N and N+1 electrons'),
    'pair-reversed': ({'fractional': {'fractional_charge': [['H', 'H+']]}}, 'needs N and N+1 electrons'),
    'pair-other-geometry': ({'fractional': {'fractional_charge': [['H+', 'Hfar']]}}, 'not the same nuclei'),
    'pair-one-label': ({'fractional': {'fractional_charge': [['H']]}}, 'is not a [lower, upper] pair'),
    'pairs-not-a-list': ({'fractional': {'fractional_charge': 'H+,H'}}, 'must be a list of [lower, upper]'),
    'spin-unknown-label': ({'fractional': {'fractional_spin': ['Li']}}, "`fractional_spin`: no species 'Li'"),
    'spin-closed-shell': ({'fractional': {'fractional_spin': ['He']}}, "species 'He' has multiplicity 1"),
    'integer-unknown-label': ({'fractional': {'integer': ['Be']}}, "`integer`: no species 'Be'"),
    'fractional-ignored-key': ({'fractional': {'deltas': [0.5]}}, "unknown keys ['deltas'] in `fractional`"),
    'fractional-with-set': (
        {'set_name': 'demo_train', 'species': None, 'fractional': {'integer': ['H']}},
        '`fractional` goes with',
    ),
    'set-and-species': ({'set_name': 'demo_train'}, 'give either `set_name`'),
    'unknown-set': ({'set_name': 'heavy', 'species': None}, "unknown set 'heavy'"),
    'deltas-zero': ({'deltas': [0.0, 0.5]}, '`deltas`: 0.0 is outside (0.0, 1.0)'),
    'deltas-one': ({'deltas': [1.0]}, '`deltas`: 1.0 is outside (0.0, 1.0)'),
    'deltas-nan': ({'deltas': [NAN]}, '`deltas` must hold finite numbers'),
    'deltas-empty': ({'deltas': []}, '`deltas` must be a non-empty list'),
    'deltas-word': ({'deltas': ['half']}, '`deltas` must hold finite numbers'),
    'spin_fractions-above-half': ({'spin_fractions': [0.6]}, '`spin_fractions`: 0.6 is outside (0.0, 0.5]'),
    'spin_fractions-zero': ({'spin_fractions': [0]}, '`spin_fractions`: 0 is outside (0.0, 0.5]'),
    'species-no-electrons-left': (
        {'species': _species({'label': 'H2+', 'atom': 'H 0 0 0', 'charge': 2, 'multiplicity': 1})},
        "species 'H2+'",
    ),
    'species-multiplicity-parity': (
        {'species': _species({'label': 'Hs', 'atom': 'H 0 0 0', 'charge': 0, 'multiplicity': 1})},
        "species 'Hs': charge 0 and multiplicity 1 are impossible",
    ),
    'species-float-charge': (
        {'species': _species({'label': 'Hq', 'atom': 'H 0 0 0', 'charge': 0.5, 'multiplicity': 2})},
        '`charge` must be an integer',
    ),
    'species-coincident-atoms': (
        {'species': _species({'label': 'HH', 'atom': 'H 0 0 0; H 0 0 0.01', 'multiplicity': 1})},
        'closer than 0.1 Angstrom',
    ),
    'species-bad-geometry': ({'species': _species({'label': 'Q', 'atom': 'Qq 0 0 0'})}, "species 'Q'"),
    'species-empty': ({'species': []}, 'the species list is empty'),
    'species-label-not-a-string': ({'species': _species({'label': 5, 'atom': 'H 0 0 0'})}, 'non-empty strings'),
    'species-duplicate-label': ({'species': _species({'label': 'H', 'atom': 'He 0 0 0'})}, 'duplicate species'),
    'basis-unknown': ({'basis': 'no-such-basis'}, "cannot build 'H 0 0 0'/no-such-basis"),
    'basis-ecp': (
        {'species': [{'label': 'I', 'atom': 'I 0 0 0', 'multiplicity': 2}], 'basis': 'def2-svp'},
        'effective core potentials for I',
    ),
    'set-with-unknown-basis': ({'set_name': 'demo_train', 'species': None, 'basis': 'no-such'}, 'no-such'),
    'reference-method-unknown': ({'reference_method': 'mp2'}, "`reference_method` 'mp2' is not one of"),
    'fci-too-many-electrons': (
        {'species': [{'label': 'C', 'atom': 'C 0 0 0', 'multiplicity': 3}], 'reference_method': 'fci'},
        'FCI is limited to 4 electrons',
    ),
}


@pytest.mark.parametrize('case', list(BAD_REFERENCE))
def test_reference_data_bad_inputs(case, python_code, count_nodes):
    changes, message = BAD_REFERENCE[case]
    definition = {'species': SPECIES, 'basis': 'sto-3g', **changes}
    inputs: dict[str, t.Any] = {'code': python_code}
    for key, value in definition.items():
        if value is None:
            continue
        if key in ('species', 'deltas', 'spin_fractions'):
            inputs[key] = orm.List(value)
        elif key == 'fractional':
            inputs[key] = orm.Dict(value)
        else:
            inputs[key] = orm.Str(value)
    refused(count_nodes, lambda: run_get_node(ReferenceDataWorkChain, **inputs), message)


# --- data types: dm21.checkpoint and dm21.dataset --------------------------------------------------------------


def _crafted(path: Path, source: Path, tensor_edit=None, meta_edit=None) -> Path:
    """A copy of the checkpoint ``source`` with edited tensors or metadata (hash recomputed)."""
    from safetensors.torch import save_file

    tensors, meta = read_checkpoint(source)
    tensors = tensor_edit(dict(tensors)) if tensor_edit else dict(tensors)
    meta = meta_edit(dict(meta)) if meta_edit else dict(meta)
    meta['weights_sha256'] = weights_sha256(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def _with_nan(tensors):
    tensors['output_layer.weight'] = tensors['output_layer.weight'].clone().fill_(NAN)
    return tensors


def _with_inf(tensors):
    tensors['input_layer.bias'] = tensors['input_layer.bias'].clone().fill_(-INF)
    return tensors


def _arch(**changes):
    return lambda meta: {**meta, 'architecture': {**meta['architecture'], **changes}}


BAD_CHECKPOINT_FILES = {
    'nan-weights': ((_with_nan, None), 'NaN or infinite weights in output_layer.weight'),
    'inf-weights': ((_with_inf, None), 'NaN or infinite weights in input_layer.bias'),
    'negative-width': ((None, _arch(hidden=-256)), '`hidden` must be an integer >= 1'),
    'one-omega': ((None, _arch(omegas=[0.4])), '`omegas` must be two finite'),
    'nan-omega': ((None, _arch(omegas=[0.0, NAN])), '`omegas` must be two finite'),
    'omegas-attribute-lies': ((None, lambda meta: {**meta, 'omegas': [0.0, 0.3]}), 'the metadata says omegas'),
    'truncated': (('truncate', None), 'not a readable safetensors checkpoint'),
}


@pytest.mark.parametrize('how', ['node', 'get_or_create'])
@pytest.mark.parametrize('case', list(BAD_CHECKPOINT_FILES))
def test_checkpoint_bad_file(case, how, dm21_checkpoint_file, tmp_path, count_nodes):
    (tensor_edit, meta_edit), message = BAD_CHECKPOINT_FILES[case]
    path = tmp_path / f'{case}.safetensors'
    if tensor_edit == 'truncate':
        path.write_bytes(dm21_checkpoint_file.read_bytes()[:5000])
    else:
        _crafted(path, dm21_checkpoint_file, tensor_edit, meta_edit)
    make = DM21CheckpointData if how == 'node' else DM21CheckpointData.get_or_create
    refused(count_nodes, lambda: make(path), message)


BAD_CHECKPOINT_ARGUMENTS = {
    'missing-file': (lambda f: DM21CheckpointData('/nonexistent/DM21.safetensors'), ValueError, 'does not exist'),
    'directory': (lambda f: DM21CheckpointData(f.parent), ValueError, 'is not a file'),
    'text-stream': (lambda f: DM21CheckpointData(io.StringIO('weights')), TypeError, 'binary mode'),
    'number': (lambda f: DM21CheckpointData(123), TypeError, 'expected a path or a binary file-like object'),
    'content-keyword': (lambda f: DM21CheckpointData(content=b'x'), TypeError, 'pass the checkpoint as `file`'),
    'filename-empty': (lambda f: DM21CheckpointData(f, filename=''), ValueError, 'refusing the file name'),
    'filename-dots': (lambda f: DM21CheckpointData(f, filename='..'), ValueError, 'refusing the file name'),
    'filename-hidden': (lambda f: DM21CheckpointData(f, filename='.DM21'), ValueError, 'refusing the file name'),
    'store-empty-node': (lambda f: DM21CheckpointData().store(), Exception, 'expected exactly one repository file'),
}


@pytest.mark.parametrize('case', list(BAD_CHECKPOINT_ARGUMENTS))
def test_checkpoint_bad_arguments(case, dm21_checkpoint_file, count_nodes):
    make, error, message = BAD_CHECKPOINT_ARGUMENTS[case]
    before = count_nodes()
    with pytest.raises(error) as info:
        make(dm21_checkpoint_file)
    assert message in str(info.value)
    assert count_nodes() == before


def test_checkpoint_identity_covers_the_architecture(dm21_checkpoint_file, checkpoint_node, tmp_path):
    """The same tensors with other omegas compute another function: another node, another caching hash."""
    other = _crafted(
        tmp_path / 'omega05.safetensors',
        dm21_checkpoint_file,
        None,
        lambda meta: {**_arch(omegas=[0.0, 0.5])(meta), 'omegas': [0.0, 0.5]},
    )
    node = DM21CheckpointData.get_or_create(other)
    assert node.weights_sha256 == checkpoint_node.weights_sha256  # the tensors are the same ...
    assert node.pk != checkpoint_node.pk  # ... the function is not
    assert node.base.caching.get_hash() != checkpoint_node.base.caching.get_hash()
    assert DM21CheckpointData.get_or_create(other).pk == node.pk
    assert DM21CheckpointData.get_or_create(dm21_checkpoint_file).pk == checkpoint_node.pk


BAD_DATASETS = {
    'missing-file': (lambda tmp: DM21DatasetData(file=str(tmp / 'none.npz')), ValueError, 'does not exist'),
    'garbage-bytes': (lambda tmp: DM21DatasetData(file=io.BytesIO(b'not a zip')), ValueError, 'not a readable'),
    'text-stream': (lambda tmp: DM21DatasetData(file=io.StringIO('x')), TypeError, 'binary mode'),
    'number': (lambda tmp: DM21DatasetData(file=42), TypeError, 'expected a path'),
    'npz-without-meta': (
        lambda tmp: DM21DatasetData(file=_npz(tmp, a=np.zeros(2))),
        ValueError,
        'not a readable dataset file',
    ),
    'npz-foreign-format': (
        lambda tmp: DM21DatasetData(file=_npz(tmp, meta=np.array(json.dumps({'format': 'other'})))),
        ValueError,
        'not an aiida-dm21',
    ),
    'npz-meta-list': (lambda tmp: DM21DatasetData(file=_npz(tmp, meta=np.array('[1, 2]'))), ValueError, 'not an'),
}


def _npz(tmp: Path, **arrays) -> str:
    path = tmp / 'dataset.npz'
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize('case', list(BAD_DATASETS))
def test_dataset_bad_file(case, tmp_path, count_nodes):
    make, error, message = BAD_DATASETS[case]
    before = count_nodes()
    with pytest.raises(error) as info:
        make(tmp_path)
    assert message in str(info.value), str(info.value)
    assert count_nodes() == before


def test_dataset_with_nan_target_refused(tmp_path):
    from aiida_dm21.reference.dataset import DatasetError, save_dataset
    from aiida_dm21.reference.fractional import TrainingSystem

    arrays = {name: np.zeros((2, 1, 1)) for name in ('dm', 'no_coeff')}
    system = TrainingSystem(
        'integer', 'H', 'H 0 0 0', 'sto-3g', 0.0, 1.0, -0.5, -0.4, NAN,
        arrays['dm'], arrays['no_coeff'], np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((1, 1)), ('H',),
    )  # fmt: skip
    with pytest.raises(DatasetError, match="system 'H' has a non-finite e_xc_target"):
        save_dataset(tmp_path / 'nan.npz', [system])


# --- the commands --------------------------------------------------------------------------------------------


@pytest.fixture
def cli(dm21_checkpoint_file, monkeypatch):
    """``cli(*args)``: ``aiida-dm21 ARGS`` in this process, DM21 installed in the weights folder."""
    monkeypatch.setenv('AIIDA_DM21_WEIGHTS_DIR', str(dm21_checkpoint_file.parent))
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(arg) for arg in args])


def _xyz(tmp: Path, text: str | bytes) -> str:
    path = tmp / 'molecule.xyz'
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


LAUNCH = ['scf', 'launch']
BASIS = ['--basis', 'sto-3g', '--protocol', 'fast']
BAD_COMMANDS = {
    'launch-grid-level-negative': (lambda tmp: [*LAUNCH, 'h2', '--grid-level', -1], 2, 'not in the range 0<=x<=9'),
    'launch-grid-level-ten': (lambda tmp: [*LAUNCH, 'h2', '--grid-level', 10], 2, 'not in the range 0<=x<=9'),
    'launch-multiplicity-zero': (lambda tmp: [*LAUNCH, 'h2', '--multiplicity', 0], 2, 'not in the range x>=1'),
    'launch-walltime-zero': (lambda tmp: [*LAUNCH, 'h2', '--walltime', 0], 2, 'not in the range x>=1'),
    'launch-charge-word': (lambda tmp: [*LAUNCH, 'h2', '--charge', 'plus'], 2, "'plus' is not a valid integer"),
    'launch-no-electrons': (lambda tmp: [*LAUNCH, 'h2', *BASIS, '--charge', 2], 1, 'charge 2 leaves 0 electrons'),
    'launch-xyz-coincident': (
        lambda tmp: [*LAUNCH, _xyz(tmp, 'H 0 0 0\nH 0 0 0\n'), *BASIS],
        1,
        'are 0 Angstrom apart',
    ),
    'launch-xyz-binary': (lambda tmp: [*LAUNCH, _xyz(tmp, b'\xff\xfe\x00\x81' * 8), *BASIS], 1, 'not a readable xyz'),
    'launch-xyz-nan': (lambda tmp: [*LAUNCH, _xyz(tmp, 'H 0 0 0\nH 0 0 nan\n'), *BASIS], 1, 'non-finite'),
    'launch-xyz-inf': (lambda tmp: [*LAUNCH, _xyz(tmp, 'H 0 0 0\nH 0 0 inf\n'), *BASIS], 1, 'non-finite'),
    'launch-xyz-unknown-element': (lambda tmp: [*LAUNCH, _xyz(tmp, 'Qq 0 0 0\n'), *BASIS], 1, 'Qq'),
    'launch-xyz-empty': (lambda tmp: [*LAUNCH, _xyz(tmp, '\n\n'), *BASIS], 1, 'no atoms'),
    'launch-ecp-basis': (
        lambda tmp: [*LAUNCH, _xyz(tmp, 'I 0 0 0\nI 0 0 2.66\n'), '--basis', 'def2-svp', '--protocol', 'fast'],
        1,
        'effective core potentials for I',
    ),
    'launch-too-few-functions': (
        lambda tmp: [*LAUNCH, _xyz(tmp, 'He 0 0 0\n'), *BASIS, '--charge', -1],
        1,
        'do not fit in the 1 basis functions',
    ),
    'launch-code-not-a-code': (lambda tmp: [*LAUNCH, 'h2', *BASIS, '--code', '{dict}'], 1, "no code '"),
    'launch-functional-not-a-checkpoint': (lambda tmp: [*LAUNCH, 'h2', '-f', '{dict}'], 1, 'not a dm21.checkpoint'),
    'launch-functional-nan-file': (lambda tmp: [*LAUNCH, 'h2', '-f', '{nan}'], 1, 'NaN or infinite weights'),
    'launch-structure-not-a-structure': (lambda tmp: [*LAUNCH, '{dict}'], 1, 'not a StructureData'),
    'lineage-of-a-dict': (lambda tmp: ['checkpoint', 'lineage', '{dict}'], 1, 'is a Dict, not a dm21.checkpoint'),
    'lineage-of-a-code': (lambda tmp: ['checkpoint', 'lineage', '{code}'], 1, 'not a dm21.checkpoint'),
    'lineage-missing-pk': (lambda tmp: ['checkpoint', 'lineage', 99999999], 1, "no checkpoint node '99999999'"),
    'lineage-not-an-identifier': (
        lambda tmp: ['checkpoint', 'lineage', 'nonsense'],
        1,
        "no checkpoint node 'nonsense'",
    ),
    'show-of-a-dict': (lambda tmp: ['checkpoint', 'show', '{dict}'], 1, 'is a Dict, not a dm21.checkpoint'),
    'export-of-a-dict': (lambda tmp: ['checkpoint', 'export', '{dict}', tmp / 'x.safetensors'], 1, 'is a Dict'),
    'export-into-missing-folder': (
        lambda tmp: ['checkpoint', 'export', '{checkpoint}', tmp / 'no' / 'such' / 'x.safetensors'],
        1,
        'cannot write',
    ),
    'weights-import-traversal-store': (
        lambda tmp: ['weights', 'import', '{upstream}', '--name', '../escape', '--store', '--dest', tmp / 'w'],
        1,
        'cannot be a file name in the weights folder',
    ),
    'demo-epochs-zero': (lambda tmp: ['demo', '--epochs', 0], 2, 'not in the range x>=1'),
}


@pytest.mark.parametrize('case', list(BAD_COMMANDS))
def test_command_bad_input(case, cli, python_code, checkpoint_node, dm21_checkpoint_file, tmp_path, count_nodes):
    args, exit_code, message = BAD_COMMANDS[case]
    dictionary = orm.Dict({'not': 'a checkpoint'}).store()
    nan_file = _crafted(tmp_path / 'nan.safetensors', dm21_checkpoint_file, _with_nan)
    values = {
        '{dict}': str(dictionary.pk),
        '{code}': str(python_code.pk),
        '{checkpoint}': str(checkpoint_node.pk),
        '{nan}': str(nan_file),
        '{upstream}': str(UPSTREAM / 'DM21'),
    }
    args = [values.get(str(arg), arg) for arg in args(tmp_path)]
    if args[:2] == LAUNCH and '--code' not in args:
        args += ['--code', python_code.pk]
    before = count_nodes()
    result = cli(*args)
    assert result.exit_code == exit_code, result.output
    assert message in result.output, result.output
    assert 'Traceback' not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert count_nodes() == before, 'a refused command left nodes behind'
    assert not (tmp_path / 'escape.safetensors').exists()


# --- Ctrl-C on a foreground `scf launch` ----------------------------------------------------------------------


def test_interrupt_kills_the_workchain_and_its_calculation(cli, aiida_code_installed, tmp_path):
    """SIGINT while the CalcJob's job runs: the workchain and the CalcJob end killed and sealed, the job is killed.

    The code is a script that records its pid and sleeps (the job would run for two minutes); a thread sends this
    process SIGINT once the job has started, as Ctrl-C in a terminal would.
    """
    marker = tmp_path / 'job.pid'
    script = tmp_path / 'sleeper.sh'
    script.write_text(f'#!/bin/bash\necho $$ > {marker}\nexec sleep 120\n')
    script.chmod(0o755)
    code = aiida_code_installed(label='sleeper', default_calc_job_plugin='dm21.scf', filepath_executable=str(script))

    def job_pid() -> int | None:
        text = marker.read_text().strip() if marker.exists() else ''
        return int(text) if text else None

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while job_pid() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the CalcJob is now waiting for its job
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        result = cli('scf', 'launch', 'h2', *BASIS, '--grid-level', 0, '--code', code.pk)
    finally:
        thread.join(timeout=70)
    pid = job_pid()
    try:
        assert result.exit_code == 130, result.output
        assert 'interrupted' in result.output and 'Traceback' not in result.output
        workchain = orm.QueryBuilder().append(orm.WorkChainNode, tag='w').order_by({'w': {'id': 'desc'}}).first()[0]
        assert workchain.is_killed and workchain.is_sealed
        calculations = [node for node in workchain.called_descendants if isinstance(node, orm.CalcJobNode)]
        assert calculations, 'the workchain never launched its calculation'
        for node in calculations:
            assert node.is_killed and node.is_sealed, (node.pk, node.process_state, node.process_status)
        assert pid is not None
        for _ in range(50):  # the scheduler's kill is asynchronous: give it a moment
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid), 'the job of the killed calculation is still running'
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)  # the sleeper this test started


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed, waiting to be reaped)."""
    try:
        status = Path(f'/proc/{pid}/status').read_text()
    except OSError:
        return False
    return 'State:\tZ' not in status
