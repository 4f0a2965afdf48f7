"""The graph pipeline, in one place: every composition of the passes (find -> group -> rewrite -> lower).

- :func:`run_analysis`: find and group, the graph unchanged (``find_residuals``, ``convert``'s analysis);
- :func:`run_pipeline`: find, group, rewrite with new parameters (a ``GraphModule`` given to ``convert``);
- :func:`learned_collapses`: the rewrite of the analysis trace, for the learned collapses it creates;
- :func:`rewrite_call`: find, mark the sites by the parameters they already have, group, rewrite (and lower): the
  graph of one call of a converted model (``region.py`` traces it);
- :func:`lower`: reference ops -> fused ops (the ``mhc`` backend, ``mhc_rewrite.lower``).

The passes run under ``torch.fx``'s ``PassManager`` with the graph checked (``graph.lint()``) after each pass. A pass
run out of order refuses in its ``requires`` check with a ``PassOrderError`` naming it and the pass it needs; any
other failure is an ``MHCRewriteError`` naming the pass that failed.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

from .config import MHCConfig
from .errors import MHCRewriteError
from .passes import FindResidualSites, GroupChains, LowerFused, RewriteMHC, SiteAnalysis
from .passes.rewrite_mhc import param_key, param_keys
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


def learned_collapses(gm: fx.GraphModule, analysis: SiteAnalysis, config: MHCConfig) -> dict[ResidualSite, nn.Module]:
    """Rewrite ``gm`` (the analysis trace of :func:`run_analysis`) and return the learned collapses it created, by
    the site whose chain each reduces (``config.collapse == "learned"``)."""
    run_passes([RewriteMHC(config, analysis)], gm)
    keys = {site: param_key(f"{site.module_path}.collapse", 0) for site in analysis.to_rewrite}
    return {site: gm.mhc[key] for site, key in keys.items() if key in gm.mhc}


def rewrite_call(gm: fx.GraphModule, params: nn.ModuleDict, config: MHCConfig, caller: str,
                 lowered: bool = False, skipped: frozenset = frozenset()) -> fx.GraphModule:
    """Rewrite a new trace of a converted module with the parameters it already has: a site is rewritten exactly
    when ``params`` holds its key (nothing is created).

    Args:
        gm: the trace of one call of the converted module (its original forward); modified in place.
        params: the module's mHC parameters (``<region>.mhc``), by site key.
        config: the conversion options.
        caller: who made the call, for the error below (``"the converted LlamaModel (train=True)"``).
        lowered: also lower the reference ops to the fused ones.
        skipped: the keys of the sites found but skipped at conversion (e.g. their axis needed shapes the
            conversion's trace had not): they stay skipped.
    Returns:
        ``gm``.
    Raises:
        MHCRewriteError: the trace runs a parameterised residual that was not there at conversion.
    """
    gm.mhc = params
    find = FindResidualSites()
    run_passes([find], gm)
    for site, key in param_keys(find.analysis.sites).items():
        site.rewrite = key in params
        if not site.rewrite and site.has_params and not site.skip_reason and key not in skipped:
            raise MHCRewriteError(
                f"this call of {caller} runs a residual at {site.module_path or 'its root'} that was not there when "
                "the model was converted; convert the model in the mode and with the inputs it is trained with"
            )
        site.skip_reason = site.skip_reason or ("" if site.rewrite else "not rewritten at conversion")
    run_passes([GroupChains(find.analysis), RewriteMHC(config, find.analysis)], gm)
    if lowered:
        lower(gm)
    return gm


def lower(gm: fx.GraphModule) -> bool:
    """Replace the reference mHC ops of ``gm`` with the fused ones, in place; returns whether any were."""
    return run_passes([LowerFused()], gm)
