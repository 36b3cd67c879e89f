"""Protocols of the ``dm21.scf`` workchain: the inputs each one gives (stored expectations), overrides, errors."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

pytest.importorskip('aiida.engine')

from aiida import orm

from aiida_dm21.workflows.protocols import ProtocolError, recursive_merge
from aiida_dm21.workflows.scf import DM21ScfWorkChain

pytestmark = pytest.mark.aiida

H2O = [('O', (0.0, 0.0, 0.1178)), ('H', (0.0, 0.7555, -0.4712)), ('H', (0.0, -0.7555, -0.4712))]


@pytest.fixture
def build(python_code, checkpoint_node, make_structure):
    """``build(protocol=None, overrides=None, atoms=H2O, **kwargs)``: a builder from a protocol."""

    def factory(protocol=None, overrides=None, atoms=H2O, **kwargs):
        return DM21ScfWorkChain.get_builder_from_protocol(
            python_code, make_structure(atoms), checkpoint_node, protocol=protocol, overrides=overrides, **kwargs
        )

    return factory


def plain(value):
    """Nested mappings (builder namespaces, AttributeDicts) as plain dicts, without the empty ones."""
    if not isinstance(value, Mapping):
        return value
    return {key: plain(item) for key, item in value.items() if not (isinstance(item, Mapping) and not item)}


def summary(builder) -> dict:
    """The protocol-dependent inputs of a builder as plain data."""
    return {
        'parameters': builder.scf.parameters.get_dict(),
        'options': plain(builder.scf.metadata.options),
        'max_iterations': builder.max_iterations.value,
        'clean_workdir': builder.clean_workdir.value,
        'walltime_factor': builder.walltime_factor.value,
    }


def test_available_protocols():
    protocols = DM21ScfWorkChain.get_available_protocols()
    assert list(protocols) == ['fast', 'balanced', 'stringent']
    assert all(spec['description'] for spec in protocols.values())
    assert DM21ScfWorkChain.get_default_protocol() == 'balanced'


@pytest.mark.parametrize('protocol', ['fast', 'balanced', 'stringent'])
def test_protocol_inputs(build, data_regression, protocol):
    builder = build(protocol)
    data_regression.check(summary(builder))
    assert builder.scf.code.pk and builder.scf.checkpoint.pk and len(builder.scf.structure.sites) == 3


def test_default_protocol_is_balanced(build):
    assert summary(build()) == summary(build('balanced'))


def test_protocols_get_stricter(build):
    fast, balanced, stringent = (summary(build(name))['parameters'] for name in ('fast', 'balanced', 'stringent'))
    assert fast['grid_level'] < balanced['grid_level'] < stringent['grid_level']
    assert fast['conv_tol_grad'] > balanced['conv_tol_grad'] > stringent['conv_tol_grad']
    assert fast['conv_tol'] >= balanced['conv_tol'] >= stringent['conv_tol']
    for parameters in (fast, balanced, stringent):
        assert isinstance(parameters['conv_tol'], float)  # YAML's `1e-6` would be a string: the file uses 1.0e-6


def test_overrides_are_deep_merged(build):
    overrides = {
        'scf': {'parameters': {'basis': 'cc-pvdz'}, 'metadata': {'options': {'max_wallclock_seconds': 60}}},
        'max_iterations': 3,
    }
    builder = summary(build('fast', overrides))
    fast = summary(build('fast'))
    assert builder['parameters'] == {**fast['parameters'], 'basis': 'cc-pvdz'}
    assert builder['options'] == {**fast['options'], 'max_wallclock_seconds': 60}
    assert builder['max_iterations'] == 3


def test_charge_multiplicity_and_options(build):
    parameters = summary(build(charge=1))['parameters']
    assert (parameters['charge'], parameters['multiplicity']) == (1, 2)  # H2O+: odd electron count -> doublet
    assert summary(build(multiplicity=3))['parameters']['multiplicity'] == 3
    assert summary(build(atoms=[('H', (0.0, 0.0, 0.0))]))['parameters']['multiplicity'] == 2
    assert summary(build(options={'max_wallclock_seconds': 5}))['options']['max_wallclock_seconds'] == 5


def test_unknown_protocol_is_refused(build):
    message = r"unknown protocol 'ultra'; available protocols: fast, balanced, stringent"
    with pytest.raises(ProtocolError, match=message):
        build('ultra')


@pytest.mark.parametrize(
    ('overrides', 'match'),
    [
        ({'bogus': 1}, r"unknown input 'bogus' in the protocol or overrides; accepted here: .*max_iterations"),
        ({'scf': {'colour': 'blue'}}, r"unknown input 'scf.colour'.*accepted here: .*parameters"),
        ({'scf': {'parameters': {'colour': 'blue'}}}, r"unknown parameter\(s\) 'scf.parameters.colour'; accepted"),
        ({'scf': {'metadata': {'options': {'walltime': 5}}}}, r"unknown input 'scf.metadata.options.walltime'"),
    ],
)
def test_bad_override_key_is_refused(build, overrides, match):
    with pytest.raises(ProtocolError, match=match):
        build('fast', overrides)


def test_recursive_merge_does_not_touch_its_inputs():
    base = {'a': {'b': 1, 'c': [1]}, 'd': 2}
    merged = recursive_merge(base, {'a': {'b': 5}, 'e': 3})
    assert merged == {'a': {'b': 5, 'c': [1]}, 'd': 2, 'e': 3}
    merged['a']['c'].append(2)
    assert base == {'a': {'b': 1, 'c': [1]}, 'd': 2}


def test_builder_is_accepted_by_the_workchain(build):
    """The protocol's inputs pass the workchain's and the calculation's validation (nothing runs)."""
    builder = build('fast', {'scf': {'parameters': {'basis': 'sto-3g'}}})
    assert DM21ScfWorkChain.spec().inputs.validate(builder._inputs(prune=True)) is None
    assert isinstance(builder.scf.parameters, orm.Dict)
