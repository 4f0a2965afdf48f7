"""Nodes that pass the residual stream through unchanged, so the passes can see through them.

A no-op returns its first input's value: a cast to the dtype it already has, a view/reshape to the shape it
already has, ``clone``/``contiguous``/``alias``, dropout with p=0 (or traced in eval mode by ``torch.export``,
which bakes the mode in), ``nn.Identity``.
Dtype and shape checks need ``node.meta["val"]``; without it those nodes are not treated as no-ops. Every no-op
is one entry of ``NOOPS``; shapes are equal only when they are for every value of their symbols.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten


def _val(node) -> Optional[torch.Tensor]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the shapes are equal for every value of their symbols (no guard is added on symbolic sizes)."""
    return len(a.shape) == len(b.shape) and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _always(node: fx.Node) -> bool:
    return True


def _same_dtype(node: fx.Node) -> bool:
    out, src = _val(node), _val(node.args[0])
    return (out is not None and src is not None and out.dtype == src.dtype and out.device == src.device
            and same_shape(out, src))


def _same_shape(node: fx.Node) -> bool:
    out, src = _val(node), _val(node.args[0])
    return out is not None and src is not None and same_shape(out, src) and out.dtype == src.dtype


def _dropout_is_noop(node: fx.Node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", True))
    return p == 0 or train is False


# The one registry: (node.op, node.target) -> when such a node returns its first input's value.
NOOPS = {
    **{("call_function", t): _always for t in (aten.clone.default, aten.alias.default, aten.contiguous.default,
                                               torch.clone)},
    **{("call_method", t): _always for t in ("clone", "contiguous")},
    **{("call_function", t): _same_dtype for t in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)},
    **{("call_method", t): _same_dtype for t in ("to", "type_as", "float", "half", "bfloat16", "double")},
    **{("call_function", t): _same_shape for t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                                                   torch.reshape)},
    **{("call_method", t): _same_shape for t in ("view", "reshape", "view_as", "reshape_as", "expand_as")},
    **{("call_function", t): _dropout_is_noop for t in (aten.dropout.default, torch.nn.functional.dropout)},
}


def _module_is_noop(module: nn.Module) -> bool:
    if isinstance(module, nn.Identity):
        return True
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p == 0  # an eval-mode module still drops once the user calls .train()
    return False


def is_noop(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` returns the value of its first argument unchanged."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return _module_is_noop(gm.get_submodule(node.target))
    try:
        check = NOOPS.get((node.op, node.target))
    except TypeError:  # an unhashable target
        return False
    return check is not None and check(node)


def noop_sources(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """``node`` followed by the nodes it is a no-op of: ``[node, src, src_of_src, ...]``."""
    chain = [node]
    while is_noop(chain[-1], gm):
        chain.append(chain[-1].args[0])
    return chain
