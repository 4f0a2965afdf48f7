"""Questions about one graph node that the passes, the backend and the inspect views all ask."""

from __future__ import annotations

import torch
from torch import fx


def module_paths(node: fx.Node, called: bool = True) -> list[str]:
    """The module paths ``node`` runs inside, outermost first (from ``nn_module_stack``), and for a
    ``call_module`` node the called module itself (unless ``called=False``), e.g.
    ``["model.layers.3", "model.layers.3.mlp"]``."""
    paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    if called and node.op == "call_module":
        paths.append(node.target)
    return paths


def is_mhc_op(node: fx.Node) -> bool:
    """True when ``node`` calls a ``torch.ops.mhc`` op (an overload or its packet)."""
    return node.op == "call_function" and str(node.target).startswith("mhc.")


def is_mhc_node(node: fx.Node) -> bool:
    """True when ``node`` belongs to the mHC rewrite: made by it (``meta["mhc"]``), an mHC op, or a read of a
    site's parameters (``mhc.<site>.<name>``)."""
    return ("mhc" in node.meta or is_mhc_op(node)
            or (node.op == "get_attr" and str(node.target).startswith("mhc.")))


def has_effects(node: fx.Node) -> bool:
    """True when removing ``node`` changes what the graph does although nobody reads its result: torch.fx's impure
    nodes, and in-place calls (``buf.add_(1)``, ``out.index_add_(...)`` in a symbolic trace; an aten op with a
    mutable schema). The ``is_impure_node`` of every dead-code elimination the passes run."""
    if node.is_impure():
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target._schema.is_mutable)
