"""``dm21.reference_data``: integer reference calculations in batches, then the fractional dataset.

Give a built-in set name (``set_name``, see :mod:`aiida_dm21.reference.sets`) or your own ``species``
(a list of ``{label, atom, charge, multiplicity}`` with geometries in Angstrom) plus which fractional
systems to build.  The integer calculations run as ``dm21.reference`` CalcJobs of ``batch_size`` species
each (default 1: one CalcJob per species, as before batching existed; for hundreds or thousands of small
species use 20-100, see docs/performance.md).  At most ``max_concurrent`` CalcJobs are in flight (default:
all at once); the workchain submits them in waves of ``max_concurrent`` and submits the next wave when the
previous one has finished.  A species that failed (its job's per-species status ``failed``, or the whole job failed) is
retried alone, in a CalcJob of its own, up to ``max_retries`` times (default 1); a species that did not
converge is not retried (the same input does not converge twice).  Identical CalcJobs are reused
through AiiDA caching when caching is enabled for ``aiida.calculations:dm21.reference``; a failed job
(any exit code >= 300, including the batch's 430) is never reused.

A species still failing after its retries ends the workchain in 401 naming it (and its error); a reference
that did not converge (its CalcJob ends in 400, a batch lists it ``not_converged``, or an older finished
node records a ``False`` convergence flag) never enters the dataset: the workchain stops with 402 naming
the species.
"""

from __future__ import annotations

import typing as t

from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import WorkChain, append_, while_

from aiida_dm21.calculations.fractional import build_fractional_dataset
from aiida_dm21.calculations.reference import DM21ReferenceCalculation, link_label
from aiida_dm21.calculations.scf import validate_structure
from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.reference.constants import (  # no PySCF: frame_molecule is imported when used
    DENSITY_METHODS,
    FRACTION_BOUNDS,
    ReferenceInputError,
    density_method_problem,
    fractions_problem,
)
from aiida_dm21.reference.sets import SPECIES_SETS
from aiida_dm21.runner.reference import unconverged_steps
from aiida_dm21.workflows.options import options_validator, set_options

__all__ = ('ReferenceDataWorkChain', 'link_label', 'structure_from_atom', 'structure_from_atoms')


def structure_from_atoms(atoms) -> orm.StructureData:
    """A non-periodic StructureData in a 20 Angstrom box from ``[(symbol, (x, y, z)), ...]`` in Angstrom."""
    structure = orm.StructureData(pbc=(False, False, False), cell=[[20.0, 0, 0], [0, 20.0, 0], [0, 0, 20.0]])
    for symbol, position in atoms:
        structure.append_atom(position=[float(x) for x in position], symbols=symbol)
    return structure


def structure_from_atom(atom: str) -> orm.StructureData:
    """A non-periodic StructureData from a PySCF atom string (Angstrom)."""
    from pyscf import gto
    from pyscf.data.nist import BOHR

    try:
        atoms = gto.format_atom(atom, unit='Angstrom')  # coordinates come back in Bohr
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ReferenceInputError(f'cannot read the geometry {atom!r}: {exc}') from exc
    return structure_from_atoms([(symbol, [c * BOHR for c in coords]) for symbol, coords in atoms])


def _frame_molecule(atom: str, basis: str):
    """:func:`aiida_dm21.reference.integer.frame_molecule` (PySCF: imported only when a species is checked)."""
    from aiida_dm21.reference.integer import frame_molecule

    return frame_molecule(atom, basis)


def validate_density_method(value: orm.Str, _: t.Any = None) -> str | None:
    """Port validator of ``density_method``: ``hf`` or a functional of :data:`DENSITY_METHODS`."""
    return density_method_problem(value.value)


def validate_species(value: orm.List, _: t.Any = None) -> str | None:
    labels = set()
    if not value.get_list():
        return 'the species list is empty'
    for item in value.get_list():
        if not isinstance(item, dict) or not {'label', 'atom'} <= set(item):
            return f'each species needs at least a label and an atom string, got {item!r}'
        if not isinstance(item['label'], str) or not item['label'].strip() or not isinstance(item['atom'], str):
            return f'a species label and atom must be non-empty strings, got {item!r}'
        extra = set(item) - {'label', 'atom', 'charge', 'multiplicity'}
        if extra:
            return f'unknown keys in species {item["label"]!r}: {sorted(extra)}'
        if item['label'] in labels:
            return f'duplicate species label {item["label"]!r}'
        labels.add(item['label'])
        try:
            _frame_molecule(item['atom'], 'sto-3g')
        except ReferenceInputError as exc:
            return f'species {item["label"]!r}: {exc}'
    return None


def validate_iterations(value: orm.Dict, _: t.Any = None) -> str | None:
    data = value.get_dict()
    unknown = sorted(set(data) - {'max_cycle', 'cc_max_cycle'})
    if unknown:
        return f'unknown iteration limits {unknown}; accepted: max_cycle, cc_max_cycle'
    for key, number in data.items():
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            return f'`{key}` must be a positive integer, got {number!r}'
    return None


def _positive(name: str, minimum: int) -> t.Callable[[orm.Int, t.Any], str | None]:
    def validator(value: orm.Int, _: t.Any = None) -> str | None:
        number = value.value
        if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
            return f'`{name}` must be an integer >= {minimum}, got {number!r}'
        return None

    return validator


def atoms_of(atom: str) -> tuple[list[str], list[list[float]]]:
    """Symbols and positions (Angstrom) of a PySCF atom string in Angstrom."""
    structure = structure_from_atom(atom)
    kinds = {kind.name: kind.symbols[0] for kind in structure.kinds}
    return [kinds[site.kind_name] for site in structure.sites], [
        [float(x) for x in s.position] for s in structure.sites
    ]


#: The keys of the ``fractional`` input (``deltas`` and ``spin_fractions`` are inputs of their own).
FRACTIONAL_KEYS = ('fractional_charge', 'fractional_spin', 'integer', 'reference_method')


def _species_problem(
    item: dict, basis: str, method: str, density_method: str, reference_basis: str | None = None
) -> str | None:
    """Why the ``dm21.reference`` calculation of one species would be refused, or ``None``."""
    from aiida_dm21.calculations.reference import validate_inputs as validate_reference_inputs
    from aiida_dm21.calculations.reference import validate_parameters as validate_reference_parameters

    try:
        structure = structure_from_atom(item['atom'])
    except ReferenceInputError as exc:
        return str(exc)
    charge, multiplicity = item.get('charge', 0), item.get('multiplicity', 1)
    for key, value in (('charge', charge), ('multiplicity', multiplicity)):
        if isinstance(value, bool) or not isinstance(value, int):
            return f'`{key}` must be an integer, got {value!r}'
    parameters = orm.Dict(
        {
            'basis': basis,
            'charge': charge,
            'multiplicity': multiplicity,
            'density_method': density_method,
            'reference_method': method,
            'label': item['label'],
            **({} if reference_basis is None else {'reference_basis': reference_basis}),
        }
    )
    problem = validate_reference_parameters(parameters)
    if problem is None:
        problem = validate_structure(structure) or validate_reference_inputs(
            {'structure': structure, 'parameters': parameters}
        )
    if problem is None:
        try:
            _frame_molecule(item['atom'], basis)
            if reference_basis is not None:
                _frame_molecule(item['atom'], reference_basis)
        except ReferenceInputError as exc:
            problem = str(exc)
    return problem


def validate_inputs(inputs: dict, _: t.Any = None) -> str | None:
    """Everything the reference calculations and the dataset would refuse, before any calculation runs.

    The species (geometry, charge and multiplicity, basis, method), the labels the fractional systems name (every
    one a species; a charge pair: N and N+1 electrons of the same nuclei; a spin system: spin-polarised) and the
    ``deltas`` and ``spin_fractions``.
    """
    if ('set_name' in inputs) == ('species' in inputs):
        return 'give either `set_name` (a built-in set) or `species` (your own list), not both or neither'
    if 'set_name' in inputs:
        if inputs['set_name'].value not in SPECIES_SETS:
            return f'unknown set {inputs["set_name"].value!r}; built-in sets: {", ".join(SPECIES_SETS)}'
        if 'fractional' in inputs:
            return '`fractional` goes with your own `species`; a built-in set defines its own fractional systems'
        definition = SPECIES_SETS[inputs['set_name'].value]
    else:
        if validate_species(inputs['species']):
            return None  # reported by the port validator
        fractional = inputs['fractional'].get_dict() if 'fractional' in inputs else {}
        unknown = sorted(set(fractional) - set(FRACTIONAL_KEYS))
        if unknown:
            return (
                f'unknown keys {unknown} in `fractional`; accepted: {", ".join(FRACTIONAL_KEYS)} '
                '(`deltas` and `spin_fractions` are inputs of the workchain)'
            )
        definition = {'species': inputs['species'].get_list(), **fractional}
    for name in FRACTION_BOUNDS:
        if name in inputs:
            problem = fractions_problem(name, inputs[name].get_list())
            if problem:
                return problem
    basis = inputs['basis'].value if 'basis' in inputs else '6-31g'
    method = inputs['reference_method'].value if 'reference_method' in inputs else None
    method = method or definition.get('reference_method', 'ccsd(t)')
    density_method = inputs['density_method'].value if 'density_method' in inputs else 'hf'
    if density_method_problem(density_method):
        return None  # reported by the port validator
    reference_basis = inputs['reference_basis'].value if 'reference_basis' in inputs else None
    species = {item['label']: item for item in definition['species']}
    for label, item in species.items():
        problem = _species_problem(item, basis, method, density_method, reference_basis)
        if problem:
            return f'species {label!r}: {problem}'
    return _fractional_problem(definition, species)


def _electrons(item: dict) -> int:
    from pyscf import gto

    return sum(gto.charge(symbol) for symbol, _ in gto.format_atom(item['atom'], unit='Angstrom')) - int(
        item.get('charge', 0)
    )


def _fractional_problem(definition: dict, species: dict[str, dict]) -> str | None:
    """Why the fractional systems of ``definition`` cannot be built from ``species``, or ``None``."""
    from pyscf import gto

    known = ', '.join(map(repr, species))
    pairs = definition.get('fractional_charge', [])
    if not isinstance(pairs, list):
        return f'`fractional_charge` must be a list of [lower, upper] label pairs, got {pairs!r}'
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            return f'`fractional_charge`: {pair!r} is not a [lower, upper] pair of species labels'
        missing = [label for label in pair if label not in species]
        if missing:
            return f'`fractional_charge` pair {pair}: no species {", ".join(map(repr, missing))} (species: {known})'
        lower, upper = (species[label] for label in pair)
        n_lower, n_upper = _electrons(lower), _electrons(upper)
        if n_upper != n_lower + 1:
            return (
                f'`fractional_charge` pair {pair}: needs N and N+1 electrons, '
                f'{pair[0]!r} has {n_lower} and {pair[1]!r} {n_upper}'
            )
        frames = [gto.format_atom(item['atom'], unit='Angstrom') for item in (lower, upper)]
        same = len(frames[0]) == len(frames[1]) and all(
            a[0] == b[0] and all(abs(x - y) < 1e-8 for x, y in zip(a[1], b[1], strict=True))
            for a, b in zip(*frames, strict=True)
        )
        if not same:
            return f'`fractional_charge` pair {pair}: the two species are not the same nuclei at the same geometry'
    for key in ('fractional_spin', 'integer'):
        labels = definition.get(key, [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            return f'`{key}` must be a list of species labels, got {labels!r}'
        missing = [label for label in labels if label not in species]
        if missing:
            return f'`{key}`: no species {", ".join(map(repr, missing))} (species: {known})'
    for label in definition.get('fractional_spin', []):
        if int(species[label].get('multiplicity', 1)) == 1:
            return f'`fractional_spin`: species {label!r} has multiplicity 1, no spin polarisation to flip'
    return None


class ReferenceDataWorkChain(WorkChain):
    """Integer reference calculations -> fractional-charge/-spin dataset.

    The species run in ``dm21.reference`` CalcJobs of ``batch_size`` species (default 1), at most
    ``max_concurrent`` CalcJobs at a time (in waves; default all at once); a failed species is retried alone
    up to ``max_retries`` times (default 1).  Exit 401: species still failing after their retries (named,
    with the last error); 402: species that did not converge (never retried).  See the module docstring.
    """

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.input('code', valid_type=orm.AbstractCode, help='Python with aiida-dm21 on the target computer.')
        spec.input('set_name', valid_type=orm.Str, required=False, help=f'One of: {", ".join(SPECIES_SETS)}.')
        spec.input(
            'species',
            valid_type=orm.List,
            required=False,
            validator=validate_species,
            help='Own species: [{label, atom, charge, multiplicity}, ...].',
        )
        spec.input(
            'fractional',
            valid_type=orm.Dict,
            required=False,
            help='With `species`: {fractional_charge: [[lower, upper]...], fractional_spin: [...], '
            'integer: [...], reference_method}; every label must be a species.',
        )
        spec.input('basis', valid_type=orm.Str, default=lambda: orm.Str('6-31g'), help='PySCF basis for all species.')
        spec.input(
            'reference_method',
            valid_type=orm.Str,
            required=False,
            help="fci, ccsd(t), ccsd or hf (default: the set's own, else ccsd(t)).",
        )
        spec.input(
            'reference_basis',
            valid_type=orm.Str,
            required=False,
            help='The basis of the reference energies when not `basis` (e.g. cc-pvqz): each species gets its own UHF '
            'and reference method there, while its density and E_xc target terms stay in `basis`.  DM21 learned '
            "near-complete-basis energies; targets in a small basis teach the functional that basis's error.",
        )
        spec.input(
            'density_method',
            valid_type=orm.Str,
            default=lambda: orm.Str('hf'),
            validator=validate_density_method,
            help=f"Where every species' density comes from: {', '.join(DENSITY_METHODS)} (case-insensitive).",
        )
        spec.input(
            'with_sources',
            valid_type=orm.Bool,
            default=lambda: orm.Bool(False),
            help='Also put every species a fractional system is built from among the integer systems (the exact '
            "conditions of the training's `constraint_weight` need them; their absolute energies are fitted too).",
        )
        spec.input('deltas', valid_type=orm.List, default=lambda: orm.List([0.25, 0.5, 0.75]))
        spec.input('spin_fractions', valid_type=orm.List, default=lambda: orm.List([0.25, 0.5]))
        spec.input(
            'options',
            valid_type=orm.Dict,
            required=False,
            validator=options_validator(DM21ReferenceCalculation, 'options'),
            help='metadata.options for every dm21.reference CalcJob (resources, max_wallclock_seconds, queue_name, '
            'account, ...); an unknown key is refused when the workchain is launched.',
        )
        spec.input(
            'iterations',
            valid_type=orm.Dict,
            required=False,
            validator=validate_iterations,
            help='Iteration limits for every dm21.reference: max_cycle (SCF) and cc_max_cycle (CCSD), default 50.',
        )
        spec.input(
            'batch_size',
            valid_type=orm.Int,
            default=lambda: orm.Int(1),
            validator=_positive('batch_size', 1),
            help='Species per dm21.reference CalcJob (default 1: one job per species).',
        )
        spec.input(
            'max_concurrent',
            valid_type=orm.Int,
            required=False,
            validator=_positive('max_concurrent', 1),
            help='At most this many dm21.reference CalcJobs in flight at once (default: all).',
        )
        spec.input(
            'max_retries',
            valid_type=orm.Int,
            default=lambda: orm.Int(1),
            validator=_positive('max_retries', 0),
            help='How often a failed species is retried alone, in a CalcJob of its own (default 1; 0: never).',
        )
        spec.inputs.validator = validate_inputs
        spec.outline(
            cls.setup,
            while_(cls.should_submit_more)(cls.submit_jobs, cls.inspect_jobs),
            cls.inspect_references,
            cls.build_dataset,
        )
        spec.output('dataset', valid_type=DM21DatasetData)
        spec.exit_code(401, 'ERROR_REFERENCE_FAILED', message='Reference calculations failed: {labels}')
        spec.exit_code(
            402,
            'ERROR_REFERENCE_NOT_CONVERGED',
            message='Reference calculations did not converge, no dataset was built: {labels}',
        )

    def setup(self):
        if 'set_name' in self.inputs:
            definition = SPECIES_SETS[self.inputs.set_name.value]
        else:
            definition = {
                'species': self.inputs.species.get_list(),
                **self.inputs.get('fractional', orm.Dict()).get_dict(),
            }
        self.ctx.definition = definition
        method = self.inputs.reference_method.value if 'reference_method' in self.inputs else None
        self.ctx.method = method or definition.get('reference_method', 'ccsd(t)')
        labels = [item['label'] for item in definition['species']]
        size = self.inputs.batch_size.value
        self.ctx.labels = labels
        #: batches still to submit: (labels, attempt); attempt 0 is the first try, >= 1 a retry alone
        self.ctx.queue = [[labels[i : i + size], 0] for i in range(0, len(labels), size)]
        self.ctx.attempts = dict.fromkeys(labels, 0)
        self.ctx.outcome = {}  # label -> ['converged', pk] | ['not_converged', message] | ['failed', message]
        self.ctx.jobs = []
        self.ctx.arrays_pk = {}  # label -> pk of the converged species' output_arrays (read once, in inspect_jobs)
        self.ctx.wave = 0
        self.ctx.n_submitted = 0

    def should_submit_more(self) -> bool:
        return bool(self.ctx.queue)

    def _builder(self, labels: list[str], attempt: int):
        items = {item['label']: item for item in self.ctx.definition['species']}
        common = {
            'basis': self.inputs.basis.value,
            'density_method': self.inputs.density_method.value,
            'reference_method': self.ctx.method,
            **({'reference_basis': self.inputs.reference_basis.value} if 'reference_basis' in self.inputs else {}),
            **(self.inputs.iterations.get_dict() if 'iterations' in self.inputs else {}),
        }
        builder = DM21ReferenceCalculation.get_builder()
        builder.code = self.inputs.code
        if len(labels) == 1:  # one species: the single-species job (structure + parameters)
            item = items[labels[0]]
            builder.structure = structure_from_atom(item['atom'])
            builder.parameters = orm.Dict(
                {
                    **common,
                    'charge': int(item.get('charge', 0)),
                    'multiplicity': int(item.get('multiplicity', 1)),
                    'label': item['label'],
                }
            )
            name = link_label(labels[0])
        else:
            species = []
            for label in labels:
                symbols, positions = atoms_of(items[label]['atom'])
                species.append(
                    {
                        'label': label,
                        'symbols': symbols,
                        'positions': positions,
                        'charge': int(items[label].get('charge', 0)),
                        'multiplicity': int(items[label].get('multiplicity', 1)),
                    }
                )
            builder.species = orm.List(species)
            builder.parameters = orm.Dict(common)
            name = f'batch_{self.ctx.n_submitted}'
        set_options(builder.metadata.options, self.inputs.options.get_dict() if 'options' in self.inputs else {})
        builder.metadata.call_link_label = (f'retry{attempt}_' if attempt else 'reference_') + name
        self.ctx.n_submitted += 1
        return builder

    def submit_jobs(self):
        """Submit the next wave: at most ``max_concurrent`` jobs (the workchain waits for the whole wave)."""
        limit = self.inputs.max_concurrent.value if 'max_concurrent' in self.inputs else len(self.ctx.queue)
        wave, self.ctx.queue = self.ctx.queue[:limit], self.ctx.queue[limit:]
        self.ctx.wave += 1
        self.ctx.current = []
        self.ctx.wave_start = len(self.ctx.jobs)
        for labels, attempt in wave:
            node = self.submit(self._builder(labels, attempt))
            self.ctx.current.append(labels)
            what = 'retry of' if attempt else 'submitted'
            self.report(f'wave {self.ctx.wave}: {what} {", ".join(labels)}: dm21.reference<{node.pk}>')
            self.to_context(jobs=append_(node))

    def inspect_jobs(self):
        """Record every species of the finished wave; queue a failed species alone while it has retries left.

        Each job's output links are read once (one query), not per species: with hundreds of species in a batch,
        ``node.outputs.species[key]`` per species costs a link query each.
        """
        not_converged_status = DM21ReferenceCalculation.exit_codes.ERROR_REFERENCE_NOT_CONVERGED.status
        for labels, node in zip(self.ctx.current, self.ctx.jobs[self.ctx.wave_start :], strict=True):
            outputs = _outputs_of(node)
            statuses = outputs['species_status'].get_dict() if 'species_status' in outputs else None
            for label in labels:
                key = link_label(label)
                arrays = None
                if len(labels) == 1 and 'structure' in node.inputs:
                    if node.is_finished_ok:
                        arrays = outputs['output_arrays']
                        steps = unconverged_steps(arrays.base.attributes.get('scalars', {}))
                        outcome = ['not_converged', ', '.join(steps)] if steps else ['converged', node.pk]
                    elif node.exit_status == not_converged_status:
                        outcome = ['not_converged', node.exit_message]
                    else:
                        outcome = ['failed', f'exit {node.exit_status}: {node.exit_message}']
                elif statuses is not None and key in statuses:
                    status = statuses[key]
                    if status['status'] == 'converged':
                        arrays = outputs[f'species__{key}__output_arrays']
                        steps = unconverged_steps(arrays.base.attributes.get('scalars', {}))
                        outcome = ['not_converged', ', '.join(steps)] if steps else ['converged', node.pk]
                    elif status['status'] == 'not_converged':
                        outcome = ['not_converged', status['message']]
                    else:
                        outcome = ['failed', f'{status["category"]}: {status["message"]}']
                else:  # the whole job failed before this species had a status
                    outcome = ['failed', f'exit {node.exit_status}: {node.exit_message}']
                if outcome[0] == 'failed' and self.ctx.attempts[label] < self.inputs.max_retries.value:
                    self.ctx.attempts[label] += 1
                    self.ctx.queue.append([[label], self.ctx.attempts[label]])
                    self.report(f'{label} failed ({outcome[1]}): retry {self.ctx.attempts[label]} alone')
                self.ctx.outcome[label] = outcome
                if outcome[0] == 'converged' and arrays is not None:
                    self.ctx.arrays_pk[label] = arrays.pk

    def inspect_references(self):
        failed, not_converged = [], []
        for label in self.ctx.labels:
            kind, detail = self.ctx.outcome[label]
            if kind == 'failed':
                tries = self.ctx.attempts[label] + 1
                failed.append(f'{label} ({detail}; {tries} tr{"y" if tries == 1 else "ies"})')
            elif kind == 'not_converged':
                not_converged.append(f'{label} ({detail})')
        if failed:
            return self.exit_codes.ERROR_REFERENCE_FAILED.format(labels=', '.join(failed + not_converged))
        if not_converged:
            return self.exit_codes.ERROR_REFERENCE_NOT_CONVERGED.format(labels=', '.join(not_converged))
        return None

    def _arrays_of(self, labels: list[str]) -> dict[str, orm.ArrayData]:
        """The ``output_arrays`` node of every species, loaded in one query where their pks are known."""
        pks = self.ctx.get('arrays_pk', {})
        known = [pks[label] for label in labels if label in pks]
        loaded = {}
        if known:
            query = orm.QueryBuilder().append(orm.ArrayData, filters={'id': {'in': known}}, project='*')
            loaded = {node.pk: node for (node,) in query.iterall()}
        out = {}
        for label in labels:
            if pks.get(label) in loaded:
                out[label] = loaded[pks[label]]
                continue
            node = orm.load_node(self.ctx.outcome[label][1])  # a workchain checkpointed before arrays_pk existed
            outputs = _outputs_of(node)
            key = f'species__{link_label(label)}__output_arrays'
            out[label] = outputs[key] if 'species_status' in outputs else outputs['output_arrays']
        return out

    def build_dataset(self):
        definition = self.ctx.definition
        params = {
            'fractional_charge': definition.get('fractional_charge', []),
            'fractional_spin': definition.get('fractional_spin', []),
            'integer': _integer_species(definition, self.inputs.with_sources.value),
            'deltas': self.inputs.deltas.get_list(),
            'spin_fractions': self.inputs.spin_fractions.get_list(),
        }
        nodes = self._arrays_of(self.ctx.labels)
        arrays = {f'{link_label(lab)}_{i}': nodes[lab] for i, lab in enumerate(self.ctx.labels)}
        # link labels must be identifiers: map the species labels (H+, He...) onto the namespace keys
        label_of = {key: node.base.attributes.get('spec')['label'] for key, node in arrays.items()}
        params_keys = {
            'fractional_charge': [
                [label_key(label_of, a), label_key(label_of, b)] for a, b in params['fractional_charge']
            ],
            'fractional_spin': [label_key(label_of, a) for a in params['fractional_spin']],
            'integer': [label_key(label_of, a) for a in params['integer']],
            'deltas': params['deltas'],
            'spin_fractions': params['spin_fractions'],
        }
        dataset = build_fractional_dataset(orm.Dict(params_keys), **arrays)
        self.report(f'dataset<{dataset.pk}>: {dataset.n_systems} systems {dataset.kinds}')
        self.out('dataset', dataset)


def _integer_species(definition: dict, with_sources: bool) -> list[str]:
    """The integer systems of ``definition``; ``with_sources``: then every FC/FS source not among them, in order."""
    labels = list(definition.get('integer', []))
    if with_sources:
        for pair in definition.get('fractional_charge', []):
            labels += [label for label in pair if label not in labels]
        labels += [label for label in definition.get('fractional_spin', []) if label not in labels]
    return labels


def _outputs_of(node: orm.ProcessNode) -> dict[str, orm.Node]:
    """All outputs of ``node`` by their flat link label (``species__<key>__output_arrays``...), in one query."""
    return {entry.link_label: entry.node for entry in node.base.links.get_outgoing(link_type=LinkType.CREATE).all()}


def label_key(label_of: dict[str, str], label: str) -> str:
    for key, value in label_of.items():
        if value == label:
            return key
    raise ValueError(f'no reference calculation labelled {label!r}')
