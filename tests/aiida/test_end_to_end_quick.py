"""``benchmarks/end_to_end.py --quick`` in a subprocess with a private AIIDA_PATH: every stage runs for real
(CCSD(T)/6-31G reference data of light_train and light_heldout, fine-tuning DM21m for at most 2 epochs on
grid level 1, the held-out SCF and fractional-charge evaluation, the lineage) and its JSON summary holds the
counts, finite errors and a lineage that reaches exactly the reference CalcJobs that ran."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.aiida, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / 'benchmarks' / 'end_to_end.py'


def _script():
    """``benchmarks/end_to_end.py`` loaded as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location('end_to_end', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_end_to_end_quick(isolated, tmp_path):
    from aiida_dm21.functional.checkpoint import weights_dir

    if not (weights_dir() / 'DM21m.safetensors').is_file():
        pytest.skip('DM21m is not installed (aiida-dm21 fetch DM21m)')
    aiida = isolated('e2e')
    summary_path, img = tmp_path / 'summary.json', tmp_path / 'img'
    done = aiida.run(str(SCRIPT), '--quick', '--summary', str(summary_path), '--img-dir', str(img), timeout=900)
    summary = json.loads(summary_path.read_text())
    assert summary['ok'] is True and summary['failures'] == []
    assert summary['quick'] is True
    # no profile in the private AIIDA_PATH: the script made its own (verdi presto), as the demo does
    assert (aiida.root / '.aiida').is_dir()

    # the systems: one δ, one spin fraction (light_train: 10 FC pairs, 6 FS species, 9 integers)
    assert summary['settings']['deltas'] == [0.5] and summary['settings']['spin_fractions'] == [0.5]
    train, heldout = summary['systems']['train'], summary['systems']['heldout']
    assert train['n_systems'] == 25 and train['kinds'] == {'fc': 10, 'fs': 6, 'integer': 9}
    assert heldout['n_systems'] == 6 and heldout['kinds'] == {'fc': 2, 'fs': 2, 'integer': 2}
    assert train['reference_jobs'] == 2 and heldout['reference_jobs'] == 1  # batches of 10 species
    metrics = summary['metrics']
    assert metrics['n_train_systems'] + metrics['n_validation_systems'] == 25
    assert metrics['n_validation_systems'] == 5 and metrics['n_heldout_systems'] == 6
    assert metrics['grid']['level'] == 1 == summary['training_parameters']['grid_level']

    # every stage finished, with a wall time and a load average
    stages = summary['stages']
    assert list(stages) == ['reference data light_train', 'reference data light_heldout', 'training', 'lineage']
    for stage in stages.values():
        assert _finite(stage['wall_s']) and stage['wall_s'] >= 0 and _finite(stage['load_end_1min'])
    assert 1 <= stages['training']['epochs_run'] <= 2
    assert len(summary['history']['epoch']) == stages['training']['epochs_run']
    assert all(_finite(x) for key in ('loss', 'energy_loss', 'validation_loss') for x in summary['history'][key])
    assert _finite(summary['peak_rss_mb']['script']) and summary['peak_rss_mb']['script'] > 0

    # fixed-density errors before and after, on every split
    for when in ('before', 'after'):
        for split in ('train', 'validation', 'heldout'):
            assert _finite(metrics[when][split]['mae_all_mha']), (when, split)
        assert _finite(metrics[when]['heldout']['mae_fc_mha']) and _finite(metrics[when]['heldout']['mae_fs_mha'])

    # held-out SCF against the CCSD(T) energies of the held-out reference calculations
    e_ref = summary['heldout_e_ref']
    assert set(e_ref) == {'O', 'O+', 'F', 'F+'}
    assert -75.2 < e_ref['O'] < -74.5 and -100.0 < e_ref['F'] < -99.0  # CCSD(T)/6-31G: not hard-coded
    assert e_ref['O+'] > e_ref['O'] and e_ref['F+'] > e_ref['F']  # cations above the atoms
    for when in ('before', 'after'):
        scf = metrics[when]['scf']
        rows = {row['label']: row for row in scf['species']}
        assert set(rows) == set(e_ref)
        for label, row in rows.items():
            assert row['e_ref'] == pytest.approx(e_ref[label])
            assert _finite(row['energy']) and row['error_mha'] == pytest.approx((row['energy'] - row['e_ref']) * 1e3)
        assert _finite(scf['scf_mae_mha'])
        curve = scf['fractional_charge']
        assert curve['label'] == 'O+ -> O' and curve['delta'] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert _finite(curve['max_abs_deviation_mha'])
    # the initial and trained functional differ
    assert metrics['before']['scf']['species'][0]['energy'] != metrics['after']['scf']['species'][0]['energy']

    # the lineage reaches every reference CalcJob that ran, no more
    lineage = summary['lineage']
    assert lineage['reference_calcjobs_reached'] == lineage['reference_calcjobs_run'] == 3
    assert lineage['reference_calcjobs_run_ok'] == 3
    assert lineage['train_reference_calcjobs_reached'] == lineage['train_reference_calcjobs_run_ok'] == 2
    assert lineage['all_reached'] is True
    assert lineage['initial_source'] == 'deepmind:DM21m'
    assert sorted(role for role, *_ in lineage['datasets']) == ['heldout', 'train']

    # the pictures: PNGs under 200 kB
    for key in ('fractional_curve', 'learning_curve'):
        path = Path(summary['images'][key]['path'])
        assert path.parent == img and path.read_bytes().startswith(b'\x89PNG')
        assert 0 < path.stat().st_size < 200_000

    # and the printed report
    headings = ('== systems ==', '== wall time ==', '== fixed-density E_xc MAE', '== held-out SCF', '== lineage ==')
    for heading in headings:
        assert heading in done.stdout
    assert 'reference CalcJobs reached 3 / run 3 (ok 3)' in done.stdout and ': OK' in done.stdout


@pytest.mark.parametrize('flag', ['regulariser-weight', 'constraint-weight', 'anchor-weight'])
@pytest.mark.parametrize('value', ['-1', 'nan', 'inf', 'heavy'])
def test_a_bad_loss_weight_is_refused_before_anything_runs(flag, value, capsys):
    """``--regulariser-weight``, ``--constraint-weight`` and ``--anchor-weight`` must be finite numbers >= 0:
    argparse refuses anything else (exit 2) with the value named; a good one reaches the training parameters."""
    module = _script()
    args = module.parse_args([f'--{flag}', '100'])
    key = flag.replace('-', '_')
    assert getattr(args, key) == 100.0
    assert module.training_parameters(args, dict.fromkeys(module.HELDOUT_SCF, -1.0))[key] == 100.0
    with pytest.raises(SystemExit) as info:
        module.parse_args([f'--{flag}', value])
    assert info.value.code == 2
    assert f"argument --{flag}: '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ('flag', 'value'),
    [
        *[('deltas', v) for v in ('0', '1', '0.5,1.2', 'nan', ',', 'half')],
        *[('spin-fractions', v) for v in ('0', '0.6', '-0.1', 'inf')],
    ],
)
def test_fractions_outside_their_range_are_refused(flag, value, capsys):
    """``--deltas`` lie in (0, 1) and ``--spin-fractions`` in (0, 1/2]: anything else is refused (exit 2), named;
    good lists are sorted and reach the arguments, and the defaults stay the 19 δ and 20 spin fractions."""
    module = _script()
    args = module.parse_args(['--deltas', '0.75,0.25', '--spin-fractions', '0.5'])
    assert args.deltas == [0.25, 0.75] and args.spin_fractions == [0.5]
    default = module.parse_args([])
    assert len(default.deltas) == 19 and len(default.spin_fractions) == 20 and default.spin_fractions[-1] == 0.5
    with pytest.raises(SystemExit) as info:
        module.parse_args([f'--{flag}', value])
    assert info.value.code == 2
    assert f"argument --{flag}: '{value}'" in capsys.readouterr().err


def test_the_reference_basis_defaults_to_cc_pvqz_and_none_keeps_the_densities_basis():
    module = _script()
    assert module.parse_args([]).reference_basis == 'cc-pvqz'
    assert module.parse_args(['--quick']).reference_basis is None
    assert module.parse_args(['--reference-basis', 'none']).reference_basis is None
    assert module.parse_args(['--reference-basis', '6-31g']).reference_basis is None
    assert module.parse_args(['--quick', '--reference-basis', 'cc-pvtz']).reference_basis == 'cc-pvtz'
    assert module.target_label(None) == 'CCSD(T)/6-31g' and module.target_label('cc-pvqz') == 'CCSD(T)/cc-pvqz'


@pytest.mark.parametrize(
    ('value', 'message'),
    [('integer', 'expected KIND=WEIGHT'), ('molecule=2', 'expected KIND=WEIGHT'), ('fc=-1', 'finite number >= 0')],
)
def test_kind_weights_reach_the_training_and_bad_ones_are_refused(value, message, capsys):
    """``--kind-weights integer=20`` sets the training's ``kind_weights`` (others 1); a bad one exits 2, named."""
    module = _script()
    args = module.parse_args(['--kind-weights', 'integer=20, fs=0.5'])
    assert args.kind_weights == {'integer': 20.0, 'fc': 1.0, 'fs': 0.5}
    assert module.training_parameters(args, dict.fromkeys(module.HELDOUT_SCF, -1.0))['kind_weights'] == {
        'integer': 20.0,
        'fc': 1.0,
        'fs': 0.5,
    }
    plain = module.parse_args([])
    assert module.training_parameters(plain, dict.fromkeys(module.HELDOUT_SCF, -1.0))['kind_weights'] == {
        'integer': 1.0,
        'fc': 1.0,
        'fs': 1.0,
    }
    with pytest.raises(SystemExit) as info:
        module.parse_args(['--kind-weights', value])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('value', ['light', 'light_heldout', 'dm21_like', 'no_such_set'])
def test_a_training_set_that_is_not_disjoint_from_the_heldout_set_is_refused(value, capsys):
    """``--train-set`` takes only sets that share no element with light_heldout (``light`` holds O and F): anything
    else is argparse's usage error, exit 2; the default stays light_train and light_ne_train is accepted."""
    module = _script()
    assert module.parse_args([]).train_set == 'light_train'
    assert module.parse_args(['--train-set', 'light_ne_train']).train_set == 'light_ne_train'
    with pytest.raises(SystemExit) as info:
        module.parse_args(['--train-set', value])
    assert info.value.code == 2
    assert f"argument --train-set: invalid choice: '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ('argv', 'message'),
    [
        (['--validation-fraction', '1.5'], '`validation_fraction` must be < 1'),
        (['--validation-fraction', 'nan'], '`validation_fraction` must be a finite number'),
        (['--validation-fraction', '0', '--patience', '2'], '`patience` (early stopping) needs a validation split'),
        (['--epochs', '-1'], '`epochs` must be an integer >= 0'),
        (['--batch-size', '0'], '`batch_size` must be an integer >= 1'),
        (['--grid-level', '12'], '`grid_level` must be a PySCF grid level 0-9'),
        (['--learning-rate', '0'], '`learning_rate` must be a finite number > 0'),
    ],
)
def test_a_training_the_job_would_refuse_is_refused_before_the_reference_data(argv, message, capsys):
    """The training parameters are checked by the training job's own validator when the arguments are parsed (exit
    2), not after minutes of reference calculations; without a validation split early stopping defaults to off."""
    module = _script()
    args = module.parse_args(['--validation-fraction', '0'])
    assert args.validation_fraction == 0 and args.patience == 0
    assert module.parse_args([]).patience == 2
    with pytest.raises(SystemExit) as info:
        module.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert 'the training would be refused' in err and message in err
