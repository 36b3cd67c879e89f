"""Built-in species sets for reference data (geometries in Angstrom; multiplicity = 2S + 1).

Each set lists integer species and which fractional systems to build from them:
``fractional_charge`` pairs (N, N+1 electrons) and ``fractional_spin`` species.
"""

from __future__ import annotations

__all__ = ['SPECIES_SETS', 'get_set']

_H2 = 'H 0 0 0; H 0 0 0.7414'

SPECIES_SETS: dict[str, dict] = {
    # The README demo: hydrogen and helium to train on, lithium held out.
    'demo_train': {
        'species': [
            {'label': 'H+', 'atom': 'H 0 0 0', 'charge': 1, 'multiplicity': 1},
            {'label': 'H', 'atom': 'H 0 0 0', 'charge': 0, 'multiplicity': 2},
            {'label': 'H-', 'atom': 'H 0 0 0', 'charge': -1, 'multiplicity': 1},
            {'label': 'He+', 'atom': 'He 0 0 0', 'charge': 1, 'multiplicity': 2},
            {'label': 'He', 'atom': 'He 0 0 0', 'charge': 0, 'multiplicity': 1},
        ],
        'fractional_charge': [['H+', 'H'], ['H', 'H-'], ['He+', 'He']],
        'fractional_spin': ['H', 'He+'],
        'integer': ['H', 'H-', 'He+', 'He'],
        'reference_method': 'fci',
    },
    'demo_heldout': {
        'species': [
            {'label': 'Li+', 'atom': 'Li 0 0 0', 'charge': 1, 'multiplicity': 1},
            {'label': 'Li', 'atom': 'Li 0 0 0', 'charge': 0, 'multiplicity': 2},
        ],
        'fractional_charge': [['Li+', 'Li']],
        'fractional_spin': ['Li'],
        'integer': [],
        'reference_method': 'fci',
    },
    # Light atoms and their ions, small molecules (CCSD(T) for more than 4 electrons).
    'light': {
        'species': [
            *[
                {'label': lab, 'atom': f'{el} 0 0 0', 'charge': c, 'multiplicity': m}
                for el, lab, c, m in [
                    ('H', 'H+', 1, 1),
                    ('H', 'H', 0, 2),
                    ('H', 'H-', -1, 1),
                    ('He', 'He+', 1, 2),
                    ('He', 'He', 0, 1),
                    ('Li', 'Li+', 1, 1),
                    ('Li', 'Li', 0, 2),
                    ('Be', 'Be+', 1, 2),
                    ('Be', 'Be', 0, 1),
                    ('B', 'B+', 1, 1),
                    ('B', 'B', 0, 2),
                    ('C', 'C+', 1, 2),
                    ('C', 'C', 0, 3),
                    ('N', 'N+', 1, 3),
                    ('N', 'N', 0, 4),
                    ('O', 'O+', 1, 4),
                    ('O', 'O', 0, 3),
                    ('F', 'F+', 1, 3),
                    ('F', 'F', 0, 2),
                ]
            ],
            {'label': 'H2+', 'atom': _H2, 'charge': 1, 'multiplicity': 2},
            {'label': 'H2', 'atom': _H2, 'charge': 0, 'multiplicity': 1},
            {'label': 'LiH+', 'atom': 'Li 0 0 0; H 0 0 1.5949', 'charge': 1, 'multiplicity': 2},
            {'label': 'LiH', 'atom': 'Li 0 0 0; H 0 0 1.5949', 'charge': 0, 'multiplicity': 1},
        ],
        'fractional_charge': [
            ['H+', 'H'],
            ['H', 'H-'],
            ['He+', 'He'],
            ['Li+', 'Li'],
            ['Be+', 'Be'],
            ['B+', 'B'],
            ['C+', 'C'],
            ['N+', 'N'],
            ['O+', 'O'],
            ['F+', 'F'],
            ['H2+', 'H2'],
            ['LiH+', 'LiH'],
        ],
        'fractional_spin': ['H', 'Li', 'B', 'C', 'N', 'O', 'F', 'H2+'],
        'integer': ['H', 'He', 'Li', 'Be', 'B', 'C', 'N', 'O', 'F', 'H2', 'LiH'],
        'reference_method': 'ccsd(t)',
    },
    # The kinds of species DM21's fractional training used, with integer neighbours (heavier: HPC).
    'dm21_like': {
        'species': [
            {'label': 'H2+', 'atom': _H2, 'charge': 1, 'multiplicity': 2},
            {'label': 'H2', 'atom': _H2, 'charge': 0, 'multiplicity': 1},
            {
                'label': 'CH3+',
                'atom': 'C 0 0 0; H 1.079 0 0; H -0.5395 0.934441 0; H -0.5395 -0.934441 0',
                'charge': 1,
                'multiplicity': 1,
            },
            {
                'label': 'CH3',
                'atom': 'C 0 0 0; H 1.079 0 0; H -0.5395 0.934441 0; H -0.5395 -0.934441 0',
                'charge': 0,
                'multiplicity': 2,
            },
            {
                'label': 'C2H6+',
                'atom': 'C 0 0 0.7645; C 0 0 -0.7645; H 0 1.0190 1.1591; H 0.8825 -0.5095 1.1591; '
                'H -0.8825 -0.5095 1.1591; H 0 -1.0190 -1.1591; H 0.8825 0.5095 -1.1591; H -0.8825 0.5095 -1.1591',
                'charge': 1,
                'multiplicity': 2,
            },
            {
                'label': 'C2H6',
                'atom': 'C 0 0 0.7645; C 0 0 -0.7645; H 0 1.0190 1.1591; H 0.8825 -0.5095 1.1591; '
                'H -0.8825 -0.5095 1.1591; H 0 -1.0190 -1.1591; H 0.8825 0.5095 -1.1591; H -0.8825 0.5095 -1.1591',
                'charge': 0,
                'multiplicity': 1,
            },
            {'label': 'AlCl2+', 'atom': 'Al 0 0 0; Cl 0 1.8 1.3; Cl 0 -1.8 1.3', 'charge': 1, 'multiplicity': 1},
            {'label': 'AlCl2', 'atom': 'Al 0 0 0; Cl 0 1.8 1.3; Cl 0 -1.8 1.3', 'charge': 0, 'multiplicity': 2},
        ],
        'fractional_charge': [['H2+', 'H2'], ['CH3+', 'CH3'], ['C2H6+', 'C2H6'], ['AlCl2+', 'AlCl2']],
        'fractional_spin': ['H2+', 'CH3', 'AlCl2'],
        'integer': ['H2', 'CH3', 'C2H6', 'AlCl2'],
        'reference_method': 'ccsd(t)',
    },
}


def _subset(source: str, species: list[str]) -> dict:
    """The part of set ``source`` made of its species ``species``: their entries (the same geometries, charges,
    spins and reference method) and every fractional-charge pair, fractional-spin and integer species of
    ``source`` that uses only them."""
    base = SPECIES_SETS[source]
    by_label = {item['label']: item for item in base['species']}
    keep = set(species)
    return {
        'species': [dict(by_label[label]) for label in species],
        'fractional_charge': [list(pair) for pair in base['fractional_charge'] if set(pair) <= keep],
        'fractional_spin': [label for label in base['fractional_spin'] if label in keep],
        'integer': [label for label in base['integer'] if label in keep],
        'reference_method': base['reference_method'],
    }


# `light` split by element for a held-out test (benchmarks/end_to_end.py): train on H..N, H2 and LiH; hold out
# O and F (no element, hence no element/charge pair, in common with the training set).
_LIGHT_TRAIN_ATOMS = ['H+', 'H', 'H-', 'He+', 'He', 'Li+', 'Li', 'Be+', 'Be', 'B+', 'B', 'C+', 'C', 'N+', 'N']
SPECIES_SETS['light_train'] = _subset('light', [*_LIGHT_TRAIN_ATOMS, 'H2+', 'H2', 'LiH+', 'LiH'])
SPECIES_SETS['light_heldout'] = _subset('light', ['O+', 'O', 'F+', 'F'])
# light_train with neon on the far side of the held-out O and F (Ne+ -> Ne, Ne+'s fractional spin, the Ne atom), so
# that the absolute energies of the held-out atoms are bracketed by trained elements instead of extrapolated from N.
SPECIES_SETS['light_ne_train'] = {
    **SPECIES_SETS['light_train'],
    'species': [
        *SPECIES_SETS['light_train']['species'],
        {'label': 'Ne+', 'atom': 'Ne 0 0 0', 'charge': 1, 'multiplicity': 2},
        {'label': 'Ne', 'atom': 'Ne 0 0 0', 'charge': 0, 'multiplicity': 1},
    ],
    'fractional_charge': [*SPECIES_SETS['light_train']['fractional_charge'], ['Ne+', 'Ne']],
    'fractional_spin': [*SPECIES_SETS['light_train']['fractional_spin'], 'Ne+'],
    'integer': [*SPECIES_SETS['light_train']['integer'], 'Ne'],
}


def get_set(name: str) -> dict:
    try:
        return SPECIES_SETS[name]
    except KeyError:
        raise ValueError(f'unknown species set {name!r}: choose from {", ".join(SPECIES_SETS)}') from None
