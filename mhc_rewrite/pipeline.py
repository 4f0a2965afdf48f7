"""The graph pipeline, in one place: find -> group -> rewrite (-> lower, in the ``mhc`` backend).

The passes run under ``torch.fx``'s ``PassManager`` with the graph checked (``graph.lint()``) after each pass. A pass
run out of order refuses in its ``requires`` check with a ``PassOrderError`` naming it and the pass it needs; any
other failure is an ``MHCRewriteError`` naming the pass that failed.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import fx
from torch.fx.passes.infra.pass_manager import PassManager

from .config import MHCConfig
from .errors import MHCRewriteError
from .passes import FindResidualSites, GroupChains, LowerFused, RewriteMHC, SiteAnalysis
from .passes.sites import ResidualSite

FilterFn = Callable[[ResidualSite], bool]


def _check(gm: fx.GraphModule) -> None:
    gm.graph.lint()


def run_passes(passes: list, gm: fx.GraphModule) -> bool:
    """Run ``passes`` in order on ``gm`` with a ``PassManager`` that checks the graph after each pass.

    Args:
        passes: ``PassBase`` instances.
        gm: the graph module; modified in place.
    Returns:
        Whether any pass modified the graph.
    Raises:
        MHCRewriteError: from the failing pass, naming it (``PassOrderError`` for a pass run out of order).
    """
    manager = PassManager(list(passes), run_checks_after_each_pass=True)
    manager.add_checks(_check)
    try:
        result = manager(gm)
    except Exception as exc:  # the PassManager wraps every failure in a bare Exception naming the pass
        cause = exc.__cause__
        if isinstance(cause, MHCRewriteError):
            raise cause from cause.__cause__
        raise MHCRewriteError(str(exc)) from cause or exc
    return result.modified


def run_analysis(gm: fx.GraphModule, filter_fn: Optional[FilterFn] = None) -> SiteAnalysis:
    """Find the residual sites of ``gm`` and group them into chains; the graph is not modified.

    Args:
        gm: a traced graph module (``mhc_rewrite.trace.trace``).
        filter_fn: ``filter_fn(site) -> bool`` picks the sites to rewrite (None: branches with parameters).
    Returns:
        The ``SiteAnalysis``: every site, with chains.
    """
    find = FindResidualSites(filter_fn)
    run_passes([find, GroupChains(find.analysis)], gm)
    return find.analysis


def run_pipeline(gm: fx.GraphModule, config: MHCConfig,
                 filter_fn: Optional[FilterFn] = None) -> tuple[fx.GraphModule, SiteAnalysis]:
    """Find, group and rewrite: ``gm`` with mHC at every chosen residual site.

    Args:
        gm: a traced graph module; modified in place (its new parameters under ``gm.mhc``).
        config: the conversion options.
        filter_fn: as for :func:`run_analysis`.
    Returns:
        ``(gm, analysis)``; ``analysis.rewritten`` is False when no site was to be rewritten (``gm`` unchanged).
    """
    find = FindResidualSites(filter_fn)
    run_passes([find, GroupChains(find.analysis), RewriteMHC(config, find.analysis)], gm)
    return gm, find.analysis


def lower(gm: fx.GraphModule) -> bool:
    """Replace the reference mHC ops of ``gm`` with the fused ones, in place; returns whether any were."""
    return run_passes([LowerFused()], gm)
