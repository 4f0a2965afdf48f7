"""Pass: group the rewritable residual sites into chains, one per residual stream.

A site continues a chain when its stream is (a no-op view of) the output of an earlier rewritten site: the
two then share one n-stream tensor, expanded once at the chain's head and reduced only where the stream is
read outside the chain. A pre-norm decoder of L layers is one chain of 2L sites.
Sets ``site.chain`` and ``site.prev``; skipped sites get no chain. The graph is not modified.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .noop import noop_sources
from .sites import ResidualSite


def group_chains(gm: fx.GraphModule) -> PassResult:
    """Link each site in ``gm.meta["mhc_sites"]`` to the site it continues and number the chains.

    Args:
        gm: a graph module on which ``find_residual_sites`` has run.
    Returns:
        ``PassResult(gm, modified=False)``.
    """
    sites: list[ResidualSite] = gm.meta["mhc_sites"]
    by_output = {site.output: site for site in sites if site.rewrite}
    chains = 0
    for site in sites:
        if not site.rewrite:
            continue
        site.prev = next((by_output[src] for src in noop_sources(site.stream, gm) if src in by_output), None)
        if site.prev is not None and site.prev.channel_dim != site.channel_dim:
            site.prev = None  # the layout changes between the two sites: start a new stream
        if site.prev is None:
            site.chain, chains = chains, chains + 1
        else:
            site.chain = site.prev.chain
    return PassResult(gm, False)
