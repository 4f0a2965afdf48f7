"""Pass: rewrite every chain of residual sites into an n-stream mHC chain.

For a chain ``x1 = x0 + f1(x0); x2 = x1 + f2(x1); ... ; y = g(x_L)`` the graph becomes

    X = mhc.expand_streams(x0, n)                        # once, at the chain's head
    h_pre, h_post, h_res = mhc.coefficients(X, phi, alpha, bias, n, iters, mode)
    X = mhc.post_res_mix(X, f1(mhc.pre_mix(X, h_pre)), h_post, h_res)
    ...                                                   # one such block per site
    y = g(mhc.reduce_streams(X))                          # where the stream is read outside the chain

With ``collapse="learned"`` the reduces left at the chains' exits become ``learned_collapse`` (ops/collapse.py),
whose parameters live in ``gm.mhc[<module path>_collapse]``.

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
from ..ops.collapse import CollapseParams, learned_collapse
from ..site_params import MHCSiteParams
from .base import MHCPass, SiteAnalysis
from .nodes import has_effects
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
        if "checkpoint_call" in self.site.output.meta:  # the site's block runs checkpointed: so do its mHC ops
            node.meta["checkpoint_call"] = self.site.output.meta["checkpoint_call"]
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


def param_key(module_path: str, occurrence: int) -> str:
    """The ``gm.mhc`` key of a site: its module path (dots as underscores), then ``_k`` for the k-th reuse.

    The key depends only on the module path and on how many earlier sites of the same path the trace holds
    (a weight-shared block applied 4 times gives ``blk``, ``blk_1``, ...), so two traces of one model (train and
    eval, two input signatures) map every site to the same parameters.
    """
    base = module_path.replace(".", "_") or "root"
    return base if occurrence == 0 else f"{base}_{occurrence}"


def param_keys(sites: list[ResidualSite], path_of=lambda site: site.module_path) -> dict[ResidualSite, str]:
    """Every site's ``gm.mhc`` key, counting reuses of a module path over all sites found (rewritten or not)."""
    seen: dict[str, int] = {}
    keys = {}
    for site in sites:
        path = path_of(site)
        keys[site] = param_key(path, seen.get(path, 0))
        seen[path] = seen.get(path, 0) + 1
    return keys


def _check_reusable(params: MHCSiteParams, config: MHCConfig, site: ResidualSite) -> None:
    if params.n != config.n or params.channels != site.channels or (params.phi is not None) != config.dynamic:
        raise MHCRewriteError(
            f"the residual site at {site.module_path or 'the model root'} has width {site.channels} in this trace, "
            f"but its mHC parameters were made for width {params.channels} (n={params.n}); the model computes a "
            "different residual stream for these inputs than for the ones it was converted with"
        )


def _device(site: ResidualSite, gm: fx.GraphModule) -> torch.device:
    val = site.stream.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.device
    return next(gm.parameters(), torch.empty(0)).device


def rewrite_mhc(gm: fx.GraphModule, config: MHCConfig, sites: list[ResidualSite]) -> bool:
    """Rewrite the ``sites`` marked ``rewrite`` (grouped into chains by ``GroupChains``).

    Args:
        gm: the traced graph module; modified in place.
        config: the conversion options.
        sites: the sites of ``gm``.
    Returns:
        Whether the graph was modified (False when no site is to be rewritten).
    Raises:
        MHCRewriteError: a site's channel size is unknown (trace with ``example_inputs``).
    """
    keys = param_keys(sites)  # counted over every site found, rewritten or not
    sites = [site for site in sites if site.rewrite]
    if not sites:
        return False
    graph = gm.graph
    fake_mode = detect_fake_mode([node.meta.get("val") for node in graph.nodes])
    if not hasattr(gm, "mhc"):
        gm.add_submodule("mhc", nn.ModuleDict())
    stream_out: dict[ResidualSite, fx.Node] = {}  # site -> its n-stream output
    expanded: dict[tuple, fx.Node] = {}  # (chain-head stream, channel axis) -> its n-stream tensor
    reduced: dict[fx.Node, fx.Node] = {}  # erased site output -> the reduce that replaced it
    exits: dict[fx.Node, ResidualSite] = {}  # reduce node -> its site (the live ones are the chain exits)
    for site in sites:
        site.width()  # known, or an error naming the site
        make = _NodeMaker(gm, fake_mode, site)
        stream = reduced.get(site.stream, site.stream)
        if site.prev is not None:
            streams = stream_out[site.prev]
        elif (stream, site.channel_dim) in expanded:
            streams = expanded[stream, site.channel_dim]
        else:
            with graph.inserting_before(_after(stream)):
                streams = expanded[stream, site.channel_dim] = make("expand", mhc.expand_streams.default,
                                                                    make.to_channel_last(stream), config.n)

        key = keys[site]
        if key in gm.mhc:  # parameters registered before this trace (a converted model's region): reuse them
            _check_reusable(gm.mhc[key], config, site)
        else:
            gm.mhc[key] = MHCSiteParams(config, site.channels, site.index, site.module_path, _device(site, gm))
        site.param_name = f"mhc.{key}"
        with graph.inserting_before(_after(streams)):
            params = [make.get_attr(f"{site.param_name}.{name}") if getattr(gm.mhc[key], name) is not None else None
                      for name in ("phi", "alpha", "bias")]
            if config.constraint == "permutations":  # mHC-lite: ops/permutations.py
                coeffs = make("coefficients", mhc.coefficients_permutations.default,
                              streams if config.dynamic else None, *params, config.n)
            else:
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
            reduce = make("reduce", mhc.reduce_streams.default, streams)
            out = make.from_channel_last(reduce)
        exits[reduce] = site
        site.output.replace_all_uses_with(out)
        for user in list(out.users):  # torch.export's dtype checks would keep an otherwise unused reduce alive
            if user.target is torch.ops.aten._assert_tensor_metadata.default:
                graph.erase_node(user)
        reduced[site.output] = out
        for add in reversed(site.add_nodes):
            graph.erase_node(add)
        stream_out[site] = streams
    graph.eliminate_dead_code(is_impure_node=has_effects)
    if config.collapse == "learned":
        _learn_collapses(gm, fake_mode, exits, config)
    graph.lint()
    gm.recompile()
    return True


class RewriteMHC(MHCPass):
    """The rewrite pass: one expand per chain, the mHC ops at each site, a reduce where a stream leaves its chain.

    Args:
        config: the conversion options.
        analysis: the ``SiteAnalysis`` that ``FindResidualSites`` filled and ``GroupChains`` grouped.
    """

    def __init__(self, config: MHCConfig, analysis: SiteAnalysis):
        self.config, self.analysis = config, analysis

    def requires(self, graph_module: fx.GraphModule) -> None:
        self.require(self.analysis.graph is graph_module.graph, "FindResidualSites",
                     "there are no residual sites of this graph to rewrite")
        self.require(not self.analysis.rewritten, "FindResidualSites",
                     "these sites are already rewritten; find them again on the rewritten graph")
        self.require(self.analysis.grouped, "GroupChains",
                     "the sites are not grouped into chains, so every site would expand and reduce its own streams")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = rewrite_mhc(graph_module, self.config, self.analysis.sites)
        self.analysis.rewritten = modified
        return PassResult(graph_module, modified)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        live = set(graph_module.graph.nodes)
        sites = self.analysis.to_rewrite
        assert not any(add in live for site in sites for add in site.add_nodes), "a rewritten residual add is left"
        expands = sum(node.target is mhc.expand_streams.default for node in live)
        chains = len({site.chain for site in sites})
        assert expands <= chains, f"{expands} expand_streams for {chains} chain(s)"


def _learn_collapses(gm: fx.GraphModule, fake_mode, exits: dict[fx.Node, ResidualSite], config: MHCConfig) -> None:
    """Swap every live mean-reduce (a chain's exit) for a learned collapse with its own ``CollapseParams``."""
    for reduce in [node for node in gm.graph.nodes if node in exits]:
        site = exits[reduce]
        make = _NodeMaker(gm, fake_mode, site)
        key = param_key(f"{site.module_path}.collapse", 0)  # stable: every trace of the model reuses it
        if key not in gm.mhc:
            gm.mhc[key] = CollapseParams(config.n, site.channels, site.module_path, _device(site, gm))
        with gm.graph.inserting_before(reduce):
            params = [make.get_attr(f"mhc.{key}.{name}") for name in ("phi", "alpha", "bias")]
            gated = make("collapse", learned_collapse, reduce.args[0], *params)
        reduce.replace_all_uses_with(gated)
        gm.graph.erase_node(reduce)
