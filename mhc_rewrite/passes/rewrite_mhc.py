"""Pass: rewrite every chain of residual sites into an n-stream mHC chain.

For a chain ``x1 = x0 + f1(x0); x2 = x1 + f2(x1); ... ; y = g(x_L)`` the graph becomes

    X = mhc.expand_streams(x0, n)                        # once, at the chain's head
    h_pre, h_post, h_res = mhc.coefficients(X, phi, alpha, bias, n, iters, mode)
    X = mhc.post_res_mix(X, f1(mhc.pre_mix(X, h_pre)), h_post, h_res)
    ...                                                   # one such block per site
    y = g(mhc.reduce_streams(X))                          # where the stream is read outside the chain

Channel-first streams (``[B, C, H, W]``) are moved to channel-last around the ops. Each site's parameters
live in ``gm.mhc[<module path>]`` (an ``MHCSiteParams``), so they are ordinary trainable parameters of
the returned module. New nodes carry ``meta["mhc"]`` (site, role) and, when the graph has fake values,
``meta["val"]``. Ends with ``graph.lint()`` and ``recompile()``.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx, nn
from torch._guards import detect_fake_mode
from torch.fx.passes.infra.pass_base import PassResult

from ..config import MHCConfig
from ..errors import MHCRewriteError
from ..site_params import MHCSiteParams
from .sites import ResidualSite

log = logging.getLogger(__name__)
mhc = torch.ops.mhc


class _NodeMaker:
    """Creates the nodes of one site, with provenance and (when possible) fake values."""

    def __init__(self, gm: fx.GraphModule, fake_mode, site: ResidualSite):
        self.gm, self.fake_mode, self.site = gm, fake_mode, site
        self.stack = site.output.meta.get("nn_module_stack")
        self.prefix = "mhc_" + (site.module_path.replace(".", "_") or "root")

    def __call__(self, role: str, target, *args) -> fx.Node:
        node = self.gm.graph.create_node("call_function", target, args, name=f"{self.prefix}_{role}")
        self._annotate(node, role)
        if self.fake_mode is not None:
            try:
                vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
                with self.fake_mode, torch.no_grad():  # a value with a grad_fn would break deepcopy
                    node.meta["val"] = target(*vals)
            except Exception as exc:  # a missing input value: leave this node without one
                log.debug("no fake value for %s: %s", node.name, exc)
        return node

    def get_attr(self, target: str) -> fx.Node:
        node = self.gm.graph.get_attr(target)
        self._annotate(node, "parameter")
        value = self.gm.get_parameter(target)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True)
        return node

    def _annotate(self, node: fx.Node, role: str) -> None:
        node.meta["mhc"] = {"site": self.site.index, "module_path": self.site.module_path, "role": role}
        if self.stack is not None:
            node.meta["nn_module_stack"] = dict(self.stack)

    def to_channel_last(self, node: fx.Node) -> fx.Node:
        cdim = self.site.channel_dim
        return node if cdim == -1 else self("to_channel_last", torch.movedim, node, cdim, -1)

    def from_channel_last(self, node: fx.Node) -> fx.Node:
        cdim = self.site.channel_dim
        return node if cdim == -1 else self("from_channel_last", torch.movedim, node, -1, cdim)


def _after(node: fx.Node) -> fx.Node:
    """The node to insert before so that new nodes follow ``node`` (and every placeholder)."""
    while node.next.op == "placeholder":
        node = node.next
    return node.next


def _unique_key(container: nn.ModuleDict, module_path: str) -> str:
    base = module_path.replace(".", "_") or "root"
    key, i = base, 1
    while key in container:
        key, i = f"{base}_{i}", i + 1
    return key


def _device(site: ResidualSite, gm: fx.GraphModule) -> torch.device:
    val = site.stream.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.device
    return next(gm.parameters(), torch.empty(0)).device


def rewrite_mhc(gm: fx.GraphModule, config: MHCConfig) -> PassResult:
    """Rewrite the sites of ``gm.meta["mhc_sites"]`` marked ``rewrite`` (after ``group_chains``).

    Args:
        gm: the traced graph module; modified in place.
        config: the conversion options.
    Returns:
        ``PassResult(gm, modified)``; modified is False when no site is rewritten.
    Raises:
        MHCRewriteError: a site's channel size is unknown (trace with ``example_inputs``).
    """
    sites = [site for site in gm.meta["mhc_sites"] if site.rewrite]
    if not sites:
        return PassResult(gm, False)
    graph = gm.graph
    fake_mode = detect_fake_mode([node.meta.get("val") for node in graph.nodes])
    if not hasattr(gm, "mhc"):
        gm.add_submodule("mhc", nn.ModuleDict())
    stream_out: dict[ResidualSite, fx.Node] = {}  # site -> its n-stream output
    expanded: dict[fx.Node, fx.Node] = {}  # chain-head stream -> its n-stream tensor
    reduced: dict[fx.Node, fx.Node] = {}  # erased site output -> the reduce that replaced it
    for site in sites:
        if site.channels is None:
            raise MHCRewriteError(
                f"cannot tell the width of the residual stream at {site.module_path or 'the model root'}: "
                "pass example_inputs to convert() so that shapes can be propagated"
            )
        make = _NodeMaker(gm, fake_mode, site)
        stream = reduced.get(site.stream, site.stream)
        if site.prev is not None:
            streams = stream_out[site.prev]
        elif stream in expanded:
            streams = expanded[stream]
        else:
            with graph.inserting_before(_after(stream)):
                streams = expanded[stream] = make("expand", mhc.expand_streams.default,
                                                  make.to_channel_last(stream), config.n)

        key = _unique_key(gm.mhc, site.module_path)
        gm.mhc[key] = MHCSiteParams(config, site.channels, site.index, site.module_path, _device(site, gm))
        site.param_name = f"mhc.{key}"
        with graph.inserting_before(_after(streams)):
            params = [make.get_attr(f"{site.param_name}.{name}") if getattr(gm.mhc[key], name) is not None else None
                      for name in ("phi", "alpha", "bias")]
            coeffs = make("coefficients", mhc.coefficients.default, streams if config.dynamic else None,
                          *params, config.n, config.sinkhorn_iters, config.mode)
            h_pre, h_post, h_res = (make(role, operator.getitem, coeffs, i)
                                    for i, role in enumerate(("h_pre", "h_post", "h_res")))
            branch_input = make.from_channel_last(make("pre_mix", mhc.pre_mix.default, streams, h_pre))
        for node in site.body:
            node.replace_input_with(stream, branch_input)

        with graph.inserting_before(site.output):
            branch = site.branch_outputs[0]
            for other in site.branch_outputs[1:]:
                branch = make("branch_sum", torch.add, branch, other)
            streams = make("post_res_mix", mhc.post_res_mix.default, streams, make.to_channel_last(branch),
                           h_post, h_res)
            out = make.from_channel_last(make("reduce", mhc.reduce_streams.default, streams))
        site.output.replace_all_uses_with(out)
        for user in list(out.users):  # torch.export's dtype checks would keep an otherwise unused reduce alive
            if user.target is torch.ops.aten._assert_tensor_metadata.default:
                graph.erase_node(user)
        reduced[site.output] = out
        for add in reversed(site.add_nodes):
            graph.erase_node(add)
        stream_out[site] = streams
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return PassResult(gm, True)
