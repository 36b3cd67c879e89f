"""The built-in species sets: light_train / light_heldout share no element, and every label names a species."""

from __future__ import annotations

import re

import pytest

from aiida_dm21.reference.sets import SPECIES_SETS, get_set

pytestmark = pytest.mark.core


def _elements(definition: dict) -> set[str]:
    return {
        match.group(1)
        for item in definition['species']
        for match in re.finditer(r'(?:^|;)\s*([A-Z][a-z]?)\s', item['atom'] + ' ')
    }


def test_light_split_shares_no_element():
    train, heldout = get_set('light_train'), get_set('light_heldout')
    assert _elements(train) == {'H', 'He', 'Li', 'Be', 'B', 'C', 'N'}
    assert _elements(heldout) == {'O', 'F'}
    assert not _elements(train) & _elements(heldout)


def test_light_ne_train_adds_neon_and_still_shares_no_element_with_the_heldout_set():
    train, with_ne, heldout = get_set('light_train'), get_set('light_ne_train'), get_set('light_heldout')
    assert _elements(with_ne) == _elements(train) | {'Ne'}
    assert not _elements(with_ne) & _elements(heldout)
    assert with_ne['species'][: len(train['species'])] == train['species']
    assert [item['label'] for item in with_ne['species'][len(train['species']) :]] == ['Ne+', 'Ne']
    assert with_ne['fractional_charge'] == [*train['fractional_charge'], ['Ne+', 'Ne']]
    assert with_ne['fractional_spin'] == [*train['fractional_spin'], 'Ne+']
    assert with_ne['integer'] == [*train['integer'], 'Ne']
    assert with_ne['reference_method'] == 'ccsd(t)'
    assert len(train['species']) == 19  # light_train itself is unchanged


def test_light_split_is_a_subset_of_light():
    light = {item['label']: item for item in get_set('light')['species']}
    for name in ('light_train', 'light_heldout'):
        definition = get_set(name)
        assert definition['reference_method'] == 'ccsd(t)'
        for item in definition['species']:
            assert item == light[item['label']], (name, item['label'])
    heldout = get_set('light_heldout')
    assert [item['label'] for item in heldout['species']] == ['O+', 'O', 'F+', 'F']
    assert heldout['fractional_charge'] == [['O+', 'O'], ['F+', 'F']]
    assert heldout['fractional_spin'] == ['O', 'F']
    assert heldout['integer'] == ['O', 'F']
    train = get_set('light_train')
    assert len(train['fractional_charge']) == 10
    assert train['fractional_spin'] == ['H', 'Li', 'B', 'C', 'N', 'H2+']
    assert train['integer'] == ['H', 'He', 'Li', 'Be', 'B', 'C', 'N', 'H2', 'LiH']
    # `light` itself is unchanged: 23 species, 12 charge pairs
    assert len(light) == 23
    assert len(get_set('light')['fractional_charge']) == 12


@pytest.mark.parametrize('name', sorted(SPECIES_SETS))
def test_every_label_names_a_species_of_its_set(name):
    definition = SPECIES_SETS[name]
    labels = [item['label'] for item in definition['species']]
    assert len(labels) == len(set(labels)), 'duplicate species labels'
    for pair in definition['fractional_charge']:
        assert len(pair) == 2
        assert set(pair) <= set(labels), pair
    assert set(definition['fractional_spin']) <= set(labels)
    assert set(definition['integer']) <= set(labels)
    by_label = {item['label']: item for item in definition['species']}
    for label in definition['fractional_spin']:
        assert by_label[label]['multiplicity'] > 1, label


def test_unknown_set_lists_the_new_ones():
    with pytest.raises(ValueError, match='light_train, light_heldout'):
        get_set('no_such_set')
