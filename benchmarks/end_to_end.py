"""The paper's kind of training run, end to end: reference data -> fine-tune DM21m -> held-out SCF -> lineage.

    AIIDA_PATH=/tmp/e2e-aiida python benchmarks/end_to_end.py [--quick] [--summary FILE] [--img-dir docs/img]

1. Reference data (``dm21.reference_data``, real PySCF: densities and energy terms in 6-31G, the CCSD(T) energy in
   ``--reference-basis``, default cc-pVQZ (6-31G's own with ``--quick`` or ``--reference-basis none``), one
   ``dm21.reference`` CalcJob per species) for the built-in sets ``light_train`` (H..N atoms and cations, H2/H2+,
   LiH/LiH+; or ``--train-set light_ne_train``, the same with Ne+/Ne) and ``light_heldout`` (O+/O, F+/F: no element
   in common with the training set), with many fractions δ
   (default 0.05 .. 0.95 in steps of 0.05) and spin fractions (0.025 .. 0.5 in steps of 0.025).
2. Fine-tuning of DeepMind's DM21m on the training set (``dm21.train`` in ``DM21TrainWorkChain``): mini-batches,
   a warm-up and cosine schedule, gradient clipping, a validation split with early stopping; the training grid
   is the SCF grid (``--grid-level``).  Inside the training job, before and after training: the fixed-density
   E_xc errors (train, validation, held-out), the self-consistent energies of O, O+, F, F+ against their CCSD(T)
   energies (taken from the held-out reference calculations) and the self-consistent O+ -> O fractional-charge
   curve with its largest deviation from the straight line.
3. The lineage of the trained checkpoint (:func:`aiida_dm21.provenance.checkpoint_lineage`): the reference
   CalcJobs it reaches are counted and compared with the reference CalcJobs the workchains ran.

It prints the system counts, the wall time of each stage (with the load average, these 2 cores are shared),
the peak resident memory (this process; and the CalcJobs' processes, sampled from ``/proc`` every 0.5 s), the
before/after errors and the lineage check; it saves the E(N) curve PNG of the training job and a learning-curve
PNG into ``--img-dir`` and, with ``--summary``, everything as JSON.  ``--quick``: one δ and one spin fraction,
2 epochs on grid level 1 (a few minutes: the test of this script).  The exit status is 1 if a stage fails or a
check does not hold.

It needs an AiiDA profile: the loaded/default one of ``AIIDA_PATH``, else one is created with ``verdi presto
--use-zeromq`` (as ``aiida-dm21 demo`` does); use a fresh ``AIIDA_PATH`` to keep this out of your own profile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

from aiida_dm21.reference.constants import fractions_problem  # light: no PySCF
from aiida_dm21.training.config import KINDS, TrainConfig  # light: no PyTorch

TRAIN_SET, HELDOUT_SET = 'light_train', 'light_heldout'
#: the training sets ``--train-set`` may name: none shares an element with HELDOUT_SET (tests/test_species_sets.py)
TRAIN_SETS = ('light_train', 'light_ne_train')
BASIS = '6-31g'
#: the held-out atoms of the self-consistent evaluation: label -> (atom, charge, 2S)
HELDOUT_SCF = {'O': ('O 0 0 0', 0, 2), 'O+': ('O 0 0 0', 1, 3), 'F': ('F 0 0 0', 0, 1), 'F+': ('F 0 0 0', 1, 2)}
#: the held-out fractional-charge curve: O+ (N electrons, 2S = 3) -> O (N + 1, 2S = 2)
HELDOUT_CURVE = {'atom': 'O 0 0 0', 'charge': 1, 'spin': 3, 'spin_next': 2, 'label': 'O+ -> O'}


def _non_negative(text: str) -> float:
    """argparse type: a finite number >= 0 (the regulariser weight)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f'{text!r} must be a finite number >= 0')
    return value


def _kind_weights(text: str) -> dict[str, float]:
    """argparse type: ``integer=10,fc=1,fs=1`` -> the training's ``kind_weights`` (kinds left out weigh 1)."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(','))):
        kind, sep, value = item.partition('=')
        kind = kind.strip().lower()
        if not sep or kind not in KINDS:
            raise argparse.ArgumentTypeError(f'{item!r}: expected KIND=WEIGHT with KIND one of {", ".join(KINDS)}')
        weights[kind] = _non_negative(value)
    if not weights:
        raise argparse.ArgumentTypeError('no KIND=WEIGHT given')
    return {**dict.fromkeys(KINDS, 1.0), **weights}


def _fraction_list(name: str):
    """argparse type: a comma list for the ``dm21.reference_data`` input ``name``, refused as the workchain refuses
    it (:func:`~aiida_dm21.reference.constants.fractions_problem`), sorted."""

    def parse(text: str) -> list[float]:
        values = []
        for item in filter(None, (part.strip() for part in text.split(','))):
            try:
                values.append(float(item))
            except ValueError:
                raise argparse.ArgumentTypeError(f'{text!r}: {item!r} is not a number') from None
        problem = fractions_problem(name, values)
        if problem:
            raise argparse.ArgumentTypeError(f'{text!r}: {problem}')
        return sorted(set(values))

    return parse


def _steps(start: float, stop: float, step: float) -> list[float]:
    return [round(start + i * step, 6) for i in range(round((stop - start) / step) + 1)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='a tiny version: one δ, 2 epochs, grid level 1')
    parser.add_argument('--summary', type=Path, default=None, help='write the results as JSON to this file')
    parser.add_argument(
        '--img-dir', type=Path, default=None, help='where the PNGs go (default docs/img; --quick: none)'
    )
    parser.add_argument(
        '--train-set',
        choices=TRAIN_SETS,
        default=TRAIN_SET,
        help=f'species set to train on (default {TRAIN_SET}; light_ne_train adds Ne+/Ne beyond the held-out O, F)',
    )
    parser.add_argument('--grid-level', type=int, default=None, help='training = SCF grid (default 2; quick 1)')
    parser.add_argument('--epochs', type=int, default=None, help='at most this many epochs (default 6; quick 2)')
    parser.add_argument('--learning-rate', type=float, default=1e-4)
    parser.add_argument(
        '--regulariser-weight',
        type=_non_negative,
        default=1.0,
        help='λ of the self-consistency regulariser (default 1)',
    )
    parser.add_argument(
        '--reference-basis',
        default=None,
        help='basis of the CCSD(T) reference energies (default cc-pvqz; quick: none = the 6-31G of the densities)',
    )
    parser.add_argument(
        '--kind-weights',
        type=_kind_weights,
        default=None,
        help='loss weight per system kind, e.g. integer=20 (default: 1 each)',
    )
    parser.add_argument(
        '--constraint-weight',
        type=_non_negative,
        default=0.0,
        help='μ of the reference-free exact conditions of the FC/FS systems (default 0: off)',
    )
    parser.add_argument(
        '--anchor-weight',
        type=_non_negative,
        default=0.0,
        help='α of the anchor to DM21m, + α Σ (θ − θ⁰)² (default 0: off)',
    )
    parser.add_argument(
        '--deltas',
        type=_fraction_list('deltas'),
        default=None,
        help='FC fractions δ, comma-separated (default 0.05 … 0.95 in steps of 0.05; quick 0.5)',
    )
    parser.add_argument(
        '--spin-fractions',
        type=_fraction_list('spin_fractions'),
        default=None,
        help='FS spin fractions, comma-separated (default 0.025 … 0.5 in steps of 0.025; quick 0.5)',
    )
    parser.add_argument('--batch-size', type=int, default=None, help='systems per step (default 8; quick 4)')
    parser.add_argument(
        '--patience', type=int, default=None, help='early stopping (default 2; quick 1; 0 without a validation split)'
    )
    parser.add_argument(
        '--validation-fraction', type=float, default=None, help='default 0.1; quick 0.2; 0: no validation split'
    )
    parser.add_argument('--reference-batch', type=int, default=None, help='species per CalcJob (default 1; quick 10)')
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        'grid_level': 1 if quick else 2,
        'epochs': 2 if quick else 6,
        'batch_size': 4 if quick else 8,
        'patience': 1 if quick else 2,
        'validation_fraction': 0.2 if quick else 0.1,
        'reference_batch': 10 if quick else 1,
    }
    if args.validation_fraction == 0 and args.patience is None:
        defaults['patience'] = 0  # early stopping needs a validation split
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reference_basis is None:
        args.reference_basis = 'none' if quick else 'cc-pvqz'
    if args.reference_basis.strip().lower() in ('none', '', BASIS):
        args.reference_basis = None
    if args.deltas is None:
        args.deltas = [0.5] if quick else _steps(0.05, 0.95, 0.05)
    if args.spin_fractions is None:
        args.spin_fractions = [0.5] if quick else _steps(0.025, 0.5, 0.025)
    if args.img_dir is None and not quick:
        args.img_dir = Path(__file__).resolve().parents[1] / 'docs' / 'img'
    # the training job's own validation (light: no PyTorch), now rather than after the reference data
    try:
        TrainConfig.from_dict(training_parameters(args, dict.fromkeys(HELDOUT_SCF, 0.0)))
    except ValueError as exc:
        parser.error(f'the training would be refused: {exc}')
    return args


class ProcessSampler:
    """Peak resident memory (VmHWM) of the processes running in a folder (the CalcJobs), sampled from /proc."""

    def __init__(self, folder: str, interval: float = 0.5) -> None:
        self.folder = os.path.realpath(folder)
        self.interval = interval
        self.peak_kb: dict[int, tuple[int, str]] = {}  # pid -> (VmHWM kB, command line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for entry in os.scandir('/proc'):
                if not entry.name.isdigit():
                    continue
                try:
                    cwd = os.readlink(f'/proc/{entry.name}/cwd')
                    if not cwd.startswith(self.folder):
                        continue
                    with open(f'/proc/{entry.name}/status') as handle:
                        hwm = next((int(line.split()[1]) for line in handle if line.startswith('VmHWM:')), 0)
                    with open(f'/proc/{entry.name}/cmdline', 'rb') as handle:
                        cmd = handle.read().replace(b'\0', b' ').decode(errors='replace')
                except (OSError, StopIteration, ValueError):
                    continue
                pid = int(entry.name)
                if hwm > self.peak_kb.get(pid, (0, ''))[0]:
                    self.peak_kb[pid] = (hwm, cmd)

    def peak_mb(self, contains: str) -> float | None:
        values = [kb for kb, cmd in self.peak_kb.values() if contains in cmd and 'python' in cmd]
        return max(values) / 1024 if values else None


class Stage:
    """Wall time and load average of one stage."""

    def __init__(self, name: str, record: dict) -> None:
        self.name, self.record = name, record

    def __enter__(self) -> Stage:
        self.start = time.perf_counter()
        self.load_start = os.getloadavg()[0]
        print(f'[{time.strftime("%H:%M:%S")}] {self.name} ...', flush=True)
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.start
        load = os.getloadavg()
        self.record[self.name] = {'wall_s': wall, 'load_start': self.load_start, 'load_end_1min': load[0]}
        self.record[self.name]['load_end_5min'] = load[1]
        print(f'[{time.strftime("%H:%M:%S")}] {self.name}: {wall:.1f} s (load average {load[0]:.2f})', flush=True)


def heldout_references(dataset) -> dict[str, float]:
    """Reference energy (Ha) of every species that went into ``dataset`` (from its reference output arrays)."""
    from aiida.common.links import LinkType

    energies = {}
    for link in dataset.creator.base.links.get_incoming(link_type=LinkType.INPUT_CALC).all():
        spec, scalars = link.node.base.attributes.get('spec', None), link.node.base.attributes.get('scalars', None)
        if spec and scalars and 'e_ref' in scalars:
            energies[spec['label']] = float(scalars['e_ref'])
    return energies


def training_parameters(args, e_ref: dict[str, float]) -> dict:
    scf = [
        {'atom': atom, 'basis': BASIS, 'charge': charge, 'spin': spin, 'e_ref': e_ref[label], 'label': label}
        for label, (atom, charge, spin) in HELDOUT_SCF.items()
    ]
    return {
        'name': 'dm21m-light' + ('-quick' if args.quick else ''),
        'epochs': args.epochs,
        'learning_rate': args.learning_rate,
        'regulariser_weight': args.regulariser_weight,
        'batch_size': args.batch_size,
        'lr_schedule': 'cosine',
        'warmup_epochs': 1,
        'max_grad_norm': 1.0,
        'validation_fraction': args.validation_fraction,
        'kind_weights': args.kind_weights or dict.fromkeys(KINDS, 1.0),
        'constraint_weight': args.constraint_weight,
        'anchor_weight': args.anchor_weight,
        'patience': args.patience,
        'grid_level': args.grid_level,
        'save_every': 1,
        'scf_evaluation': scf,
        'fractional_evaluation': {**HELDOUT_CURVE, 'basis': BASIS},
    }


def target_label(reference_basis: str | None) -> str:
    """What the energies are compared with: 'CCSD(T)/6-31G' or 'CCSD(T)/cc-pVQZ' (on 6-31G densities)."""
    return f'CCSD(T)/{reference_basis or BASIS}'


def plot_learning_curve(
    history: dict, path: Path, reference_basis: str | None = None, train_set: str = TRAIN_SET
) -> Path:
    """Per-epoch RMS E_xc error (training) and the validation loss as an RMS (mHa), log scale."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.6), layout='constrained')
    ax = fig.add_subplot()
    epoch = np.asarray(history['epoch'])
    ax.plot(epoch, np.sqrt(history['energy_loss']) * 1e3, 'o-', label='training: RMS E_xc error')
    ax.plot(epoch, np.sqrt(history['loss']) * 1e3, 's--', label='training: √loss (with regulariser)')
    if 'validation_loss' in history:
        ax.plot(epoch, np.sqrt(history['validation_loss']) * 1e3, 'd-', label='validation: √loss')
    ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.set_ylabel('mHa')
    ax.set_title(f'fine-tuning DM21m on {train_set} (6-31G, targets {target_label(reference_basis)})', fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return path


def _num(value) -> str:
    return 'n/a' if value is None else f'{value:.2f}'


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    summary: dict = {'quick': args.quick, 'stages': {}, 'ok': False, 'failures': []}
    stages = summary['stages']

    from aiida_dm21.cli.aiida_support import ensure_code, load_profile

    load_profile(None, create=True)
    import logging

    from aiida import engine, orm

    from aiida_dm21.data.checkpoint import DM21CheckpointData
    from aiida_dm21.functional.checkpoint import weights_dir
    from aiida_dm21.provenance import checkpoint_lineage
    from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain
    from aiida_dm21.workflows.train import DM21TrainWorkChain

    logging.getLogger('aiida').setLevel('REPORT')
    code = ensure_code()
    weights = weights_dir() / 'DM21m.safetensors'
    if not weights.is_file():
        print(f'DM21m is not installed ({weights}): `aiida-dm21 weights fetch DM21m` first', file=sys.stderr)
        return 1
    initial = DM21CheckpointData.get_or_create(weights)
    workdir = code.computer.get_workdir()
    summary['settings'] = {
        'basis': BASIS,
        'train_set': args.train_set,
        'heldout_set': HELDOUT_SET,
        'reference_basis': args.reference_basis,
        'deltas': args.deltas,
        'spin_fractions': args.spin_fractions,
        'reference_batch': args.reference_batch,
        'with_sources': args.constraint_weight > 0,
        'profile': orm.User.collection.get_default().email,
        'cpus': os.cpu_count(),
    }

    def finish(code_: int) -> int:
        summary['wall_s'] = time.perf_counter() - start
        summary['peak_rss_mb'] = {
            'script': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            'reference_jobs': sampler.peak_mb('aiida_dm21.runner.reference'),
            'training_job': sampler.peak_mb('aiida_dm21.training.train'),
        }
        rss = summary['peak_rss_mb']
        print(
            f'\npeak RSS: this process {_num(rss["script"])} MB, reference CalcJobs {_num(rss["reference_jobs"])} MB, '
            f'training CalcJob {_num(rss["training_job"])} MB (sampled every 0.5 s); total {summary["wall_s"]:.0f} s'
        )
        summary['ok'] = code_ == 0
        if args.summary:
            args.summary.write_text(json.dumps(summary, indent=1, default=str))
        return code_

    sampler = ProcessSampler(workdir)
    with sampler:
        # 1. reference data
        datasets, jobs = {}, {}
        for role, name in (('train', args.train_set), ('heldout', HELDOUT_SET)):
            builder = ReferenceDataWorkChain.get_builder()
            builder.code = code
            builder.set_name = orm.Str(name)
            builder.basis = orm.Str(BASIS)
            if args.reference_basis is not None:
                builder.reference_basis = orm.Str(args.reference_basis)
            builder.deltas = orm.List(args.deltas)
            # the exact conditions need every FC/FS system's integer sources among the systems (light's cations)
            builder.with_sources = orm.Bool(args.constraint_weight > 0)
            builder.spin_fractions = orm.List(args.spin_fractions)
            builder.batch_size = orm.Int(args.reference_batch)
            builder.max_concurrent = orm.Int(4)
            with Stage(f'reference data {name}', stages):
                _, node = engine.run_get_node(builder)
            stages[f'reference data {name}']['pk'] = node.pk
            jobs[role] = [n for n in node.called if isinstance(n, orm.CalcJobNode)]
            if not node.is_finished_ok:
                summary['failures'].append(f'{name}: exit {node.exit_status} {node.exit_message}')
                print(f'reference data {name} failed: see `verdi process report {node.pk}`', file=sys.stderr)
                return finish(1)
            datasets[role] = node.outputs.dataset
        counts = {
            role: {
                'n_systems': ds.n_systems,
                'kinds': ds.base.attributes.get('kinds'),
                'reference_jobs': len(jobs[role]),
                'reference_jobs_ok': sum(j.is_finished_ok for j in jobs[role]),
                'reference_job_types': sorted({j.process_type for j in jobs[role]}),
            }
            for role, ds in datasets.items()
        }
        summary['systems'] = counts
        e_ref = heldout_references(datasets['heldout'])
        summary['heldout_e_ref'] = {label: e_ref.get(label) for label in HELDOUT_SCF}
        missing = [label for label in HELDOUT_SCF if label not in e_ref]
        if missing:
            summary['failures'].append(f'no reference energy for {missing}')
            return finish(1)

        # 2. training
        parameters = training_parameters(args, e_ref)
        summary['training_parameters'] = {k: v for k, v in parameters.items() if k != 'scf_evaluation'}
        builder = DM21TrainWorkChain.get_builder()
        builder.train.code = code
        builder.train.datasets = {'train': datasets['train']}
        builder.train.heldout = {'heldout': datasets['heldout']}
        builder.train.parameters = orm.Dict(parameters)
        builder.train.initial_checkpoint = initial
        with Stage('training', stages):
            results, node = engine.run_get_node(builder)
        stages['training']['pk'] = node.pk
        if not node.is_finished_ok:
            summary['failures'].append(f'training: exit {node.exit_status} {node.exit_message}')
            print(f'training failed: see `verdi process report {node.pk}`', file=sys.stderr)
            return finish(1)
    metrics = results['metrics'].get_dict()
    curves = results['loss_curves']
    history = {name: curves.get_array(name).tolist() for name in curves.get_arraynames()}
    summary['history'] = history
    summary['metrics'] = metrics
    stages['training']['epochs_run'] = len(history['epoch'])
    stages['training']['epochs_wall_s'] = float(sum(history['wall_s']))
    stages['training']['job_wall_s'] = metrics.get('wall_s')

    # 3. lineage
    checkpoint = results['checkpoint']
    with Stage('lineage', stages):
        lineage = checkpoint_lineage(checkpoint)
    reached = {ref.pk for d in lineage.datasets for ref in d.references}
    ran_ok = {j.pk for role in jobs for j in jobs[role] if j.is_finished_ok}
    reached_train = {ref.pk for ref in lineage.reference_calculations}
    train_ok = {j.pk for j in jobs['train'] if j.is_finished_ok}
    summary['lineage'] = {
        'checkpoint_pk': checkpoint.pk,
        'training_pk': lineage.training.pk if lineage.training else None,
        'initial_source': lineage.initial.source if lineage.initial else None,
        'datasets': [(d.role, d.dataset.pk, len(d.systems), len(d.references)) for d in lineage.datasets],
        'reference_calcjobs_reached': len(reached),
        'reference_calcjobs_run': sum(len(v) for v in jobs.values()),
        'reference_calcjobs_run_ok': len(ran_ok),
        'train_reference_calcjobs_reached': len(reached_train),
        'train_reference_calcjobs_run_ok': len(train_ok),
        'all_reached': reached == ran_ok and reached_train == train_ok,
        'command': f'aiida-dm21 checkpoint lineage {checkpoint.pk}',
    }
    if not summary['lineage']['all_reached']:
        summary['failures'].append('the lineage does not reach exactly the reference CalcJobs that ran')

    # 4. pictures
    images = {}
    if args.img_dir is not None:
        args.img_dir.mkdir(parents=True, exist_ok=True)
        if 'fractional_plot' in results:
            path = args.img_dir / 'e2e_fractional_curve.png'
            with results['fractional_plot'].open(mode='rb') as handle, open(path, 'wb') as out:
                shutil.copyfileobj(handle, out)
            images['fractional_curve'] = str(path)
        images['learning_curve'] = str(
            plot_learning_curve(history, args.img_dir / 'e2e_learning_curve.png', args.reference_basis, args.train_set)
        )
        for key, path in images.items():
            size = Path(path).stat().st_size
            images[key] = {'path': path, 'bytes': size}
            if size > 200_000:
                summary['failures'].append(f'{path} is {size} bytes (> 200 kB)')
    elif 'fractional_plot' not in results:
        summary['failures'].append('the training job wrote no fractional_plot')
    summary['images'] = images

    # checks and the table
    before, after = metrics.get('before', {}), metrics.get('after', {})
    for when, block in (('before', before), ('after', after)):
        scf = block.get('scf', {})
        if not _finite(scf.get('scf_mae_mha')):
            summary['failures'].append(f'{when}: no finite held-out SCF MAE')
        if not _finite(scf.get('fractional_charge', {}).get('max_abs_deviation_mha')):
            summary['failures'].append(f'{when}: no finite held-out FC deviation')
        for split in ('train', 'validation', 'heldout') if args.validation_fraction > 0 else ('train', 'heldout'):
            if not _finite(block.get(split, {}).get('mae_all_mha')):
                summary['failures'].append(f'{when}: no finite {split} MAE')
    if counts['train']['n_systems'] < (1 if args.quick else 300):
        summary['failures'].append(f'only {counts["train"]["n_systems"]} training systems')
    print_report(summary, metrics, history)
    if summary['failures']:
        print('FAILED: ' + '; '.join(summary['failures']), file=sys.stderr)
        return finish(1)
    return finish(0)


def print_report(summary: dict, metrics: dict, history: dict) -> None:
    counts, lin = summary['systems'], summary['lineage']
    before, after = metrics.get('before', {}), metrics.get('after', {})
    print('\n== systems ==')
    for role, c in counts.items():
        print(f'{role:>8}: {c["n_systems"]} systems {c["kinds"]} from {c["reference_jobs"]} reference CalcJobs')
    print(
        f'training split: {metrics.get("n_train_systems")} train, {metrics.get("n_validation_systems")} validation, '
        f'{metrics.get("n_heldout_systems")} held out; {metrics.get("n_grid_points")} grid points (train); '
        f'grid {metrics.get("grid")}'
    )
    print('\n== wall time ==')
    for name, st in summary['stages'].items():
        print(f'{name:<32} {st["wall_s"]:8.1f} s   load average {st["load_start"]:.2f} -> {st["load_end_1min"]:.2f}')
    print(
        f'epochs run {len(history["epoch"])} (best {metrics.get("best_epoch")}, '
        f'stopped early at {metrics.get("stopped_early_at_epoch")}); epoch walls '
        + ', '.join(f'{w:.0f}' for w in history['wall_s'])
        + ' s; ‖θ − θ⁰‖ of the checkpoint '
        + (f'{metrics["weight_change"]:.4g}' if _finite(metrics.get('weight_change')) else 'n/a')
    )
    print('\n== fixed-density E_xc MAE (mHa): DM21m -> fine-tuned ==')
    # r FC / r FS: mean |r| of the exact conditions (E(N+δ) − linear, E(ens) − E(pure)), no reference in them
    print(f'{"split":<11} ' + ' '.join(f'{h:>17}' for h in ('all', 'FC', 'FS', 'integer', 'r FC', 'r FS')))
    keys = ('all', 'fc', 'fs', 'integer', 'constraint_fc', 'constraint_fs')
    for split in ('train', 'validation', 'heldout'):
        b, a = before.get(split, {}), after.get(split, {})
        cells = [f'{_num(b.get(f"mae_{k}_mha"))} -> {_num(a.get(f"mae_{k}_mha"))}' for k in keys]
        print(f'{split:<11} ' + ' '.join(f'{c:>17}' for c in cells))
    level = summary['training_parameters']['grid_level']
    target = target_label(summary['settings']['reference_basis'])
    print(f'\n== held-out SCF (grid level {level}, 6-31G): error vs {target} (mHa) ==')
    rows_b = {r['label']: r for r in before.get('scf', {}).get('species', [])}
    rows_a = {r['label']: r for r in after.get('scf', {}).get('species', [])}
    for label in rows_b:
        rb, ra = rows_b[label], rows_a.get(label, {})
        print(
            f'{label:<4} E_ref {rb["e_ref"]:.6f}  DM21m {_num(rb["error_mha"])} (conv {rb["converged"]})  ->  '
            f'fine-tuned {_num(ra.get("error_mha"))} (conv {ra.get("converged")})'
        )
    print(
        f'SCF MAE {_num(before.get("scf", {}).get("scf_mae_mha"))} -> {_num(after.get("scf", {}).get("scf_mae_mha"))}'
    )
    fb = before.get('scf', {}).get('fractional_charge', {})
    fa = after.get('scf', {}).get('fractional_charge', {})
    print(
        f'held-out {fb.get("label")} max |E(N+δ) - linear| {_num(fb.get("max_abs_deviation_mha"))} -> '
        f'{_num(fa.get("max_abs_deviation_mha"))} mHa (converged points {sum(fb.get("converged", []))} -> '
        f'{sum(fa.get("converged", []))} of {len(fa.get("converged", []))})'
    )
    print('\n== lineage ==')
    print(
        f'checkpoint<{lin["checkpoint_pk"]}> <- dm21.train<{lin["training_pk"]}> <- datasets {lin["datasets"]}; '
        f'fine-tuned from {lin["initial_source"]}'
    )
    print(
        f'reference CalcJobs reached {lin["reference_calcjobs_reached"]} / run {lin["reference_calcjobs_run"]} '
        f'(ok {lin["reference_calcjobs_run_ok"]}); training set only {lin["train_reference_calcjobs_reached"]} / '
        f'{lin["train_reference_calcjobs_run_ok"]}: {"OK" if lin["all_reached"] else "MISMATCH"}'
    )
    print(f'  ({lin["command"]})')
    for key, img in summary['images'].items():
        print(f'image {key}: {img["path"]} ({img["bytes"]} bytes)')


if __name__ == '__main__':
    sys.exit(main())
