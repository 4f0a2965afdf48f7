"""Pass: group the rewritable residual sites into chains, one per residual stream.

A site continues a chain when its stream is (a no-op view of) the output of an earlier rewritten site: the
two then share one n-stream tensor, expanded once at the chain's head and reduced only where the stream is
read outside the chain. A pre-norm decoder of L layers is one chain of 2L sites.
Sets ``site.chain`` and ``site.prev``; skipped sites get no chain. The graph is not modified.
``RewriteMHC`` requires this pass: without chains every site would expand and reduce its own streams.
"""

from __future__ import annotations

import logging

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .base import MHCPass, SiteAnalysis
from .noop import noop_sources
from .sites import ResidualSite

log = logging.getLogger(__name__)


def group_chains(gm: fx.GraphModule, sites: list[ResidualSite]) -> None:
    """Link each site to the site it continues and number the chains.

    Args:
        gm: the graph module the sites were found in.
        sites: the sites of ``gm`` (from ``FindResidualSites``); ``chain`` and ``prev`` are set in place.
    """
    by_output = {site.output: site for site in sites if site.rewrite}
    chains = 0
    for site in sites:
        if not site.rewrite:
            continue
        site.prev = next((by_output[src] for src in noop_sources(site.stream, gm) if src in by_output), None)
        prev = site.prev
        if prev is not None and (prev.channel_dim, prev.channels) != (site.channel_dim, site.channels):
            # one chain holds one n-stream tensor, so one layout: say why the stream starts again here
            site.chain_break = (f"new chain: its stream continues site {prev.index} ({prev.module_path or '<root>'}), "
                                f"whose branch maps over axis {prev.channel_dim} (C={prev.channels}), but this "
                                f"branch maps over axis {site.channel_dim} (C={site.channels})")
            log.warning("%s: %s", site.module_path or "<root>", site.chain_break)
            site.prev = None
        if site.prev is None:
            site.chain, chains = chains, chains + 1
        else:
            site.chain = site.prev.chain


class GroupChains(MHCPass):
    """The group pass: links the sites of ``analysis`` into chains; the graph is not modified.

    Args:
        analysis: the ``SiteAnalysis`` that ``FindResidualSites`` filled.
    """

    def __init__(self, analysis: SiteAnalysis):
        self.analysis = analysis

    def requires(self, graph_module: fx.GraphModule) -> None:
        self.require(self.analysis.graph is graph_module.graph, "FindResidualSites",
                     "there are no residual sites of this graph to group")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        group_chains(graph_module, self.analysis.sites)
        self.analysis.grouped = True
        return PassResult(graph_module, False)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        assert all(site.chain is not None for site in self.analysis.to_rewrite)
