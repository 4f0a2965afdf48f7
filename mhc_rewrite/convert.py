"""The front door: ``convert`` (rewrite a model's residuals into mHC) and ``find_residuals``.

Everything here runs once, at conversion: trace the whole model, find and group its residual sites
(``pipeline.run_analysis``), pick the region (the deepest module holding them), give each site its parameters, and
install the converted region in a shallow copy of the model. What runs at every later call of the converted model
is ``region.py`` (it re-traces the region per specialisation and rewrites it with ``pipeline.rewrite_call``).
``convert(graph_module)`` rewrites a traced graph directly and returns a ``GraphModule`` (what the ``mhc``
torch.compile backend does with Dynamo's graphs).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from .config import MHCConfig, resolve_config
from .errors import MHCRewriteError
from .passes.nodes import module_paths
from .passes.rewrite_mhc import param_key, param_keys
from .passes.sites import ResidualSite, SiteInfo
from .paths import common_prefix, relative
from .pipeline import learned_collapses, run_analysis, run_pipeline
from .record import conversion_record
from .region import find_region, install, region_state, shallow_clone
from .site_params import MHCSiteParams
from .trace import caches_off, split_example_inputs, trace, without_cache

log = logging.getLogger(__name__)


def trace_unconverted(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """The whole-model trace the analysis reads (key-value caches off: they cannot cross a trace)."""
    if not isinstance(model, fx.GraphModule) and example_inputs is not None:
        args, kwargs = without_cache(model.forward, *split_example_inputs(example_inputs), keywords=True)
        example_inputs = kwargs or args
    with caches_off(model):  # also the Hugging Face model inside a wrapper, or reached only through **kwargs
        return trace(model, example_inputs)


def _check_runs(model: nn.Module, example_inputs: Any) -> None:
    """Run the original model once on the example inputs (buffers copied, RNG restored, no grad): inputs it
    cannot run are an error carrying the model's own message, before any tracing."""
    args, kwargs = split_example_inputs(example_inputs)
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.func.functional_call(model, buffers, args, kwargs, strict=False)
    except Exception as exc:
        raise MHCRewriteError(f"{type(model).__name__} cannot run the example inputs given to convert(): "
                              f"{type(exc).__name__}: {exc}") from exc


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
    return [site.info() for site in run_analysis(trace_unconverted(model, example_inputs), filter_fn).sites]


def _refuse_converted(model: nn.Module) -> None:
    if (isinstance(model, fx.GraphModule) and hasattr(model, "mhc_sites")) or find_region(model) is not None:
        raise MHCRewriteError("this model is already converted (it holds mHC sites); convert the original instead")


def _region_path(sites: list[ResidualSite]) -> str:
    """The deepest module whose forward holds every node the rewrite touches: each chain's head stream, the
    residual adds, and the nodes that read a chain's output outside the chain (where the streams are reduced)."""
    outputs = {site.output for site in sites}
    nodes = [node for site in sites for node in (site.stream, *site.add_nodes)]
    nodes += [user for site in sites for user in site.output.users if user not in outputs]
    scopes = [module_paths(node, called=False) if node.op not in ("placeholder", "output") else [] for node in nodes]
    common = common_prefix(scopes)
    return common[-1] if common else ""


def _graph_convert(model: fx.GraphModule, example_inputs: Any, config: MHCConfig, filter_fn) -> nn.Module:
    """The graph-level rewrite: a ``GraphModule`` with the mHC ops, sharing ``model``'s parameters."""
    gm, analysis = run_pipeline(trace(model, example_inputs), config, filter_fn)
    if not analysis.rewritten:
        _warn_nothing(model, analysis.sites)
        return model
    gm.mhc_sites = [site.info() for site in analysis.sites if site.rewrite]
    gm.mhc_skipped = [site.info() for site in analysis.sites if not site.rewrite]
    gm.mhc_config = config
    gm.mhc_model_name = type(model).__name__
    return gm


def _warn_nothing(model: nn.Module, sites: list[ResidualSite]) -> None:
    reasons = "; ".join(sorted({f"{s.module_path or '<root>'}: {s.skip_reason}" for s in sites}))
    warnings.warn(
        f"{type(model).__name__} has no residual site to rewrite"
        + (f" (found {len(sites)}, all skipped: {reasons})" if sites else "")
        + "; returning the model unchanged",
        stacklevel=3,
    )


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
    residual sites are found and grouped into chains, and the smallest module holding them (the *region*) is
    replaced, in a shallow copy of the model, by a converted region: at each call it runs a graph in which the
    stream is expanded into ``n`` copies at the chain's head, each site mixes the streams with ``torch.ops.mhc``
    ops, and the streams are averaged back where the residual leaves the chain. A call in another mode or with
    another signature (train/eval, keyword inputs, dtype, ...) traces the region again: a graph is never run
    for a call it was not traced for. With ``init="identity"`` (the default) the converted model computes the
    same function as the original until it trains.

    Args:
        model: the model. It is not modified: the result is a copy of the same class sharing its parameters
            (deep-copy the model first to keep an independent original). A ``GraphModule`` is rewritten as a
            graph and a ``GraphModule`` is returned.
        n: number of streams (default 4).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs. Required when
            ``symbolic_trace`` fails (Hugging Face models). The model is run once on them (no grad, buffers and
            RNG untouched): inputs it cannot run are an error with the model's own message.
        config: an :class:`MHCConfig`, instead of ``n`` and keyword options.
        filter_fn: ``filter_fn(site) -> bool`` picks the sites to rewrite (it must return a bool); by default a
            site is rewritten when its branch holds a parameterised op.
        **options: the other :class:`MHCConfig` fields: ``dynamic``, ``sinkhorn_iters``, ``mode``, ``init``.
    Returns:
        The converted model (same class as ``model``): its mHC parameters live under ``<region>.mhc.<site>``,
        ``mhc_sites``/``mhc_skipped`` list the sites and ``mhc_config`` the options; or ``model`` itself, with a
        warning, when it has no residual to rewrite. Residual sites found and not rewritten (channel axis not
        decided, a residual around rewritten ones) are counted in one warning, their reasons grouped; an add
        excluded by ``filter_fn`` or whose branch has no parameterised op is not a residual block and not counted.

    Example:
        >>> model = mhc_rewrite.convert(model, n=4)
        >>> model.mhc_sites[0].module_path
    """
    config = resolve_config(n, config, options, filter_fn)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}")
    _refuse_converted(model)
    if isinstance(model, fx.GraphModule):
        return _graph_convert(model, example_inputs, config, filter_fn)
    if example_inputs is not None:
        _check_runs(model, example_inputs)
    traced = trace_unconverted(model, example_inputs)
    analysis = run_analysis(traced, filter_fn)
    if not analysis.to_rewrite:
        _warn_nothing(model, analysis.sites)
        return model
    path = _region_path(analysis.to_rewrite)
    root, region = shallow_clone(model, path)
    install(region, config, path)
    _add_site_params(region, analysis.sites, config, path, next(model.parameters(), torch.empty(0)).device)
    if config.collapse == "learned":  # made now, so that an optimizer created after convert() sees them
        for site, collapse in learned_collapses(traced, analysis, config).items():
            region.mhc[param_key(f"{relative(site.module_path, path)}.collapse", 0)] = collapse
    _describe(root, model, analysis.sites, config, path, example_inputs)
    log.info("rewrote %d residual site(s) in %d chain(s) inside %s", len(root.mhc_sites),
             len({s.chain for s in analysis.to_rewrite}), path or "the model root")
    return root


def _add_site_params(region: nn.Module, sites: list[ResidualSite], config: MHCConfig, path: str, device) -> None:
    """Give every site to rewrite its parameters, ``region.mhc[<key>]``, keyed by its module path inside the region
    (reuses of one path counted over every site inside, rewritten or not, as ``pipeline.rewrite_call`` counts)."""
    inside = [s for s in sites if not path or s.module_path == path or s.module_path.startswith(path + ".")]
    keys = param_keys(inside, lambda s: relative(s.module_path, path))
    region_state(region).skipped_keys = {key for site, key in keys.items() if not site.rewrite}
    for site in (s for s in sites if s.rewrite):
        key = keys[site]
        region.mhc[key] = MHCSiteParams(config, site.width(), site.index, relative(site.module_path, path), device)
        site.param_name = f"{path + '.' if path else ''}mhc.{key}"


# Skips the user chose (their filter_fn) or the default filter makes (an add whose branch has no parameterised op,
# such as GELU's `x + 0.044715 * x**3`: arithmetic, not a residual block): not reported by the warning below.
_CHOSEN_SKIPS = ("excluded by filter_fn", "branch has no parameterised op")


def _warn_skipped(model: nn.Module, sites: list[ResidualSite]) -> None:
    """One warning at conversion when residual blocks were found and not rewritten (their stream stays a plain
    residual there): how many of how many, the reasons grouped by kind, a few module paths and one reason in full."""
    blocks = [s for s in sites if s.rewrite or s.skip_reason not in _CHOSEN_SKIPS]
    skipped = [s for s in blocks if not s.rewrite]
    if not skipped:
        return
    groups: dict[str, list[ResidualSite]] = {}
    for site in skipped:
        groups.setdefault(site.skip_reason.split(":")[0], []).append(site)
    parts = []
    for kind, group in groups.items():
        paths = sorted({s.module_path or "<root>" for s in group})
        detail = group[0].skip_reason[len(kind) + 1:].strip()
        detail = f"; e.g. {detail[:160]}{'...' if len(detail) > 160 else ''}" if detail else ""
        parts.append(f"{len(group)} {kind} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}{detail})")
    warnings.warn(
        f"{type(model).__name__}: {len(skipped)} of {len(blocks)} residual sites were skipped and keep their plain "
        f"residual: {'; '.join(parts)}. model.mhc_skipped lists each with its reason.",
        stacklevel=4,  # the user's convert() call
    )


def _describe(root: nn.Module, model: nn.Module, sites: list[ResidualSite], config: MHCConfig, path: str,
              example_inputs: Any) -> None:
    """What the converted model says of itself: its sites, options and, for Hugging Face models, the saved record."""
    root.mhc_sites = [site.info() for site in sites if site.rewrite]
    root.mhc_skipped = [site.info() for site in sites if not site.rewrite]
    root.mhc_config = config
    root.mhc_model_name = type(model).__name__
    _warn_skipped(model, sites)
    state = region_state(root)
    state.sites, state.skipped = root.mhc_sites, root.mhc_skipped
    state.generates = bool(getattr(root, "can_generate", lambda: False)())  # Hugging Face: asked for, a cache is made
    if getattr(root, "config", None) is not None and hasattr(root.config, "to_dict"):
        # written by save_pretrained, read back (and validated) by mhc_rewrite.from_pretrained
        root.config.mhc_rewrite = conversion_record(config, path, example_inputs)
