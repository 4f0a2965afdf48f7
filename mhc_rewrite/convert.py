"""The public entry points: ``convert`` (rewrite a model's residuals into mHC) and ``find_residuals``."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional

from torch import fx, nn

from .config import MHCConfig, resolve_config
from .errors import MHCRewriteError
from .passes.sites import ResidualSite, SiteInfo
from .pipeline import run_analysis, run_pipeline
from .trace import trace

log = logging.getLogger(__name__)


def find_residuals(model: nn.Module, example_inputs: Any = None, *, filter_fn=None, **options) -> list[SiteInfo]:
    """List the residual sites of ``model`` without rewriting anything.

    Args:
        model: the model to analyse (traced like :func:`convert` does).
        example_inputs: as for :func:`convert`.
        filter_fn: ``filter_fn(site) -> bool`` decides which sites would be rewritten (as for :func:`convert`).
        **options: :class:`MHCConfig` options, validated as :func:`convert` does.
    Returns:
        One :class:`SiteInfo` per site, in graph order, with its module path, chain and branch size, and
        whether :func:`convert` would rewrite it (or why not).

    Example:
        >>> sites = mhc_rewrite.find_residuals(model)
        >>> [s.module_path for s in sites if s.rewritten]
    """
    resolve_config(options=options, filter_fn=filter_fn)
    return [site.info() for site in run_analysis(trace(model, example_inputs), filter_fn).sites]


def convert(
    model: nn.Module,
    n: Optional[int] = None,
    *,
    example_inputs: Any = None,
    config: Optional[MHCConfig] = None,
    filter_fn: Optional[Callable[[ResidualSite], bool]] = None,
    **options,
) -> nn.Module:
    """Rewrite every residual ``x + f(x)`` of ``model`` into an identity-initialised n-stream mHC block.

    The model is traced (``torch.fx.symbolic_trace``, else ``torch.export`` with ``example_inputs``), its
    residual sites are found and grouped into chains, and each chain is rewritten: the stream is expanded into
    ``n`` copies at its head, each site mixes the streams with ``torch.ops.mhc`` ops, and the streams are
    averaged back where the residual leaves the chain. With ``init="identity"`` (the default) the converted
    model computes the same function as the original until it trains.

    Args:
        model: the model (``nn.Module`` or ``GraphModule``). It is not modified; the returned module shares
            its parameters (deep-copy the model first to keep an independent original).
        n: number of streams (default 4).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs. Required when
            ``symbolic_trace`` fails (Hugging Face models) or the stream width cannot be read off the modules.
        config: an :class:`MHCConfig`, instead of ``n`` and keyword options.
        filter_fn: ``filter_fn(site) -> bool`` picks the sites to rewrite (it must return a bool); by default a
            site is rewritten when its branch holds a parameterised op.
        **options: the other :class:`MHCConfig` fields: ``dynamic``, ``sinkhorn_iters``, ``mode``, ``init``.
    Returns:
        A ``GraphModule`` whose new parameters live under ``mhc.<module path>`` and whose ``mhc_sites`` lists
        the rewritten sites; or ``model`` itself, with a warning, when it has no residual to rewrite.

    Example:
        >>> model = mhc_rewrite.convert(model, n=4)
        >>> model.mhc_sites[0].module_path
    """
    config = resolve_config(n, config, options, filter_fn)
    if isinstance(model, fx.GraphModule) and hasattr(model, "mhc_sites"):
        raise MHCRewriteError("this model is already converted (it has mhc_sites); convert the original instead")
    gm, analysis = run_pipeline(trace(model, example_inputs), config, filter_fn)
    sites = analysis.sites
    if not analysis.rewritten:
        reasons = "; ".join(sorted({f"{s.module_path or '<root>'}: {s.skip_reason}" for s in sites}))
        warnings.warn(
            f"{type(model).__name__} has no residual site to rewrite"
            + (f" (found {len(sites)}, all skipped: {reasons})" if sites else "")
            + "; returning the model unchanged",
            stacklevel=2,
        )
        return model
    gm.mhc_sites = [site.info() for site in sites if site.rewrite]
    gm.mhc_skipped = [site.info() for site in sites if not site.rewrite]
    gm.mhc_config = config
    gm.mhc_model_name = type(model).__name__
    log.info("rewrote %d residual site(s) in %d chain(s)", len(gm.mhc_sites), len({s.chain for s in gm.mhc_sites}))
    return gm
