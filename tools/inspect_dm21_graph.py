#!/usr/bin/env python
"""Print what DeepMind's DM21 TF-Hub modules contain, read without TensorFlow.

Usage::

    python tools/inspect_dm21_graph.py [MODULE_DIR ...] [--all-nodes]

``MODULE_DIR`` is a TF-Hub module folder (``saved_model.pb`` + ``variables/``); the default is the four
checkpoints under ``../shared/dm21/upstream`` relative to the repository root. For the first module it prints
the signature, the forward computation (the nodes the signature outputs depend on, with constants) and the
variable table (graph variables next to the checkpoint tensors); for the others, whether their graph and
variable names/shapes match the first one's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from aiida_dm21.functional.tf_checkpoint import read_tensor_bundle  # noqa: E402
from aiida_dm21.functional.tf_graph import GraphNode, ancestors, read_saved_model  # noqa: E402

DEFAULT_ROOT = REPO_ROOT.parent / 'shared' / 'dm21' / 'upstream'
DEFAULT_MODULES = ['DM21', 'DM21m', 'DM21mc', 'DM21mu']
SKIP_OPS = {'ReadVariableOp'}  # only forward a variable handle; shown through their consumers


def _short(name: str) -> str:
    for prefix in ('hub_wrapper/local_functional_v2/', 'module_fn___/default/'):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _format_value(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= 4:
            return f'{value.dtype}{list(value.shape)} {value.tolist()!r}'
        return f'{value.dtype}{list(value.shape)} (min {value.min():.6g}, max {value.max():.6g})'
    return repr(value)


def _node_line(node: GraphNode, by_name: dict[str, GraphNode]) -> str:
    inputs = []
    for ref in node.inputs:
        src = by_name.get(ref.split(':')[0].lstrip('^'))
        if src is not None and src.op == 'ReadVariableOp':  # show the variable itself
            ref = f'var:{_short(src.inputs[0])}'
        elif src is not None and src.op == 'Const':
            ref = f'{_short(ref)}={_format_value(src.attrs.get("value"))}'
        else:
            ref = _short(ref)
        inputs.append(ref)
    extra = {k: v for k, v in node.attrs.items() if k in ('keep_dims', 'N', 'shape', 'transpose_a', 'transpose_b')}
    out_shapes = node.attrs.get('_output_shapes')
    dtype = node.attrs.get('T', node.attrs.get('dtype', ''))
    text = f'{_short(node.name):70s} {node.op:18s} {dtype:9s} {out_shapes!s:14s} <- {", ".join(inputs)}'
    return text + (f'  {extra}' if extra else '')


def describe_module(module_dir: Path, all_nodes: bool) -> None:
    start = time.perf_counter()
    metas = read_saved_model(module_dir / 'saved_model.pb')
    graph_s = time.perf_counter() - start
    start = time.perf_counter()
    tensors = read_tensor_bundle(module_dir / 'variables' / 'variables')
    ckpt_s = time.perf_counter() - start
    print(f'# {module_dir}')
    print(
        f'read saved_model.pb in {graph_s * 1e3:.1f} ms, checkpoint ({len(tensors)} tensors) in {ckpt_s * 1e3:.1f} ms'
    )
    for i, meta in enumerate(metas):
        print(f'\n## meta graph {i}: tags={meta.tags} tensorflow={meta.tensorflow_version} nodes={len(meta.nodes)}')
        print('op counts:', dict(Counter(n.op for n in meta.nodes).most_common()))
        outputs = []
        for sig_name, (inputs, outs) in meta.signatures.items():
            print(f'\nsignature {sig_name!r}:')
            for key, info in sorted(inputs.items()):
                print(f'  in  {key:30s} {info.name:45s} {info.dtype} {info.shape}')
            for key, info in sorted(outs.items()):
                print(f'  out {key:30s} {info.name:45s} {info.dtype} {info.shape}')
                outputs.append(info.name)
        by_name = {n.name: n for n in meta.nodes}
        forward = ancestors(meta.nodes, outputs)
        forward_names = {n.name for n in forward}
        print(f'\nforward computation of the signature outputs ({len(forward)} nodes, ReadVariableOp folded in):')
        for node in forward:
            if node.op in SKIP_OPS or node.op == 'Const':
                continue
            print('  ' + _node_line(node, by_name))
        unused = [n.name for n in meta.nodes if n.op in ('Placeholder', 'Const') and n.name not in forward_names]
        unused_placeholders = [_short(n) for n in unused if by_name[n].op == 'Placeholder']
        print(f'\nplaceholders not used by the outputs: {unused_placeholders}')
        print(f'ops outside the forward computation: {sorted({n.op for n in meta.nodes} - {n.op for n in forward})}')
        if all_nodes:
            print('\nall nodes:')
            for node in meta.nodes:
                print('  ' + _node_line(node, by_name))
        print('\nvariables (graph VarHandleOp shape | checkpoint dtype shape, min, max):')
        for node in meta.nodes:
            if node.op != 'VarHandleOp':
                continue
            name = node.attrs.get('shared_name', node.name.encode()).decode()
            tensor = tensors.get(name)
            if tensor is None:
                print(f'  {name:80s} {node.attrs.get("shape")!s:12s} | MISSING FROM CHECKPOINT')
                continue
            mark = '' if tuple(tensor.shape) == node.attrs.get('shape') else '  SHAPE MISMATCH'
            print(
                f'  {name:80s} {node.attrs.get("shape")!s:12s} | {tensor.dtype} {tensor.shape!s:12s} '
                f'{tensor.min():+.4f} {tensor.max():+.4f}{mark}'
            )
        extra = sorted(set(tensors) - {n.attrs.get('shared_name', b'').decode() for n in meta.nodes})
        if extra:
            print(f'  checkpoint tensors without a graph variable: {extra}')


def _graph_key(module_dir: Path) -> list:
    nodes = read_saved_model(module_dir / 'saved_model.pb')[0].nodes
    key = []
    for n in nodes:
        attrs = sorted(
            (k, v.dtype.str + repr(v.shape) + v.tobytes().hex() if isinstance(v, np.ndarray) else repr(v))
            for k, v in n.attrs.items()
        )
        key.append((n.name, n.op, tuple(n.inputs), attrs))
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('modules', nargs='*', type=Path, help='TF-Hub module folders (default: the four DM21 ones)')
    parser.add_argument('--all-nodes', action='store_true', help='also list every node of the graph')
    args = parser.parse_args(argv)
    modules = args.modules or [DEFAULT_ROOT / name for name in DEFAULT_MODULES]
    describe_module(modules[0], args.all_nodes)
    if len(modules) > 1:
        print('\n## comparison with the first module')
        reference_graph = _graph_key(modules[0])
        reference_tensors = read_tensor_bundle(modules[0] / 'variables' / 'variables')
        for module in modules[1:]:
            tensors = read_tensor_bundle(module / 'variables' / 'variables')
            same_graph = _graph_key(module) == reference_graph
            same_shapes = {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in reference_tensors.items()}
            same_values = same_shapes and all(np.array_equal(tensors[k], reference_tensors[k]) for k in tensors)
            print(
                f'  {module.name}: graph nodes identical: {same_graph}; '
                f'variable names/shapes identical: {same_shapes}; weights identical: {same_values}'
            )
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
