"""Pass: find the residual sites ``add(x, f(x))`` of a traced graph.

An add is a residual when one operand (the stream ``x``, seen through no-ops) is an ancestor of the other
(the branch output). ``x + f(x) + g(x)`` traced as ``add(add(x, f), g)`` is one site with two branches.
A branch is the set of nodes between the stream and the branch output; it is found by walking back from the
branch output over nodes that come after the stream in graph order, so the total work is the sum of the
branch sizes, linear in the graph for models made of blocks.

Result: ``gm.meta["mhc_sites"]``, a list of ``ResidualSite`` in graph order (sites the config skips are
kept with ``rewrite=False`` and a ``skip_reason``). The graph itself is not modified.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from .noop import noop_sources
from .sites import ResidualSite

aten = torch.ops.aten
_ADDS = {operator.add, torch.add, aten.add.Tensor}
_CONVS = {aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          torch.conv1d, torch.conv2d, torch.conv3d,
          nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d}


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


def _module_stack(node: fx.Node) -> list[str]:
    stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module":
        stack.append(node.target)
    return stack


def _child_of(stack: list[str], scope: list[str]) -> Optional[str]:
    inner = [path for path in stack if path not in scope]
    return inner[0] if inner else None


def _site_module_path(add: fx.Node, body: list[fx.Node], out: fx.Node, all_paths: set[str]) -> str:
    """The module that best names the branch, e.g. ``model.layers.3.self_attn``.

    Within the add's own module: the child module that produced the branch output when it is a composite
    module (attention, MLP); else the only child the branch touches; else the add's module itself.
    """
    scope = _module_stack(add)
    child = _child_of(_module_stack(out), scope)
    if child is not None and any(path.startswith(child + ".") for path in all_paths):
        return child
    children = {c for c in (_child_of(_module_stack(node), scope) for node in body) if c is not None}
    if len(children) == 1:
        return children.pop()
    return scope[-1] if scope else ""


def _is_conv(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in _CONVS


def _width_from_modules(body: list[fx.Node], gm: fx.GraphModule) -> Optional[int]:
    """C from the last parameterised module of the branch, for graphs traced without example inputs."""
    for node in reversed(body):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        for attr in ("out_features", "out_channels", "num_features", "num_channels", "embedding_dim"):
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
        if isinstance(module, nn.LayerNorm | nn.RMSNorm) and module.normalized_shape:
            return module.normalized_shape[-1]
    return None


def _locate_channels(site: ResidualSite, gm: fx.GraphModule) -> None:
    conv = any(_is_conv(node, gm) for node in site.body)
    val = site.stream.meta.get("val")
    if isinstance(val, torch.Tensor):
        site.channel_dim = 1 if conv and val.dim() >= 3 else -1
        site.channels = int(val.shape[site.channel_dim])
    else:
        site.channel_dim = 1 if conv else -1
        site.channels = _width_from_modules(site.body, gm)


def _same_shapes(*nodes: fx.Node) -> bool:
    vals = [node.meta.get("val") for node in nodes]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return True  # no shape information: trust the structure
    return all(v.shape == vals[0].shape for v in vals)


def _match_residual(add: fx.Node, gm, order) -> Optional[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """``(stream, branch_out, body)`` when ``add`` is ``stream + branch(stream)``."""
    for operand, other in (add.args, reversed(add.args)):
        for stream in noop_sources(operand, gm):
            body = _branch_body(stream, other, order)
            if body is not None:
                return stream, other, body
    return None


def find_residual_sites(gm: fx.GraphModule, filter_fn: Optional[Callable[[ResidualSite], bool]] = None) -> PassResult:
    """Find the residual sites of ``gm`` and store them in ``gm.meta["mhc_sites"]``.

    Args:
        gm: a traced graph (``symbolic_trace`` or the module of ``torch.export``).
        filter_fn: ``filter_fn(site) -> bool`` chooses the sites to rewrite; by default the sites whose
            branch holds a parameterised op.
    Returns:
        ``PassResult(gm, modified=False)``.
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    all_paths = {path for node in gm.graph.nodes for path in _module_stack(node)}
    sites: list[ResidualSite] = []
    by_output: dict[fx.Node, ResidualSite] = {}
    for add in gm.graph.nodes:
        if not _is_add(add) or not _same_shapes(add, *add.args):
            continue
        match = _match_residual(add, gm, order)
        if match is not None:
            stream, out, body = match
            path = _site_module_path(add, body, out, all_paths)
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
        _locate_channels(site, gm)
        if filter_fn is not None and not filter_fn(site):
            site.rewrite, site.skip_reason = False, "excluded by filter_fn"
        elif filter_fn is None and not site.has_params:
            site.rewrite, site.skip_reason = False, "branch has no parameterised op"
    # A residual around a block that has residuals inside: the inner ones are rewritten, the outer one is not.
    inner_adds = {add: site for site in sites if site.rewrite for add in site.add_nodes}
    for site in sites:
        nested = sorted({inner_adds[node].index for node in site.body if node in inner_adds})
        if site.rewrite and nested:
            site.rewrite, site.skip_reason = False, f"contains rewritten residual site(s) {nested}"
    gm.meta["mhc_sites"] = sites
    return PassResult(gm, False)
