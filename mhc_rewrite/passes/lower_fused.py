"""Pass: lower the reference mHC ops of a rewritten graph to the fused ``triton_op``s.

    coefficients(X, phi, alpha, bias, ...) + pre_mix(X, h_pre)   ->  fused_pre_mix(X, phi, alpha, bias, ...)
    post_res_mix(X, f, h_post, h_res)                            ->  fused_post_res_mix(X, f, h_post, h_res)

Only dynamic sites fuse the coefficients (static ones keep ``coefficients`` on ``[n]`` and the reference pre-mix).
The fused ops run Triton kernels on CUDA and their PyTorch reference elsewhere, so a lowered graph runs anywhere;
under Inductor on CUDA the kernels are visible to the scheduler. Works on ``convert()``'s output and on Dynamo
graphs (it matches op overloads and packets). Ends with ``graph.lint()`` and ``recompile()``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

mhc = torch.ops.mhc


def _is(node: fx.Node, packet) -> bool:
    target = node.target
    return node.op == "call_function" and (target is packet or getattr(target, "_overloadpacket", None) is packet)


def _outputs(node: fx.Node) -> dict[int, list[fx.Node]]:
    found: dict[int, list[fx.Node]] = {}
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            found.setdefault(user.args[1], []).append(user)
    return found


def lower_fused(gm: fx.GraphModule) -> PassResult:
    """Replace the reference mHC ops of ``gm`` with the fused ones, in place.

    Args:
        gm: a graph module holding ``torch.ops.mhc`` reference ops (from :func:`mhc_rewrite.convert`, or the
            Dynamo graph of a converted model).
    Returns:
        ``PassResult(gm, modified)``.
    """
    graph, modified = gm.graph, False
    for node in list(graph.nodes):
        if _is(node, mhc.coefficients) and node.args[0] is not None:
            streams = node.args[0]
            outs = _outputs(node)
            pre_mixes = [u for h in outs.get(0, []) for u in h.users
                         if _is(u, mhc.pre_mix) and u.args[0] is streams]
            with graph.inserting_before(node):
                fused = graph.call_function(mhc.fused_pre_mix.default, node.args, node.kwargs)
                fused.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                items = [graph.call_function(operator.getitem, (fused, i)) for i in range(4)]
            for pre in pre_mixes:
                pre.replace_all_uses_with(items[0])
                graph.erase_node(pre)
            for index, getters in outs.items():
                for getter in getters:
                    getter.replace_all_uses_with(items[index + 1])
                    graph.erase_node(getter)
            graph.erase_node(node)
            modified = True
        elif _is(node, mhc.post_res_mix):
            with graph.inserting_before(node):
                fused = graph.call_function(mhc.fused_post_res_mix.default, node.args, node.kwargs)
            fused.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            modified = True
    if modified:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
