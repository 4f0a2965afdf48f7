"""Pass: find the residual sites ``add(x, f(x))`` of a traced graph.

An add is a residual when one operand (the stream ``x``, seen through no-ops) is an ancestor of the other
(the branch output). ``x + f(x) + g(x)`` traced as ``add(add(x, f), g)`` is one site with two branches.
A branch is the set of nodes between the stream and the branch output; it is found by walking back from the
branch output over nodes that come after the stream in graph order, so the total work is the sum of the
branch sizes, linear in the graph for models made of blocks.

Result: ``FindResidualSites(filter_fn)`` fills a ``SiteAnalysis`` (``pass_.analysis``) with a list of
``ResidualSite`` in graph order (sites the filter skips are kept with ``rewrite=False`` and a ``skip_reason``).
The graph itself is not modified.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from .base import MHCPass, SiteAnalysis
from .channel_axis import locate_channel_axis
from .nodes import module_paths
from .noop import noop_sources, same_shape
from .sites import ResidualSite, ask_filter

aten = torch.ops.aten
_ADDS = {operator.add, torch.add, aten.add.Tensor}


def _is_add(node: fx.Node) -> bool:
    if (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add"):
        return (len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)
                and node.kwargs.get("alpha", 1) == 1 and "out" not in node.kwargs)
    return False


def _branch_body(stream: fx.Node, out: fx.Node, order: dict[fx.Node, int]) -> Optional[list[fx.Node]]:
    """Nodes on some path ``stream -> out`` (``out`` included, ``stream`` excluded), or None if there is none."""
    start = order[stream]
    seen, stack = {out}, [out]
    while stack:
        for src in stack.pop().all_input_nodes:
            if src not in seen and order[src] > start:
                seen.add(src)
                stack.append(src)
    body: set[fx.Node] = set()
    for node in sorted(seen, key=order.__getitem__):
        if any(src is stream or src in body for src in node.all_input_nodes):
            body.add(node)
    return sorted(body, key=order.__getitem__) if out in body else None


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _has_params(body: list[fx.Node], gm: fx.GraphModule) -> bool:
    for node in body:
        if node.op == "call_module" and any(True for _ in gm.get_submodule(node.target).parameters()):
            return True
        if any((src.op == "get_attr" and isinstance(_get_attr(gm, src.target), nn.Parameter))
               or src.meta.get("mhc_parameter") for src in node.all_input_nodes):  # Dynamo: parameters as inputs
            return True
    return False


def _child_of(stack: list[str], scope: list[str]) -> Optional[str]:
    inner = [path for path in stack if path not in scope]
    return inner[0] if inner else None


def _site_module_path(add: fx.Node, body: list[fx.Node], out: fx.Node, all_paths: set[str], gm) -> str:
    """The module that best names the branch, e.g. ``model.layers.3.self_attn``.

    Within the add's own module: the child module that produced the branch output when it is a composite
    module (attention, MLP); else the only child the branch touches; else the add's module itself. A trailing child
    without parameters or submodules (dropout, stochastic depth) is looked through to the child before it: such
    modules run ops in train mode and none in eval, and one site must have one name in every mode.
    """
    scope = module_paths(add)
    composite = _producer(scope, body, out, all_paths, gm)
    if composite is not None:
        return composite
    children = {c for c in (_child_of(module_paths(node), scope) for node in body) if c is not None}
    if len(children) == 1:
        return children.pop()
    return scope[-1] if scope else ""


def _producer(scope: list[str], body: list[fx.Node], out: fx.Node, all_paths: set[str], gm) -> Optional[str]:
    """The composite child module (one with submodules) that produced ``out``, looking through trailing children
    without parameters or submodules; None when the output does not come from a composite child."""
    child = _child_of(module_paths(out), scope)
    while child is not None and not any(path.startswith(child + ".") for path in all_paths):
        inside = [node for node in body if _child_of(module_paths(node), scope) == child]
        ancestors = _ancestors(out)
        before = [node for node in body if node not in inside and node in ancestors]
        if _has_params(inside, gm) or not before:
            return None
        body, out = [node for node in body if node not in inside], before[-1]
        child = _child_of(module_paths(out), scope)
    return child


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for src in stack.pop().all_input_nodes:
            if src not in seen:
                seen.add(src)
                stack.append(src)
    return seen


def _same_shapes(*nodes: fx.Node) -> bool:
    vals = [node.meta.get("val") for node in nodes]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return True  # no shape information: trust the structure
    return all(same_shape(v, vals[0]) for v in vals)


def _match_residual(add: fx.Node, gm, order) -> Optional[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """``(stream, branch_out, body)`` when ``add`` is ``stream + branch(stream)``."""
    for operand, other in (add.args, reversed(add.args)):
        for stream in noop_sources(operand, gm):
            body = _branch_body(stream, other, order)
            if body is not None:
                return stream, other, body
    return None


def find_residual_sites(gm: fx.GraphModule,
                        filter_fn: Optional[Callable[[ResidualSite], bool]] = None) -> list[ResidualSite]:
    """Find the residual sites of ``gm``.

    Args:
        gm: a traced graph (``symbolic_trace`` or the module of ``torch.export``).
        filter_fn: ``filter_fn(site) -> bool`` chooses the sites to rewrite; by default the sites whose
            branch holds a parameterised op.
    Returns:
        The sites, in graph order.
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    all_paths = {path for node in gm.graph.nodes for path in module_paths(node)}
    sites: list[ResidualSite] = []
    by_output: dict[fx.Node, ResidualSite] = {}
    for add in gm.graph.nodes:
        if not _is_add(add) or not _same_shapes(add, *add.args):
            continue
        match = _match_residual(add, gm, order)
        if match is not None:
            stream, out, body = match
            path = _site_module_path(add, body, out, all_paths, gm)
            site = ResidualSite(index=len(sites), module_path=path, stream=stream, add_nodes=[add],
                                branch_outputs=[out], body=body, has_params=_has_params(body, gm))
            sites.append(site)
            by_output[add] = site
            continue
        # x + f(x) + g(x): add(site_output, g(x)) with g reading the same stream
        for operand, other in (add.args, reversed(add.args)):
            site = by_output.get(operand)
            body = _branch_body(site.stream, other, order) if site and len(operand.users) == 1 else None
            if body is not None:
                site.add_nodes.append(add)
                site.branch_outputs.append(other)
                site.body = sorted(set(site.body) | set(body), key=order.__getitem__)
                site.has_params = site.has_params or _has_params(body, gm)
                del by_output[operand]
                by_output[add] = site
                break
    for site in sites:
        locate_channel_axis(site, gm)
        if filter_fn is not None and not ask_filter(filter_fn, site):
            site.rewrite, site.skip_reason = False, "excluded by filter_fn"
        elif filter_fn is None and not site.has_params:
            site.rewrite, site.skip_reason = False, "branch has no parameterised op"
        elif site.channel_dim is None:  # never guessed: see channel_axis.py
            site.rewrite, site.skip_reason = False, f"channel axis not decided: {site.channel_reason}"
    # A residual around a block that has residuals inside: the inner ones are rewritten, the outer one is not.
    inner_adds = {add: site for site in sites if site.rewrite for add in site.add_nodes}
    for site in sites:
        nested = sorted({inner_adds[node].index for node in site.body if node in inner_adds})
        if site.rewrite and nested:
            site.rewrite, site.skip_reason = False, f"contains rewritten residual site(s) {nested}"
    return sites


class FindResidualSites(MHCPass):
    """The find pass: fills ``self.analysis`` with the residual sites of the graph; the graph is not modified.

    Args:
        filter_fn: ``filter_fn(site) -> bool`` chooses the sites to rewrite (None: the sites whose branch holds a
            parameterised op).
        analysis: the ``SiteAnalysis`` to fill (a new one by default); later passes are given the same object.
    """

    def __init__(self, filter_fn: Optional[Callable[[ResidualSite], bool]] = None,
                 analysis: Optional[SiteAnalysis] = None):
        self.filter_fn = filter_fn
        self.analysis = analysis if analysis is not None else SiteAnalysis()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.analysis.sites = find_residual_sites(graph_module, self.filter_fn)
        self.analysis.graph, self.analysis.grouped, self.analysis.rewritten = graph_module.graph, False, False
        return PassResult(graph_module, False)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        for site in self.analysis.sites:
            assert all(node.graph is graph_module.graph for node in [site.stream, *site.add_nodes, *site.body])
