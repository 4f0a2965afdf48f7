"""``MHCConfig``: every option of :func:`mhc_rewrite.convert`, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from .ops import MODES

if TYPE_CHECKING:
    from mhc_rewrite.passes.sites import ResidualSite

INITS = ("identity", "paper")
CONSTRAINTS = ("sinkhorn", "permutations")
COLLAPSES = ("mean", "learned")
MAX_PERMUTATION_STREAMS = 6  # n! logits per token: 720 at n = 6


@dataclass(frozen=True)
class MHCConfig:
    """Options of the mHC rewrite.

    Args:
        n: number of residual streams (>= 2). ``n=1`` is refused: with one stream Sinkhorn makes ``H_res``
            the constant 1 and mHC degenerates to a gated residual; keep the original model as the baseline.
        dynamic: True: per-token mappings computed from the streams (the paper). False: static mappings,
            one learned set per site.
        sinkhorn_iters: Sinkhorn-Knopp rounds (the paper uses 20).
        mode: ``"mhc"`` (doubly-stochastic ``H_res``) or ``"hc"`` (unconstrained hyper-connections).
        init: ``"identity"``: the converted model computes the original function until it trains (SPEC §2),
            with the stream symmetry broken. ``"paper"``: ``a = 0.01``, ``b = 0`` as read from the paper;
            not function-preserving.
        filter_fn: ``filter_fn(site) -> bool`` picks the sites to rewrite; by default a site is rewritten
            when its branch holds a parameterised op.
        constraint: how mode ``"mhc"`` makes ``H_res`` doubly stochastic: ``"sinkhorn"`` (the paper's
            Sinkhorn-Knopp rounds) or ``"permutations"`` (mHC-lite, arXiv 2601.05732: softmax weights over the
            n! permutation matrices, exactly doubly stochastic; n <= 6).
        collapse: how the streams are reduced to one where the residual leaves a chain: ``"mean"``, or
            ``"learned"``: a per-token sigmoid gate computed from the streams (as DeepSeek-V4's hyper-head),
            initialised to the mean so the converted model still computes the original function.
    """

    n: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    mode: str = "mhc"
    init: str = "identity"
    filter_fn: Optional[Callable[["ResidualSite"], bool]] = None
    constraint: str = "sinkhorn"
    collapse: str = "mean"

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int):
            raise TypeError(f"n must be an int, got {type(self.n).__name__}")
        if self.n == 1:
            raise ValueError(
                "n=1 has a single stream: Sinkhorn makes H_res the constant 1 and mHC reduces to a gated "
                "residual. Use n >= 2 (the paper uses 4), or keep the original model as the baseline."
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 2, got {self.n}")
        if not isinstance(self.dynamic, bool):
            raise TypeError(f"dynamic must be a bool, got {type(self.dynamic).__name__}")
        if isinstance(self.sinkhorn_iters, bool) or not isinstance(self.sinkhorn_iters, int):
            raise TypeError(f"sinkhorn_iters must be an int, got {type(self.sinkhorn_iters).__name__}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be callable (site -> bool), got {type(self.filter_fn).__name__}")
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        if self.constraint == "permutations":
            if self.mode != "mhc":
                raise ValueError('constraint="permutations" constrains mode "mhc"; mode "hc" is unconstrained')
            if self.n > MAX_PERMUTATION_STREAMS:
                raise ValueError(f'constraint="permutations" needs n <= {MAX_PERMUTATION_STREAMS} (n! logits per '
                                 f'token), got n={self.n}; use constraint="sinkhorn"')
        if self.collapse not in COLLAPSES:
            raise ValueError(f"collapse must be one of {COLLAPSES}, got {self.collapse!r}")
