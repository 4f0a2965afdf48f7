"""Activation checkpointing survives conversion.

Tracing runs ``torch.utils.checkpoint`` like any Python and keeps only the tensor operations, so the traced
graph of a checkpointed model would store every activation again. While a region is traced,
:func:`record_checkpoints` watches every module call: a call made inside a checkpoint sees checkpoint's
saved-tensor hook on top of the hook stack, and all calls inside one checkpoint share that hook object. The
checkpointed *unit* of one checkpoint call is the deepest module path holding every module called inside it
(``layers.3`` for a Hugging Face layer with ``gradient_checkpointing``, ``blocks.1`` for
``checkpoint(self.blocks[1], x)``). :func:`checkpoint_units` then moves the nodes of each unit (mHC ops
included: they carry the module path of their site) into a submodule that runs under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

A checkpointed function that calls no module, or whose modules have no common parent inside the region, is
not recognised; such a trace is logged.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import fx, nn
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


@contextmanager
def record_checkpoints(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, record the module path of every unit of ``model`` run inside a checkpoint.

    Yields a list that is filled when the block exits.
    """
    names = {id(m): name for name, m in model.named_modules()}
    groups: dict[object, list[str]] = {}  # checkpoint's pack hook (one per checkpoint call) -> module paths

    def watch(module, args):
        top = torch._C._autograd._top_saved_tensors_default_hooks(True)
        if top is not None and "_checkpoint_hook" in getattr(top[0], "__qualname__", ""):
            groups.setdefault(top[0], []).append(names.get(id(module), ""))

    handles = [m.register_forward_pre_hook(watch) for m in model.modules()]
    units: list[str] = []
    try:
        yield units
    finally:
        for handle in handles:
            handle.remove()
        for paths in groups.values():
            unit = _common_path(paths)
            if unit:
                units.append(unit)
            else:
                log.warning("a checkpointed call of %s has no common module: it is not kept checkpointed",
                            type(model).__name__)


class Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing (recomputed in backward)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)


def _in_unit(node: fx.Node, unit: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == unit or path.startswith(unit + ".") for path, _ in stack.values())


def checkpoint_units(gm: fx.GraphModule, units: list[str]) -> fx.GraphModule:
    """Move the nodes of each unit into a submodule run under activation checkpointing.

    Args:
        gm: a traced (and rewritten) graph whose nodes carry ``nn_module_stack``.
        units: module paths, as :func:`record_checkpoints` gives them.
    Returns:
        ``gm``, with ``checkpointed_<i>`` submodules.
    """
    partitions = []
    for unit in dict.fromkeys(units):
        nodes = {n: None for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
                 and _in_unit(n, unit)}
        # weights read only inside the unit stay inside (not checkpoint inputs, which it would save)
        weights = {n: None for n in gm.graph.nodes
                   if n.op == "get_attr" and n.users and all(u in nodes for u in n.users)}
        if nodes:
            partitions.append({**weights, **nodes})
    if not partitions:
        return gm
    first = len([n for n in gm._modules if n.startswith("checkpointed_")])
    gm = fuse_by_partitions(gm, partitions, prefix="checkpointed_")
    for i in range(first, first + len(partitions)):
        name = f"checkpointed_{i}"
        gm._modules[name] = Checkpointed(gm._modules[name])
    gm.graph.lint()
    gm.recompile()
    return gm
