"""Scheduler options of a CalcJob given to a workchain as an ``orm.Dict``, checked before anything runs.

A workchain that launches CalcJobs several levels down (``dm21.pipeline`` -> ``dm21.reference_data`` ->
``dm21.reference``) takes their ``metadata.options`` as a stored ``Dict`` input: it is then part of the
provenance of the workchain itself (``metadata`` of a workchain is not stored), and it can be validated when
the workchain is launched, with a message naming the input and the key, rather than when the CalcJob is
launched hours later.  :func:`options_validator` builds the port validator: every key must be a
``metadata.options`` port of the CalcJob class (``resources``, ``max_wallclock_seconds``, ``queue_name``,
``account``, ``qos``, ``max_memory_kb``, ``custom_scheduler_commands``, ``prepend_text``, ``withmpi`` ...), its
value must pass that port's own type check, and the file names and parser that the plugin owns are refused.
"""

from __future__ import annotations

import typing as t

from aiida import orm

__all__ = ('PLUGIN_OWNED_OPTIONS', 'options_problem', 'options_validator', 'set_options')

#: Options the plugin sets itself: the runner reads and writes these files, the parser is the plugin's.
PLUGIN_OWNED_OPTIONS = frozenset({'parser_name', 'input_filename', 'output_filename'})
#: Options that are a number of seconds or kilobytes: at least 1 when given.
POSITIVE_OPTIONS = ('max_wallclock_seconds', 'max_memory_kb')
#: ``resources`` entries that count machines, processes or cores: positive integers.
COUNTED_RESOURCES = (
    'num_machines',
    'num_mpiprocs_per_machine',
    'tot_num_mpiprocs',
    'num_cores_per_machine',
    'num_cores_per_mpiproc',
)


def options_problem(options: t.Mapping[str, t.Any], process_class: t.Any, name: str) -> str | None:
    """Why ``options`` cannot be the ``metadata.options`` of ``process_class``, or ``None``.

    :param options: the options, e.g. ``{'max_wallclock_seconds': 3600, 'queue_name': 'short'}``.
    :param process_class: the CalcJob class that will receive them.
    :param name: the input the options came from, for the message (e.g. ``train_options``).
    """
    namespace = process_class.spec().inputs['metadata']['options']
    accepted = sorted(set(namespace) - PLUGIN_OWNED_OPTIONS)
    for key, value in options.items():
        if key in PLUGIN_OWNED_OPTIONS:
            return f'`{name}`: option {key!r} is set by the {process_class.__name__} plugin and cannot be changed'
        if key not in namespace:
            return f'`{name}`: unknown option {key!r}; {process_class.__name__} accepts: {", ".join(accepted)}'
        problem = namespace[key].validate(value)
        if problem is not None:
            return f'`{name}`: option {key!r}: {problem.message}'
    for key in POSITIVE_OPTIONS:
        value = options.get(key)
        if value is not None and value < 1:
            return f'`{name}`: option {key!r} must be >= 1, got {value}'
    resources = options.get('resources') or {}
    for key in COUNTED_RESOURCES:
        value = resources.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f'`{name}`: resources[{key!r}] must be an integer >= 1, got {value!r}'
    return None


def options_validator(process_class: t.Any, name: str) -> t.Callable[[orm.Dict, t.Any], str | None]:
    """A port validator for an ``orm.Dict`` input ``name`` holding ``metadata.options`` of ``process_class``."""

    def validate(value: orm.Dict, _: t.Any = None) -> str | None:
        return options_problem(value.get_dict(), process_class, name)

    validate.__doc__ = f'``{name}`` holds valid ``metadata.options`` of {process_class.__name__}.'
    return validate


def set_options(namespace: t.Any, options: t.Mapping[str, t.Any]) -> None:
    """Set ``options`` on the ``metadata.options`` namespace of a process builder, one key at a time.

    Not ``builder.metadata.options = options``: a builder validates an assigned namespace as a whole, without the
    defaults of the ports that ``options`` leaves out, and so refuses options without ``resources``.
    """
    for key, value in options.items():
        namespace[key] = value
