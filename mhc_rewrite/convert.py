"""The public entry points: ``convert`` (rewrite a model's residuals into mHC) and ``find_residuals``.

``convert(model)`` returns the user's model, converted: a shallow copy of the same class whose *region* (the
smallest module holding every rewritten residual chain) runs a graph traced and rewritten per specialisation
(``mhc_rewrite/region.py``). ``convert(graph_module)`` rewrites a traced graph directly and returns a
``GraphModule`` (what the ``mhc`` torch.compile backend does with Dynamo's graphs).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from mhc_rewrite.passes import FindResidualSites, GroupChains, RewriteMHC
from mhc_rewrite.passes.rewrite_mhc import param_key, param_keys
from mhc_rewrite.passes.sites import ResidualSite, SiteInfo

from .checkpointing import checkpoint_units, record_checkpoints
from .config import MHCConfig, resolve_config
from .errors import MHCRewriteError
from .pipeline import lower, run_analysis, run_passes, run_pipeline
from .region import RegionState, converted_class, find_region, original_module, shallow_clone
from .saving import example_input_spec
from .site_params import MHCSiteParams
from .trace import split_example_inputs, trace, trace_call

log = logging.getLogger(__name__)


def _without_cache(model: nn.Module, example_inputs: Any) -> Any:
    """Example inputs for the analysis trace: ``use_cache=False`` where the forward takes it and it is not given
    (a model as loaded returns a key-value cache, which torch.export cannot carry)."""
    if "use_cache" not in inspect.signature(model.forward).parameters:
        return example_inputs
    args, kwargs = split_example_inputs(example_inputs)
    if args or "use_cache" in kwargs:
        names = list(inspect.signature(model.forward).parameters)
        if "use_cache" in kwargs or names.index("use_cache") < len(args):
            return example_inputs
        kwargs = dict(zip(names, args))
    return {**kwargs, "use_cache": False}


def trace_unconverted(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """The whole-model trace the analysis reads (key-value caches off: they cannot cross a trace)."""
    if not isinstance(model, fx.GraphModule) and example_inputs is not None:
        example_inputs = _without_cache(model, example_inputs)
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


def _scope(node: fx.Node) -> list[str]:
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def _region_path(sites: list[ResidualSite]) -> str:
    """The deepest module whose forward holds every node the rewrite touches: each chain's head stream, the
    residual adds, and the nodes that read a chain's output outside the chain (where the streams are reduced)."""
    outputs = {site.output for site in sites}
    nodes = [node for site in sites for node in (site.stream, *site.add_nodes)]
    nodes += [user for site in sites for user in site.output.users if user not in outputs]
    common: Optional[list[str]] = None
    for node in nodes:
        scope = _scope(node) if node.op not in ("placeholder", "output") else []
        if common is None:
            common = scope
        else:
            i = 0
            while i < min(len(common), len(scope)) and common[i] == scope[i]:
                i += 1
            common = common[:i]
    return common[-1] if common else ""


def _relative(path: str, region: str) -> str:
    if not region:
        return path
    return "" if path == region else path[len(region) + 1:]


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


def _register_collapses(traced: fx.GraphModule, analysis, config: MHCConfig, region: nn.Module, path: str) -> None:
    """Create the learned collapses' parameters now (an optimizer made after ``convert`` must see them): rewrite
    the analysis trace once and keep, under their keys inside the region, the collapses it made."""
    run_passes([RewriteMHC(config, analysis)], traced)
    for site in analysis.to_rewrite:
        absolute = param_key(f"{site.module_path}.collapse", 0)
        relative = param_key(f"{_relative(site.module_path, path)}.collapse", 0)
        if absolute in traced.mhc:
            region.mhc[relative] = traced.mhc[absolute]


def _warn_nothing(model: nn.Module, sites: list[ResidualSite]) -> None:
    reasons = "; ".join(sorted({f"{s.module_path or '<root>'}: {s.skip_reason}" for s in sites}))
    warnings.warn(
        f"{type(model).__name__} has no residual site to rewrite"
        + (f" (found {len(sites)}, all skipped: {reasons})" if sites else "")
        + "; returning the model unchanged",
        stacklevel=3,
    )


def _same(tensor):
    return tensor


@contextmanager
def _no_autocast():
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def build_specialisation(region: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Trace the region's original forward for this call and rewrite it with the region's mHC parameters."""
    state: RegionState = region.__dict__["_mhc_state"]
    # The caller's saved-tensor hooks (save_on_cpu, a byte counter) must not see the tracer's fake tensors, and
    # the caller's autocast applies when the graph runs, not while it is traced.
    with original_module(region), torch.autograd.graph.saved_tensors_hooks(_same, _same), _no_autocast(), \
            record_checkpoints(region) as recorder:
        gm = trace_call(region, args, kwargs, recorder=recorder)
    tags = sorted({n.meta["checkpoint_call"] for n in gm.graph.nodes if "checkpoint_call" in n.meta})
    units = tags or recorder.units  # symbolic traces tag the nodes made inside each checkpoint call
    gm.mhc = region.mhc  # reuse, never create: the rewrite finds every site's parameters here
    find = FindResidualSites()
    run_passes([find], gm)
    for site, key in param_keys(find.analysis.sites).items():
        site.rewrite = key in region.mhc
        if not site.rewrite and site.has_params and not site.skip_reason:
            raise MHCRewriteError(
                f"this call of the converted {type(region).__name__} (train={region.training}) runs a residual at "
                f"{site.module_path or 'its root'} that was not there when the model was converted; convert the "
                "model in the mode and with the inputs it is trained with"
            )
        site.skip_reason = site.skip_reason or ("" if site.rewrite else "not rewritten at conversion")
    run_passes([GroupChains(find.analysis), RewriteMHC(state.config, find.analysis)], gm)
    if state.lowered:
        lower(gm)
    gm.mhc_sites, gm.mhc_skipped, gm.mhc_config = state.sites, state.skipped, state.config  # as the model's
    if units:  # checkpointed layers stay checkpointed, their mHC ops with them
        gm = checkpoint_units(gm, units)
    if state.path:  # module paths as in the whole model, for the inspect views
        for node in gm.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if stack:
                node.meta["nn_module_stack"] = {k: (_absolute(p, state.path), t) for k, (p, t) in stack.items()}
            if "mhc" in node.meta:
                node.meta["mhc"] = {**node.meta["mhc"], "module_path": _absolute(node.meta["mhc"]["module_path"],
                                                                                   state.path)}
    return gm


def _absolute(path: str, region: str) -> str:
    return f"{region}.{path}" if path else region


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
        warning, when it has no residual to rewrite.

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
    sites = analysis.sites
    rewritten = [site for site in sites if site.rewrite]
    if not rewritten:
        _warn_nothing(model, sites)
        return model
    for site in rewritten:
        if site.channels is None:
            raise MHCRewriteError(
                f"cannot tell the width of the residual stream at {site.module_path or 'the model root'}: "
                "pass example_inputs to convert() so that shapes can be propagated"
            )
    path = _region_path(rewritten)
    root, region = shallow_clone(model, path)
    region.__class__ = converted_class(type(region))
    region.__dict__["_mhc_state"] = RegionState(config, path)
    region.mhc = nn.ModuleDict()
    inside = [s for s in sites if not path or s.module_path == path or s.module_path.startswith(path + ".")]
    keys = param_keys(inside, lambda s: _relative(s.module_path, path))
    device = next(model.parameters(), torch.empty(0)).device
    for site in rewritten:
        key = keys[site]
        region.mhc[key] = MHCSiteParams(config, site.channels, site.index, _relative(site.module_path, path), device)
        site.param_name = f"{path + '.' if path else ''}mhc.{key}"
    root.mhc_sites = [site.info() for site in rewritten]
    if config.collapse == "learned":
        _register_collapses(traced, analysis, config, region, path)
    root.mhc_skipped = [site.info() for site in sites if not site.rewrite]
    root.mhc_config = config
    region.__dict__["_mhc_state"].sites, region.__dict__["_mhc_state"].skipped = root.mhc_sites, root.mhc_skipped
    root.mhc_model_name = type(model).__name__
    if getattr(root, "generation_config", None) is not None:
        root.generation_config.use_cache = False  # a converted region runs without a key-value cache
    if getattr(root, "config", None) is not None and hasattr(root.config, "to_dict"):
        # written by save_pretrained, read back (and validated) by mhc_rewrite.from_pretrained
        root.config.mhc_rewrite = {**config.to_dict(), "region": path,
                                   "example_inputs": example_input_spec(example_inputs)}
    log.info("rewrote %d residual site(s) in %d chain(s) inside %s", len(rewritten),
             len({s.chain for s in rewritten}), path or "the model root")
    return root

