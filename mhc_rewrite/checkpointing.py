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
from typing import Iterator, Optional

import torch
from torch import fx, nn
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions
from torch.utils.checkpoint import checkpoint

from .paths import common_path

log = logging.getLogger(__name__)


class CheckpointRecorder:
    """Records, for each checkpoint call during a trace, the module paths called inside it.

    ``watch(module)`` is called at every module call: by forward pre-hooks (torch.export runs the modules), and
    by the symbolic tracer for the leaf modules it does not run. ``units`` lists the checkpointed units.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {id(m): name for name, m in model.named_modules()}
        self.groups: dict[object, list[str]] = {}  # checkpoint's pack hook (one per checkpoint call) -> paths

    def current(self) -> Optional[int]:
        """The number of the checkpoint call running now, or None outside any checkpoint."""
        top = torch._C._autograd._top_saved_tensors_default_hooks(True)
        if top is None or "_checkpoint_hook" not in getattr(top[0], "__qualname__", ""):
            return None
        self.groups.setdefault(top[0], [])
        return list(self.groups).index(top[0])

    def watch(self, module: nn.Module, *_) -> None:
        if self.current() is not None:
            self.groups[list(self.groups)[self.current()]].append(self.names.get(id(module), ""))

    def tag(self, node: fx.Node) -> None:
        """Mark a node created while tracing inside a checkpoint (the symbolic tracer calls this)."""
        call = self.current()
        if call is not None:
            node.meta["checkpoint_call"] = call

    @property
    def units(self) -> list[str]:
        units = []
        for paths in self.groups.values():
            if not paths:
                continue
            unit = common_path(paths)
            if unit:
                units.append(unit)
            else:
                log.warning("a checkpointed call of %s has no common module: it is not kept checkpointed",
                            type(self.model).__name__)
        return units


@contextmanager
def record_checkpoints(model: nn.Module) -> Iterator[CheckpointRecorder]:
    """Within the block, record every module call of ``model`` made inside a checkpoint."""
    recorder = CheckpointRecorder(model)
    handles = [m.register_forward_pre_hook(recorder.watch) for m in model.modules()]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


class Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing (recomputed in backward)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)


def _in_unit(node: fx.Node, unit) -> bool:
    if isinstance(unit, int):  # a checkpoint call the symbolic tracer tagged its nodes with
        return node.meta.get("checkpoint_call") == unit
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == unit or path.startswith(unit + ".") for path, _ in stack.values())


def checkpoint_units(gm: fx.GraphModule, units: list) -> fx.GraphModule:
    """Move the nodes of each unit into a submodule run under activation checkpointing.

    Args:
        gm: a traced (and rewritten) graph whose nodes carry ``nn_module_stack`` (or ``checkpoint_call`` tags).
        units: module paths, as :class:`CheckpointRecorder` gives them, or checkpoint-call numbers.
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
