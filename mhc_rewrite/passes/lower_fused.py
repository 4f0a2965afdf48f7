"""Pass: lower the reference mHC ops of a rewritten graph to the fused ``triton_op``s, by pattern.

    coefficients(X, phi, alpha, bias, ...) + pre_mix(X, h_pre)   ->  fused_pre_mix(X, phi, alpha, bias, ...)
    post_res_mix(X, f, h_post, h_res)                            ->  fused_post_res_mix(X, f, h_post, h_res, link)

``link`` is the ``fused_pre_mix`` output of the pre-mix that reads the same ``X`` (the site's own): through it the
streams' gradient is written once per site instead of summed by autograd (``ops/fused.py``). A post-mix whose
streams no fused pre-mix reads before it (a static site) gets no link.

The patterns are replaced with ``torch.fx.subgraph_rewriter.replace_pattern_with_filters``. Only dynamic sites
fuse the coefficients (a static site's ``coefficients`` reads no streams: its first argument is None, and a filter
keeps such matches out, so it keeps the reference pre-mix); a ``h_pre`` read elsewhere as well is
left alone too (the matcher refuses a pattern whose inner values escape). The fused ops run Triton kernels on CUDA
and their PyTorch reference elsewhere, so a lowered graph runs anywhere; under Inductor on CUDA the kernels are
visible to the scheduler. Works on the graphs of a converted region (``mhc_rewrite.lower(model)`` applies it to all
of them) and on Dynamo graphs (op packets are first resolved to their overload). New nodes get ``meta["val"]``
when the graph has fake values, and the module stack and mHC role of the nodes they replace.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from .base import MHCPass
from .nodes import has_effects

log = logging.getLogger(__name__)
mhc = torch.ops.mhc
_PACKETS = (mhc.coefficients, mhc.pre_mix, mhc.post_res_mix)


def _pre_mix_pattern(x, phi, alpha, bias):
    coeffs = mhc.coefficients.default(x, phi, alpha, bias, 4, 20, "mhc")  # literals: matched by the callback
    return mhc.pre_mix.default(x, coeffs[0]), coeffs[1], coeffs[2]


def _fused_pre_mix_graph(match, original_graph: fx.Graph, pattern_graph: fx.Graph) -> fx.Graph:
    """The replacement of one match, with the matched call's literals (n, Sinkhorn rounds, mode)."""
    coeffs = _matched(match, mhc.coefficients.default)
    literals = coeffs.args[4:]
    graph = fx.Graph()
    x, phi, alpha, bias = (graph.placeholder(name) for name in ("x", "phi", "alpha", "bias"))
    fused = graph.call_function(mhc.fused_pre_mix.default, (x, phi, alpha, bias, *literals), dict(coeffs.kwargs))
    items = [graph.call_function(operator.getitem, (fused, i)) for i in (0, 2, 3)]  # block input, h_post, h_res
    graph.output(tuple(items))
    return graph


def _post_res_mix_pattern(x, f, h_post, h_res):
    return mhc.post_res_mix.default(x, f, h_post, h_res)


def _fused_post_res_mix(x, f, h_post, h_res):
    return mhc.fused_post_res_mix.default(x, f, h_post, h_res)


def _matched(match, target) -> fx.Node:
    return next(node for pattern_node, node in match.nodes_map.items() if pattern_node.target is target)


def _dynamic_site(match, original_graph, pattern_graph) -> bool:
    """The coefficients read the same streams as the pre-mix (a static site's read None, which the literal-blind
    matcher would otherwise let through)."""
    streams = _matched(match, mhc.coefficients.default).args[0]
    return isinstance(streams, fx.Node) and streams is _matched(match, mhc.pre_mix.default).args[0]


def _resolve_packets(graph: fx.Graph) -> None:
    """Dynamo may record ``torch.ops.mhc.pre_mix`` (the packet): use its one overload so the patterns match."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _PACKETS:
            node.target = node.target.default


_PROVENANCE = ("nn_module_stack", "mhc", "stack_trace")  # node meta a new node takes from the one it stands for


def _link_streams(graph: fx.Graph) -> int:
    """Hand each fused post-mix the ``link`` of the earlier fused pre-mix of the same streams; returns how many."""
    pre_of: dict[fx.Node, fx.Node] = {}
    linked = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is mhc.fused_pre_mix.default:
            pre_of.setdefault(node.args[0], node)
        elif node.target is mhc.fused_post_res_mix.default and len(node.args) == 4 and node.args[0] in pre_of:
            pre = pre_of[node.args[0]]
            with graph.inserting_after(pre):
                link = graph.call_function(operator.getitem, (pre, 4))
            link.meta.update({key: pre.meta[key] for key in _PROVENANCE if key in pre.meta})
            if isinstance(pre.meta.get("val"), (tuple, list)):
                link.meta["val"] = pre.meta["val"][4]
            node.args = (*node.args, link)
            linked += 1
    return linked


def _annotate(graph: fx.Graph, replaced: list, fake_mode) -> None:
    """Give the new nodes the provenance of the nodes they replace and, in graph order, fake values."""
    new: dict[fx.Node, fx.Node] = {}  # new node -> the original node its pattern's anchor matched
    for one in replaced:
        new.update(dict.fromkeys(one.replacements, one.nodes_map[one.anchor]))
    for node in graph.nodes:
        if node not in new:
            continue
        for key in _PROVENANCE:
            if key in new[node].meta:
                node.meta.setdefault(key, new[node].meta[key])
        if fake_mode is None:
            continue
        try:
            args = [a.meta["val"] if isinstance(a, fx.Node) else a for a in node.args]
            with fake_mode, torch.no_grad():
                node.meta["val"] = node.target(*args, **node.kwargs)
        except Exception as exc:  # an input without a value: leave this node without one
            log.debug("no fake value for %s: %s", node.name, exc)


def lower_fused(gm: fx.GraphModule) -> PassResult:
    """Replace the reference mHC ops of ``gm`` with the fused ones, in place.

    Args:
        gm: a graph module holding ``torch.ops.mhc`` reference ops (the Dynamo graph of a converted model, one
            graph of a converted region). A whole converted model is lowered by ``mhc_rewrite.lower(model)``.
    Returns:
        ``PassResult(gm, modified)``.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"lower_fused is a graph pass: it takes a GraphModule, got {type(gm).__name__} "
                        "(lower a converted model with mhc_rewrite.lower(model))")
    _resolve_packets(gm.graph)
    fake_mode = detect_fake_mode([node.meta.get("val") for node in gm.graph.nodes])
    replaced = replace_pattern_with_filters(gm, _pre_mix_pattern, match_filters=[_dynamic_site],
                                            ignore_literals=True, replacement_callback=_fused_pre_mix_graph)
    replaced += replace_pattern_with_filters(gm, _post_res_mix_pattern, _fused_post_res_mix)
    _annotate(gm.graph, replaced, fake_mode)
    modified = bool(replaced) | bool(_link_streams(gm.graph))  # a graph lowered without links gets them too
    if modified:
        gm.graph.eliminate_dead_code(is_impure_node=has_effects)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


class LowerFused(MHCPass):
    """The lower pass: reference mHC ops -> fused ``triton_op``s, in place (see the module docstring)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return lower_fused(graph_module)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        left = [node.name for node in graph_module.graph.nodes if node.target is mhc.post_res_mix.default]
        assert not left, f"post_res_mix left unfused: {left}"
