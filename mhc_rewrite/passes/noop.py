"""Nodes that pass the residual stream through unchanged, so the passes can see through them.

A no-op returns its first input's value: a cast to the dtype it already has, a view/reshape to the shape it
already has, ``clone``/``contiguous``/``alias``, dropout with p=0 (or traced in eval mode by ``torch.export``,
which bakes the mode in), ``nn.Identity``.
Dtype and shape checks need ``node.meta["val"]``; without it those nodes are not treated as no-ops.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx, nn

aten = torch.ops.aten

_ALWAYS = {aten.clone.default, aten.alias.default, aten.contiguous.default, torch.clone}
_ALWAYS_METHODS = {"clone", "contiguous"}
_SAME_DTYPE = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
_SAME_DTYPE_METHODS = {"to", "type_as", "float", "half", "bfloat16", "double"}
_SAME_SHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_SAME_SHAPE_METHODS = {"view", "reshape", "view_as", "reshape_as", "expand_as"}
_DROPOUT = {aten.dropout.default, torch.nn.functional.dropout}


def _val(node) -> Optional[torch.Tensor]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same_as_input(node: fx.Node, check) -> bool:
    out, src = _val(node), _val(node.args[0]) if node.args else None
    return out is not None and src is not None and check(out, src)


def _same_dtype(out, src):
    return out.dtype == src.dtype and out.device == src.device and out.shape == src.shape


def _same_shape(out, src):
    return out.shape == src.shape and out.dtype == src.dtype


def _dropout_is_noop(node: fx.Node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", True))
    return p == 0 or train is False


def is_noop(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` returns the value of its first argument unchanged."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_function":
        if node.target in _ALWAYS:
            return True
        if node.target in _SAME_DTYPE:
            return _same_as_input(node, _same_dtype)
        if node.target in _SAME_SHAPE:
            return _same_as_input(node, _same_shape)
        if node.target in _DROPOUT:
            return _dropout_is_noop(node)
        if node.target is operator.getitem:
            return False
    if node.op == "call_method":
        if node.target in _ALWAYS_METHODS:
            return True
        if node.target in _SAME_DTYPE_METHODS:
            return _same_as_input(node, _same_dtype)
        if node.target in _SAME_SHAPE_METHODS:
            return _same_as_input(node, _same_shape)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Identity):
            return True
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return module.p == 0  # an eval-mode module still drops once the user calls .train()
    return False


def noop_sources(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """``node`` followed by the nodes it is a no-op of: ``[node, src, src_of_src, ...]``."""
    chain = [node]
    while is_noop(chain[-1], gm):
        chain.append(chain[-1].args[0])
    return chain
