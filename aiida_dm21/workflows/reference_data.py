"""``dm21.reference_data``: integer reference calculations in parallel, then the fractional dataset.

Give a built-in set name (``set_name``, see :mod:`aiida_dm21.reference.sets`) or your own ``species``
(a list of ``{label, atom, charge, multiplicity}`` with geometries in Angstrom) plus which fractional
systems to build.  Every integer calculation is a ``dm21.reference`` CalcJob, all submitted at once;
identical ones are reused through AiiDA caching when caching is enabled for ``aiida.calculations:dm21.reference``.

A reference that did not converge (its CalcJob ends in 400, or an older finished node records a ``False``
convergence flag) never enters the dataset: the workchain stops with 402 naming the species.
"""

from __future__ import annotations

import typing as t

from aiida import orm
from aiida.engine import ToContext, WorkChain

from aiida_dm21.calculations.fractional import build_fractional_dataset
from aiida_dm21.calculations.reference import DM21ReferenceCalculation
from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.reference.integer import ReferenceInputError, frame_molecule
from aiida_dm21.reference.sets import SPECIES_SETS
from aiida_dm21.runner.reference import unconverged_steps

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


def link_label(label: str) -> str:
    """A valid AiiDA link label for a species label: 'H+' -> 'H_plus', 'C2H6-' -> 'C2H6_minus'."""
    text = label.replace('+', '_plus_').replace('-', '_minus_')
    text = ''.join(c if c.isalnum() else '_' for c in text)
    parts = [p for p in text.split('_') if p]
    out = '_'.join(parts) or 'species'
    return out if not out[0].isdigit() else f's_{out}'


def validate_species(value: orm.List, _: t.Any = None) -> str | None:
    labels = set()
    for item in value.get_list():
        if not isinstance(item, dict) or not {'label', 'atom'} <= set(item):
            return f'each species needs at least a label and an atom string, got {item!r}'
        extra = set(item) - {'label', 'atom', 'charge', 'multiplicity'}
        if extra:
            return f'unknown keys in species {item["label"]!r}: {sorted(extra)}'
        if item['label'] in labels:
            return f'duplicate species label {item["label"]!r}'
        labels.add(item['label'])
        try:
            frame_molecule(item['atom'], 'sto-3g')
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


def validate_inputs(inputs: dict, _: t.Any = None) -> str | None:
    if ('set_name' in inputs) == ('species' in inputs):
        return 'give either `set_name` (a built-in set) or `species` (your own list), not both or neither'
    if 'set_name' in inputs and inputs['set_name'].value not in SPECIES_SETS:
        return f'unknown set {inputs["set_name"].value!r}; built-in sets: {", ".join(SPECIES_SETS)}'
    return None


class ReferenceDataWorkChain(WorkChain):
    """Integer reference calculations (parallel) -> fractional-charge/-spin dataset."""

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
            'integer: [...], deltas, spin_fractions}.',
        )
        spec.input('basis', valid_type=orm.Str, default=lambda: orm.Str('6-31g'), help='PySCF basis for all species.')
        spec.input(
            'reference_method',
            valid_type=orm.Str,
            required=False,
            help="fci, ccsd(t), ccsd or hf (default: the set's own, else ccsd(t)).",
        )
        spec.input('density_method', valid_type=orm.Str, default=lambda: orm.Str('hf'))
        spec.input('deltas', valid_type=orm.List, default=lambda: orm.List([0.25, 0.5, 0.75]))
        spec.input('spin_fractions', valid_type=orm.List, default=lambda: orm.List([0.25, 0.5]))
        spec.input(
            'options',
            valid_type=orm.Dict,
            required=False,
            help='metadata.options for every dm21.reference CalcJob (resources, walltime...).',
        )
        spec.input(
            'iterations',
            valid_type=orm.Dict,
            required=False,
            validator=validate_iterations,
            help='Iteration limits for every dm21.reference: max_cycle (SCF) and cc_max_cycle (CCSD), default 50.',
        )
        spec.inputs.validator = validate_inputs
        spec.outline(cls.setup, cls.run_references, cls.inspect_references, cls.build_dataset)
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

    def run_references(self):
        options = self.inputs.options.get_dict() if 'options' in self.inputs else {}
        futures = {}
        for item in self.ctx.definition['species']:
            builder = DM21ReferenceCalculation.get_builder()
            builder.code = self.inputs.code
            builder.structure = structure_from_atom(item['atom'])
            builder.parameters = orm.Dict(
                {
                    'basis': self.inputs.basis.value,
                    'charge': int(item.get('charge', 0)),
                    'multiplicity': int(item.get('multiplicity', 1)),
                    'density_method': self.inputs.density_method.value,
                    'reference_method': self.ctx.method,
                    'label': item['label'],
                    **(self.inputs.iterations.get_dict() if 'iterations' in self.inputs else {}),
                }
            )
            builder.metadata.options = options
            builder.metadata.call_link_label = 'reference_' + link_label(item['label'])
            futures[item['label']] = self.submit(builder)
            self.report(f'submitted {item["label"]}: dm21.reference<{futures[item["label"]].pk}>')
        self.ctx.labels = list(futures)
        return ToContext(**{f'ref_{i}': node for i, node in enumerate(futures.values())})

    def inspect_references(self):
        failed, not_converged = [], []
        not_converged_status = DM21ReferenceCalculation.exit_codes.ERROR_REFERENCE_NOT_CONVERGED.status
        for i, label in enumerate(self.ctx.labels):
            node = self.ctx[f'ref_{i}']
            if node.is_finished_ok:
                # also a node finished (or cached) before convergence was checked must not enter a dataset
                steps = unconverged_steps(node.outputs.output_arrays.base.attributes.get('scalars', {}))
                if steps:
                    not_converged.append(f'{label} ({", ".join(steps)})')
            elif node.exit_status == not_converged_status:
                not_converged.append(f'{label} ({node.exit_message})')
            else:
                failed.append(f'{label} (exit {node.exit_status})')
        if failed:
            return self.exit_codes.ERROR_REFERENCE_FAILED.format(labels=', '.join(failed + not_converged))
        if not_converged:
            return self.exit_codes.ERROR_REFERENCE_NOT_CONVERGED.format(labels=', '.join(not_converged))
        return None

    def build_dataset(self):
        definition = self.ctx.definition
        params = {
            'fractional_charge': definition.get('fractional_charge', []),
            'fractional_spin': definition.get('fractional_spin', []),
            'integer': definition.get('integer', []),
            'deltas': self.inputs.deltas.get_list(),
            'spin_fractions': self.inputs.spin_fractions.get_list(),
        }
        arrays = {
            f'{link_label(lab)}_{i}': self.ctx[f'ref_{i}'].outputs.output_arrays
            for i, lab in enumerate(self.ctx.labels)
        }
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


def label_key(label_of: dict[str, str], label: str) -> str:
    for key, value in label_of.items():
        if value == label:
            return key
    raise ValueError(f'no reference calculation labelled {label!r}')
