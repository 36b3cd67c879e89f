"""Bad inputs to the numerical core and the profile-free commands: each must end in a clear message or exit code.

No AiiDA here.  Checkpoints are written from a randomly initialised network (no DeepMind files needed) and then
edited: NaN weights, impossible architectures, metadata that contradicts the tensors.  The runner of ``dm21.scf``
is fed broken ``input.json`` files; it must refuse each with exit status 2 and an ``unsupported_input`` error in
``results.json``, never run it.  The ``run``, ``weights`` and ``fractional-curve`` commands must answer a bad option
with click's usage error (exit 2) or a one-line error (exit 1), never a traceback.

Refusals that belong in ``aiida_dm21/functional/scf.py`` (the ``KS`` API) are collected at the end as strict
``xfail``s: they fail today with the traceback or the wrong result named in the reason.
"""

from __future__ import annotations

import json
import math
import typing as t
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from aiida_dm21.cli import main
from aiida_dm21.functional.checkpoint import (
    METADATA_KEY,
    CheckpointError,
    check_checkpoint_name,
    install_deepmind,
    load_network,
    read_checkpoint,
    save_checkpoint,
    weights_sha256,
)
from aiida_dm21.functional.model import DM21Config, DM21Network
from aiida_dm21.runner import scf as runner

pytestmark = pytest.mark.core

H2 = {'symbols': ['H', 'H'], 'positions': [[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]], 'basis': 'sto-3g'}


@pytest.fixture(scope='module')
def good_checkpoint(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, t.Any]]:
    """Tensors and metadata of a valid checkpoint (a seeded random network)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt') / 'random.safetensors'
    save_checkpoint(path, DM21Network(), {'name': 'random', 'source': 'test'})
    return read_checkpoint(path)


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: t.Any, rehash: bool = True) -> Path:
    """A safetensors file with these tensors and this metadata (``weights_sha256`` recomputed when asked)."""
    if rehash and isinstance(meta, dict):
        meta = {**meta, 'weights_sha256': weights_sha256(tensors)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


# --- checkpoints: NaN weights, impossible architectures, contradicting metadata --------------------------------


def _nan(tensors):
    bad = dict(tensors)
    bad['output_layer.bias'] = bad['output_layer.bias'].clone().fill_(float('nan'))
    return bad


def _inf(tensors):
    bad = dict(tensors)
    weight = bad['blocks.0.linear.weight'].clone()
    weight[0, 0] = float('inf')
    bad['blocks.0.linear.weight'] = weight
    return bad


def _arch(**changes):
    def edit(meta):
        return {**meta, 'architecture': {**meta['architecture'], **changes}}

    return edit


BAD_CHECKPOINTS = {
    'nan-weights': (_nan, None, 'NaN or infinite weights in output_layer.bias'),
    'inf-weight': (_inf, None, 'NaN or infinite weights in blocks.0.linear.weight'),
    'negative-hidden': (None, _arch(hidden=-1), '`hidden` must be an integer >= 1'),
    'zero-blocks': (None, _arch(n_blocks=0), '`n_blocks` must be an integer >= 1'),
    'string-hidden': (None, _arch(hidden='256'), '`hidden` must be an integer >= 1'),
    'float-hidden': (None, _arch(hidden=256.0), '`hidden` must be an integer >= 1'),
    'huge-hidden': (None, _arch(hidden=10**9), 'tensors do not fit the DM21 architecture'),
    'twelve-features': (None, _arch(n_features=12), '`n_features` must be 11'),
    'two-outputs': (None, _arch(n_outputs=2), '`n_outputs` must be 3'),
    'zero-layer-norm-eps': (None, _arch(layer_norm_eps=0.0), '`layer_norm_eps`'),
    'negative-log-offset': (None, _arch(log_offset=-1.0), '`log_offset` must be a finite number >= 0'),
    'three-omegas': (None, _arch(omegas=[0.0, 0.4, 1.0]), '`omegas` must be two finite'),
    'negative-omega': (None, _arch(omegas=[0.0, -0.4]), '`omegas` must be two finite'),
    'string-omegas': (None, _arch(omegas='0.4'), '`omegas` must be a list of numbers'),
    'unknown-architecture-key': (None, _arch(dropout=0.1), 'unknown DM21 architecture keys'),
    'architecture-list': (None, lambda meta: {**meta, 'architecture': ['hidden']}, 'must be a mapping'),
    'omegas-contradict-architecture': (None, lambda meta: {**meta, 'omegas': [0.0, 0.5]}, 'the metadata says omegas'),
    'feature-names-reordered': (
        None,
        lambda meta: {**meta, 'feature_names': list(reversed(meta['feature_names']))},
        'are not the DM21 features',
    ),
    'metadata-not-an-object': (None, lambda meta: ['aiida-dm21-checkpoint'], 'must be a JSON object'),
}


@pytest.mark.parametrize('case', list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused(case, good_checkpoint, tmp_path):
    tensor_edit, meta_edit, message = BAD_CHECKPOINTS[case]
    tensors, meta = good_checkpoint
    tensors = tensor_edit(tensors) if tensor_edit else tensors
    meta = meta_edit(meta) if meta_edit else meta
    path = write_checkpoint(tmp_path / f'{case}.safetensors', tensors, meta)
    with pytest.raises(CheckpointError) as info:
        load_network(path)
    assert message in str(info.value)


def test_nan_network_is_never_written(tmp_path):
    network = DM21Network()
    with torch.no_grad():
        network.input_layer.weight[3, 4] = float('nan')
    target = tmp_path / 'nan.safetensors'
    with pytest.raises(CheckpointError, match=r'NaN or infinite weights in input_layer\.weight'):
        save_checkpoint(target, network)
    assert not target.exists() and not list(tmp_path.iterdir())  # no temporary file left either


# --- checkpoint names: never a path ------------------------------------------------------------------------

BAD_NAMES = [
    '../x',
    '../../etc/evil',
    '/tmp/absolute',
    'a/b',
    'a\\b',
    '.',
    '..',
    '.hidden',
    '',
    '   ',
    ' DM21',
    'a\x00b',
]


@pytest.mark.parametrize('name', BAD_NAMES)
def test_checkpoint_name_cannot_be_a_path(name):
    with pytest.raises(CheckpointError, match='checkpoint name'):
        check_checkpoint_name(name)


@pytest.mark.parametrize('name', ['../outside', '/tmp/aiida-dm21-absolute', 'sub/dir'])
def test_install_refuses_a_name_outside_the_folder(name, upstream_dir, tmp_path):
    dest = tmp_path / 'weights'
    with pytest.raises(CheckpointError, match='cannot be a file name in the weights folder'):
        install_deepmind(upstream_dir / 'DM21', dest, name=name, verify=False)
    assert not any(tmp_path.rglob('*.safetensors')) and not Path('/tmp/aiida-dm21-absolute.safetensors').exists()


@pytest.mark.parametrize(
    'config',
    [{'hidden': 0}, {'n_blocks': -2}, {'omegas': (0.0,)}, {'omegas': (0.0, float('nan'))}, {'abs_offset': math.inf}],
)
def test_config_refuses_impossible_values(config):
    with pytest.raises(ValueError, match='architecture `'):
        DM21Config(**config)


# --- the dm21.scf runner: a broken input.json is refused (exit 2), never run ------------------------------------

BAD_RUNNER_INPUTS = {
    'iodine-def2-svp-ecp': (
        {'symbols': ['I', 'I'], 'positions': [[0, 0, 0], [0, 0, 2.66]], 'basis': 'def2-svp'},
        'effective core potentials for I',
    ),
    'xenon-def2-svp-ecp': ({'symbols': ['Xe'], 'positions': [[0, 0, 0]], 'basis': 'def2-svp'}, 'for Xe'),
    'rubidium-def2-tzvp-ecp': (
        {'symbols': ['Rb'], 'positions': [[0, 0, 0]], 'basis': 'def2-tzvp', 'multiplicity': 2},
        'for Rb',
    ),
    'coincident-atoms': ({**H2, 'positions': [[0, 0, 0], [0, 0, 0]]}, 'atoms 1 (H) and 2 (H) are 0 Angstrom apart'),
    'near-coincident-atoms': ({**H2, 'positions': [[0, 0, 0], [0, 0, 1e-3]]}, 'closer than 0.1 Angstrom'),
    'more-electrons-than-functions': (
        {'symbols': ['He'], 'positions': [[0, 0, 0]], 'basis': 'sto-3g', 'charge': -1, 'multiplicity': 2},
        'do not fit in the 1 basis functions',
    ),
    'nan-position': ({**H2, 'positions': [[0, 0, 0], [0, 0, float('nan')]]}, 'finite 3-vectors'),
    'short-position': ({**H2, 'positions': [[0, 0, 0], [0, 0]]}, '`positions`'),
    'no-symbols': ({**H2, 'symbols': []}, '`symbols` must be a non-empty list'),
    'symbol-not-a-string': ({**H2, 'symbols': ['H', 1]}, '`symbols` must be a non-empty list'),
    'unknown-element': ({**H2, 'symbols': ['H', 'Qq']}, 'PySCF cannot build the molecule'),
    'missing-basis': ({'symbols': ['H'], 'positions': [[0, 0, 0]]}, 'lacks basis'),
    'unknown-basis': ({**H2, 'basis': 'no-such-basis'}, 'PySCF cannot build the molecule'),
    'scf-type': ({**H2, 'scf_type': 'GKS'}, "scf_type 'GKS' is not one of"),
    'init-guess': ({**H2, 'init_guess': 'sad'}, "init_guess 'sad' is not one of"),
    'float-charge': ({**H2, 'charge': 0.5}, 'charge must be an integer'),
    'zero-multiplicity': ({**H2, 'multiplicity': 0}, 'multiplicity an integer >= 1'),
    'impossible-spin': ({**H2, 'multiplicity': 2}, 'PySCF cannot build the molecule'),
    'grid-level-word': ({**H2, 'grid_level': 'fine'}, '`grid_level` must be an integer'),
    'grid-level-ten': ({**H2, 'grid_level': 10}, '`grid_level` must be <= 9'),
    'max-cycle-zero': ({**H2, 'max_cycle': 0}, '`max_cycle` must be >= 1'),
    'conv-tol-zero': ({**H2, 'conv_tol': 0.0}, '`conv_tol` must be > 0.0'),
    'conv-tol-infinite': ({**H2, 'conv_tol': 1e400}, '`conv_tol` must be finite'),
    'damp-above-one': ({**H2, 'damp': 2.0}, '`damp` must be <= 1.0'),
    'max-memory-negative': ({**H2, 'max_memory_mb': -1}, '`max_memory_mb` must be > 0.0'),
}


@pytest.mark.parametrize('case', list(BAD_RUNNER_INPUTS))
def test_runner_refuses_bad_input(case, tmp_path):
    data, message = BAD_RUNNER_INPUTS[case]
    (tmp_path / 'input.json').write_text(json.dumps(data))
    status = runner.run(tmp_path / 'input.json', tmp_path)
    results = json.loads((tmp_path / 'results.json').read_text())
    assert status == runner.EXIT_BAD_INPUT, results
    assert results['error']['category'] == 'unsupported_input'
    assert message in results['error']['message']
    assert results['e_tot'] is None and not (tmp_path / runner.DENSITY_FILE).exists()


@pytest.mark.parametrize('content', ['{not json', '[1, 2, 3]', ''])
def test_runner_refuses_unreadable_input_file(content, tmp_path):
    (tmp_path / 'input.json').write_text(content)
    assert runner.run(tmp_path / 'input.json', tmp_path) == runner.EXIT_BAD_INPUT
    assert json.loads((tmp_path / 'results.json').read_text())['error']['category'] == 'unsupported_input'


def test_basis_ecp_is_empty_for_all_electron_bases():
    assert runner.basis_ecp('def2-svp', ['H', 'C', 'Kr']) == {}
    assert runner.basis_ecp('sto-3g', ['I']) == {}
    assert runner.basis_ecp('no-such-basis', ['H']) == {}
    assert runner.basis_ecp('def2-svp', ['I', 'H', 'I']) == {'I': 'def2-svp'}


# --- the profile-free commands -------------------------------------------------------------------------------

BAD_COMMANDS = {
    'run-grid-level-negative': (
        ['run', 'h2', '--grid-level', '-1'],
        2,
        "'--grid-level': -1 is not in the range 0<=x<=9",
    ),
    'run-grid-level-ten': (['run', 'h2', '--grid-level', '10'], 2, 'is not in the range 0<=x<=9'),
    'run-grid-level-word': (['run', 'h2', '--grid-level', 'fine'], 2, "'fine' is not a valid integer"),
    'run-spin-negative': (['run', 'h', '--spin', '-1'], 2, "'--spin': -1 is not in the range x>=0"),
    'run-charge-float': (['run', 'h2', '--charge', '0.5'], 2, "'0.5' is not a valid integer"),
    'run-ecp-basis': (['run', 'I 0 0 0; I 0 0 2.66', '-b', 'def2-svp'], 1, 'effective core potentials for I'),
    'run-coincident-atoms': (['run', 'H 0 0 0; H 0 0 0.01', '-b', 'sto-3g'], 1, 'closer than 0.1 Angstrom'),
    'run-too-few-functions': (['run', 'He 0 0 0', '-b', 'sto-3g', '--charge', '-1', '--spin', '1'], 1, 'do not fit'),
    'run-unknown-basis': (['run', 'h2', '-b', 'no-such-basis'], 1, 'cannot build the molecule'),
    'run-impossible-spin': (['run', 'h2', '-b', 'sto-3g', '--spin', '1'], 1, 'cannot build the molecule'),
    'run-missing-checkpoint': (['run', 'h2', '-b', 'sto-3g', '-f', '/nonexistent/x.safetensors'], 1, 'does not exist'),
    'weights-import-name-parent': (
        ['weights', 'import', '{upstream}/DM21', '--name', '../x', '--no-store'],
        1,
        'cannot be a file name',
    ),
    'weights-import-name-absolute': (
        ['weights', 'import', '{upstream}/DM21', '--name', '/tmp/aiida-dm21-abs', '--no-store', '--no-verify'],
        1,
        'cannot be a file name in the weights folder',
    ),
    'weights-import-name-hidden': (
        ['weights', 'import', '{upstream}/DM21', '--name', '.hidden', '--no-store', '--no-verify'],
        1,
        'cannot be a file name',
    ),
    'weights-import-not-a-folder': (['weights', 'import', '/nonexistent-folder', '--no-store'], 2, 'does not exist'),
    'weights-fetch-unknown': (['weights', 'fetch', 'DM99', '--source', '{upstream}', '--no-store'], 1, 'unknown'),
    'fractional-grid-level': (['fractional-curve', 'h', '--grid-level', '12'], 2, 'is not in the range 0<=x<=9'),
    'fractional-spin-negative': (['fractional-curve', 'h', '--spin', '-2'], 2, 'is not in the range x>=0'),
    'fractional-spin-next-negative': (['fractional-curve', 'h', '--spin-next', '-1'], 2, 'is not in the range x>=0'),
    'fractional-one-point': (['fractional-curve', 'h', '--points', '1'], 2, 'at least 2 points'),
    'fractional-table-suffix': (['fractional-curve', 'h', '--table', 'out.txt'], 2, 'use a .csv or .json file'),
    'fractional-picture-suffix': (['fractional-curve', 'h', '-o', 'curve.jpg'], 2, 'the picture is a PNG'),
    'fractional-spin-next-with-spin': (['fractional-curve', 'h', '--kind', 'spin', '--spin-next', '0'], 2, 'only for'),
    'fractional-kind': (['fractional-curve', 'h', '--kind', 'orbital'], 2, "'orbital' is not one of"),
    'fractional-ecp-basis': (['fractional-curve', 'I 0 0 0', '-b', 'def2-svp', '-f', 'b3lyp5'], 1, 'effective core'),
}


@pytest.mark.parametrize('case', list(BAD_COMMANDS))
def test_command_refuses_bad_input(case, upstream_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('AIIDA_DM21_WEIGHTS_DIR', str(tmp_path / 'weights'))
    monkeypatch.chdir(tmp_path)
    args, exit_code, message = BAD_COMMANDS[case]
    args = [arg.replace('{upstream}', str(upstream_dir)) for arg in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == exit_code, result.output
    assert message in result.output
    assert 'Traceback' not in result.output and not isinstance(result.exception, (TypeError, AttributeError))
    assert not list((tmp_path).rglob('*.safetensors')) or case.startswith('weights-fetch')
    assert not Path('/tmp/aiida-dm21-abs.safetensors').exists() and not (tmp_path.parent / 'x.safetensors').exists()


# --- refusals of the KS API (functional/scf.py) ------------------------------------------------------------


def _ks(atom: str, basis: str = 'sto-3g', network: t.Any = None, **mol_kwargs):
    from pyscf import gto

    import aiida_dm21

    mol = gto.M(atom=atom, basis=basis, unit='Angstrom', verbose=0, **mol_kwargs)
    torch.manual_seed(0)
    mf = aiida_dm21.KS(mol, network if network is not None else DM21Network())
    mf.grids.level = 0
    return mf


def _nan_network() -> DM21Network:
    network = DM21Network()
    with torch.no_grad():
        network.output_layer.bias.fill_(float('nan'))
    return network


KS_GAPS = {
    'ecp-basis-without-ecp': (
        lambda: _ks('I 0 0 0; I 0 0 2.66', 'def2-svp'),
        'KS accepts a def2 molecule of I built without ecp=: it would run 106 electrons in a valence basis',
    ),
    'more-electrons-than-functions': (
        lambda: _ks('He 0 0 0', charge=-1, spin=1).kernel(),
        'RuntimeError: Failed to assign mo_occ. nelec (2, 1) > Nmo (1) from PySCF inside kernel()',
    ),
    'near-coincident-atoms': (
        lambda: _ks('H 0 0 0; H 0 0 1e-3').kernel(),
        'converges to E = +526 Ha for H2 with 0.001 Angstrom bond: a wrong success',
    ),
    'nan-network': (
        lambda: _ks('H 0 0 0; H 0 0 0.74', network=_nan_network()).kernel(),
        'ValueError: array must not contain infs or NaNs (scipy, inside the SCF) instead of a refusal of the network',
    ),
    'functional-not-a-path': (
        lambda: _ks('H 0 0 0; H 0 0 0.74', network=123),
        'TypeError: expected str, bytes or os.PathLike object, not int (from pathlib)',
    ),
}


@pytest.mark.parametrize('case', list(KS_GAPS))
def test_ks_api_refuses(case):
    """Each of these gave a traceback or a wrong result (the text in KS_GAPS); now a ValueError naming the problem."""
    build, _before = KS_GAPS[case]
    with pytest.raises(ValueError) as info:
        result = build()
        if isinstance(result, float) and np.isfinite(result):
            pytest.fail(f'accepted: E = {result}')
    assert type(info.value).__module__.startswith('aiida_dm21')


def test_the_ecp_check_needs_no_torch():
    """The plugin layer's new checks (ECP, geometry, occupations) live in the runner module: PySCF, never PyTorch."""
    import subprocess
    import sys

    code = (
        'import sys; from aiida_dm21.runner.scf import basis_ecp, check_geometry, check_occupations; '
        "print(basis_ecp('def2-svp', ['I']), check_occupations((2, 1), 1, 'sto-3g') is not None, "
        "check_geometry(['H', 'H'], [[0, 0, 0], [0, 0, 0]]) is not None, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["{'I':", "'def2-svp'}", 'True', 'True', 'False'], done.stdout
