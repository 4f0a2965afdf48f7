"""``MHCConfig``: every option of the mHC rewrite, validated in this one place, and the resolver the entry points share.

Each option is a dataclass field whose ``metadata`` says what it means (``help``), what it allows (``choices``, or
``low``/``high`` bounds with the reason for the bound) and how the command line spells it (``flag``). Validation,
``to_dict``/``from_dict`` and the command-line flags (``cli.add_config_arguments``) are all read off the fields,
so a new option is one new field. ``filter_fn`` is not an option: it is code, passed to ``convert`` beside the config.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Optional

from .ops import MODES

INITS = ("identity", "paper")
N_MAX = 16
SINKHORN_ITERS_MAX = 200
CONSTRAINTS = ("sinkhorn", "permutations")
COLLAPSES = ("mean", "learned")
MAX_PERMUTATION_STREAMS = 6  # n! logits per token: 720 at n = 6


@dataclass(frozen=True)
class MHCConfig:
    """Options of the mHC rewrite (the picklable, JSON-able part; ``filter_fn`` is passed separately).

    Args:
        n: number of residual streams, 2 to 16. ``n=1`` is refused: with one stream Sinkhorn makes ``H_res`` the
            constant 1 and mHC degenerates to a gated residual; keep the original model as the baseline.
        dynamic: True: per-token mappings computed from the streams (the paper). False: static mappings,
            one learned set per site.
        sinkhorn_iters: Sinkhorn-Knopp rounds, 1 to 200 (the paper uses 20).
        mode: ``"mhc"`` (doubly-stochastic ``H_res``) or ``"hc"`` (unconstrained hyper-connections).
        init: ``"identity"``: the converted model computes the original function until it trains, with the stream
            symmetry broken. ``"paper"``: ``a = 0.01``, ``b = 0`` as read from the paper; not function-preserving.
        constraint: how mode ``"mhc"`` makes ``H_res`` doubly stochastic: ``"sinkhorn"`` (the paper) or
            ``"permutations"`` (mHC-lite, arXiv 2601.05732: softmax weights over the n! permutation matrices, exactly
            doubly stochastic; n <= 6).
        collapse: how the streams are reduced where the residual leaves a chain: ``"mean"`` or ``"learned"`` (a
            per-token gate computed from the streams, initialised to the mean).
    """

    n: int = field(default=4, metadata=dict(
        help="number of residual streams", low=2, high=N_MAX,
        why=f"the paper uses 4; each stream is a copy of the residual (n-fold activation memory) and every site "
            f"adds an n*C x (n^2+2n) projection, so n > {N_MAX} only costs memory"))
    dynamic: bool = field(default=True, metadata=dict(
        help="per-token maps computed from the streams (the paper)", flag="--static",
        flag_help="static maps: one learned set per site instead of per-token ones"))
    sinkhorn_iters: int = field(default=20, metadata=dict(
        help="Sinkhorn-Knopp rounds", low=1, high=SINKHORN_ITERS_MAX,
        why=f"the paper uses 20; the projection has converged long before {SINKHORN_ITERS_MAX} rounds, and every "
            "round is paid in each site's forward and backward"))
    mode: str = field(default="mhc", metadata=dict(
        help="'mhc' (doubly-stochastic H_res) or 'hc' (unconstrained hyper-connections)", choices=MODES))
    init: str = field(default="identity", metadata=dict(
        help="'identity' (function-preserving) or 'paper' (a=0.01, b=0)", choices=INITS))
    constraint: str = field(default="sinkhorn", metadata=dict(
        help="how mode 'mhc' makes H_res doubly stochastic: 'sinkhorn' or 'permutations' (mHC-lite)",
        choices=CONSTRAINTS))
    collapse: str = field(default="mean", metadata=dict(
        help="how streams are reduced where a chain ends: 'mean' or 'learned' (a per-token gate)", choices=COLLAPSES))

    def __new__(cls, *args, **kwargs):
        check_option_names(kwargs)
        return super().__new__(cls)

    def __post_init__(self):
        for f in fields(self):
            _check_value(f, getattr(self, f.name))
        if self.constraint == "permutations":
            if self.mode != "mhc":
                raise ValueError('constraint="permutations" constrains mode "mhc"; mode "hc" is unconstrained')
            if self.n > MAX_PERMUTATION_STREAMS:
                raise ValueError(f'constraint="permutations" needs n <= {MAX_PERMUTATION_STREAMS} (n! logits per '
                                 f'token), got n={self.n}; use constraint="sinkhorn"')

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict of JSON types; ``MHCConfig.from_dict(config.to_dict()) == config``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MHCConfig":
        """Build a config from a dict (a saved model's, a report's), validated like keyword options.

        Args:
            data: option names and values; missing options take their defaults.
        Returns:
            The :class:`MHCConfig`.
        Raises:
            TypeError: ``data`` is not a mapping, or holds an unknown option (the message lists the valid ones).
            ValueError: a value is out of range or not among the choices.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"MHCConfig.from_dict takes a dict of options, got {type(data).__name__}")
        return cls(**dict(data))


def option_names() -> list[str]:
    """The names of the options, in declaration order."""
    return [f.name for f in fields(MHCConfig)]


def check_option_names(options: Mapping[str, Any], extra: tuple[str, ...] = ()) -> None:
    """Refuse unknown option names, listing the valid ones and the closest match.

    Args:
        options: keyword options as given by the user.
        extra: names accepted besides the config's fields (``filter_fn`` for ``convert``).
    Raises:
        TypeError: naming the unknown option.
    """
    valid = option_names() + list(extra)
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(f"unknown option {name!r}: {hint}valid options are {', '.join(valid)}")


def _check_value(f, value) -> None:
    meta, name = f.metadata, f.name
    kind = {"int": int, "bool": bool, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
    if kind is not None and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, got {type(value).__name__} "
                        f"({value!r})")
    if name == "n" and value == 1:
        raise ValueError(
            "n=1 has a single stream: Sinkhorn makes H_res the constant 1 and mHC reduces to a gated "
            "residual. Use n >= 2 (the paper uses 4), or keep the original model as the baseline."
        )
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{name} must be one of {meta['choices']}, got {value!r}")
    low, high = meta.get("low", -math.inf), meta.get("high", math.inf)
    if ("low" in meta or "high" in meta) and not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range: {name} must be from {low} to {high} ({meta['why']})")


def check_filter_fn(filter_fn: Optional[Callable]) -> None:
    """Refuse a ``filter_fn`` that cannot be called on a site."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (site -> bool), got {type(filter_fn).__name__}")


def resolve_config(n: Optional[int] = None, config: Optional[MHCConfig] = None, options: Optional[dict] = None,
                   filter_fn: Optional[Callable] = None) -> MHCConfig:
    """The one resolver of ``convert``, ``find_residuals``, ``explain`` and ``compile``: options -> ``MHCConfig``.

    Args:
        n: number of streams, or None for the default (or for ``config``'s).
        config: a ready :class:`MHCConfig`, instead of ``n`` and ``options``.
        options: the other keyword options.
        filter_fn: the site filter passed beside the options; checked to be callable.
    Returns:
        The validated :class:`MHCConfig`.
    Raises:
        TypeError: an unknown option (with the valid names), both ``config`` and options, a bad type.
        ValueError: a value out of range or not among the choices.
    """
    options = dict(options or {})
    check_option_names(options, extra=("filter_fn",))
    check_filter_fn(filter_fn)
    if config is None:
        return MHCConfig(**({} if n is None else {"n": n}), **options)
    if not isinstance(config, MHCConfig):
        raise TypeError(f"config must be an MHCConfig, got {type(config).__name__}")
    if n is not None or options:
        raise TypeError("pass either config=MHCConfig(...) or n=/keyword options, not both")
    return config
