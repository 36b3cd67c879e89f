"""Lineage queries: which calculations did a checkpoint learn from?

:func:`checkpoint_lineage` walks AiiDA's provenance graph from a ``dm21.checkpoint`` node back through
the ``dm21.train`` CalcJob that created it, its ``datasets`` (and ``heldout``) inputs, the calcfunction
that built each dataset and every ``dm21.reference`` CalcJob whose outputs went into it — and on
through the training's ``initial_checkpoint``, recursively.  A checkpoint imported from DeepMind has
no creator: its lineage is just its ``source``.
"""

from __future__ import annotations

import dataclasses

from aiida import orm
from aiida.common.links import LinkType

__all__ = ('CheckpointLineage', 'DatasetLineage', 'checkpoint_lineage', 'lineage_tree', 'reference_labels')


@dataclasses.dataclass
class DatasetLineage:
    dataset: orm.Data
    role: str  # 'train' or 'heldout'
    builder: orm.ProcessNode | None  # the calcfunction that made the dataset
    systems: list[str]  # labels of the fractional/integer systems in it
    references: list[orm.CalcJobNode]  # the integer reference calculations


@dataclasses.dataclass
class CheckpointLineage:
    checkpoint: orm.Data
    source: str
    training: orm.CalcJobNode | None
    datasets: list[DatasetLineage]
    initial: CheckpointLineage | None

    @property
    def reference_calculations(self) -> list[orm.CalcJobNode]:
        """Every integer reference CalcJob this checkpoint learned from (training sets only, incl. initial)."""
        found = {ref.pk: ref for d in self.datasets if d.role == 'train' for ref in d.references}
        if self.initial is not None:
            found.update({ref.pk: ref for ref in self.initial.reference_calculations})
        return [found[pk] for pk in sorted(found)]


def reference_labels(node: orm.CalcJobNode) -> list[str]:
    """The species labels of a ``dm21.reference`` CalcJob: one, or those of its batch (``species`` input)."""
    if 'species' in node.inputs:
        return [item['label'] for item in node.inputs.species.get_list()]
    if 'parameters' in node.inputs:
        return [str(node.inputs.parameters.get_dict().get('label', ''))]
    return []


def _incoming(node: orm.Node, link_type: LinkType) -> list[tuple[str, orm.Node]]:
    return [(t.link_label, t.node) for t in node.base.links.get_incoming(link_type=link_type).all()]


def _dataset_lineage(dataset: orm.Data, role: str) -> DatasetLineage:
    builder = dataset.creator
    references: dict[int, orm.CalcJobNode] = {}  # a batch job made several of the inputs: listed once
    if builder is not None:
        for _, node in _incoming(builder, LinkType.INPUT_CALC):
            creator = node.creator if isinstance(node, orm.ArrayData) else None
            if isinstance(creator, orm.CalcJobNode):
                references[creator.pk] = creator
    return DatasetLineage(
        dataset=dataset,
        role=role,
        builder=builder,
        systems=list(dataset.base.attributes.get('labels', [])),
        references=[references[pk] for pk in sorted(references)],
    )


def checkpoint_lineage(checkpoint: orm.Data | int | str, _seen: frozenset[int] = frozenset()) -> CheckpointLineage:
    """The lineage of a checkpoint node (or its pk/uuid).

    :raises aiida.common.exceptions.NotExistent: no node has this pk or uuid.
    :raises TypeError: the node is not a ``dm21.checkpoint``.
    :raises ValueError: the provenance graph has a cycle.
    """
    from aiida_dm21.data.checkpoint import DM21CheckpointData

    if not isinstance(checkpoint, orm.Node):
        checkpoint = orm.load_node(checkpoint)
    if not isinstance(checkpoint, DM21CheckpointData):
        raise TypeError(f'node {checkpoint.pk} is a {type(checkpoint).__name__}, not a dm21.checkpoint: no lineage')
    if checkpoint.pk in _seen:
        raise ValueError(f'cycle in the provenance graph at node {checkpoint.pk}')
    source = checkpoint.base.attributes.get('source', 'unknown')
    training = checkpoint.creator
    if not isinstance(training, orm.CalcJobNode):
        return CheckpointLineage(checkpoint, source, None, [], None)
    datasets, initial = [], None
    for label, node in _incoming(training, LinkType.INPUT_CALC):
        if label.startswith('datasets__'):
            datasets.append(_dataset_lineage(node, 'train'))
        elif label.startswith('heldout__'):
            datasets.append(_dataset_lineage(node, 'heldout'))
        elif label == 'initial_checkpoint':
            initial = checkpoint_lineage(node, _seen | {checkpoint.pk})
    return CheckpointLineage(checkpoint, source, training, datasets, initial)


def _describe(node: orm.Node) -> str:
    label = node.process_label if isinstance(node, orm.ProcessNode) else node.node_type.split('.')[-2]
    return f'{label}<{node.pk}>'


def lineage_tree(lineage: CheckpointLineage):
    """A :class:`rich.tree.Tree` of the lineage (what ``aiida-dm21 checkpoint lineage`` prints)."""
    from rich.tree import Tree

    ckpt = lineage.checkpoint
    name = ckpt.base.attributes.get('name', '?')
    sha = (ckpt.base.attributes.get('weights_sha256') or '')[:12]
    tree = Tree(f'[bold]checkpoint<{ckpt.pk}>[/bold] {name} source={lineage.source} sha256={sha}')
    if lineage.training is None:
        tree.add(
            'no training lineage in this database'
            + (' (imported from DeepMind)' if 'deepmind' in lineage.source else '')
        )
        return tree
    training = tree.add(f'created by {_describe(lineage.training)} (exit {lineage.training.exit_status})')
    for d in lineage.datasets:
        branch = training.add(
            f'{d.role} dataset<{d.dataset.pk}>: {d.dataset.base.attributes.get("n_systems")} systems '
            f'{d.dataset.base.attributes.get("kinds")}'
        )
        if d.builder is not None:
            branch.add(f'built by {_describe(d.builder)}')
        systems = branch.add(f'{len(d.systems)} systems')
        for label in d.systems:
            systems.add(label)
        refs = branch.add(f'{len(d.references)} integer reference calculations')
        for ref in d.references:
            params = ref.inputs.parameters.get_dict() if 'parameters' in ref.inputs else {}
            refs.add(
                f'{_describe(ref)} {", ".join(reference_labels(ref))} {params.get("reference_method", "")}/'
                f'{params.get("basis", "")} (exit {ref.exit_status})'
            )
    if lineage.initial is not None:
        sub = training.add('fine-tuned from:')
        sub.add(lineage_tree(lineage.initial))
    return tree
