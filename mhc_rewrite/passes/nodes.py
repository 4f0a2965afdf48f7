"""Questions about one graph node that the passes, the backend and the inspect views all ask."""

from __future__ import annotations

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
