"""Text views of a rewrite: the table of residual sites, and the generated code of one block."""

from __future__ import annotations

from typing import Iterable

from torch import fx

from ..passes.nodes import module_paths
from ..passes.sites import SiteInfo
from ..region import converted_graph


def _status(site: SiteInfo) -> str:
    if not site.rewritten:
        return f"skipped: {site.skip_reason}"
    return f"rewritten ({site.chain_break})" if site.chain_break else "rewritten"


def sites_table(sites: Iterable[SiteInfo]) -> str:
    """A fixed-width table of sites: index, module path, chain, branch ops, branches, width C and its axis, status.

    Example:
        >>> print(sites_table(mhc_rewrite.find_residuals(model)))
    """
    header = ("#", "module path", "chain", "ops", "branches", "C", "axis", "status")
    rows = [header] + [
        (str(s.index), s.module_path or "<root>", "-" if s.chain is None else str(s.chain), str(s.branch_size),
         str(s.num_branches), "?" if s.channels is None else str(s.channels),
         "?" if s.channel_dim is None else str(s.channel_dim),
         _status(s))
        for s in sites
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def in_module(node: fx.Node, module_path: str) -> bool:
    """True when ``node`` runs inside ``module_path`` (or belongs to an mHC site of it)."""
    paths = module_paths(node)
    if node.op == "get_attr":
        paths.append(node.target)
    paths.append(node.meta.get("mhc", {}).get("module_path", ""))
    return any(p == module_path or p.startswith(module_path + ".") for p in paths if p)


def is_noise(node: fx.Node) -> bool:
    """Reads of the model's own weights and torch.export's dtype asserts: they crowd out the structure."""
    if node.op == "get_attr":
        return "mhc" not in node.meta
    return node.op == "call_function" and "_assert_tensor_metadata" in str(node.target)


def block_code(gm: fx.GraphModule, module_path: str) -> str:
    """The lines of ``gm.code`` computed inside ``module_path`` (e.g. ``model.layers.0``), in order.

    Works before and after the rewrite: the mHC nodes carry the module path of the site they belong to.
    Reads of the model's own weights and torch.export's dtype asserts are left out.

    Example:
        >>> print(block_code(converted, "model.layers.0"))
    """
    if not isinstance(gm, fx.GraphModule):
        gm = converted_graph(gm)
    names = {node.name for node in gm.graph.nodes if in_module(node, module_path) and not is_noise(node)}
    lines = []
    for line in gm.code.splitlines():
        statement = line.strip().split(";  ")[0]
        if statement.split(" = ", 1)[0] in names:
            lines.append(statement)
    return "\n".join(lines)
