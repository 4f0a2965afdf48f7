"""mHC-lite: ``H_res`` as a convex combination of the n! permutation matrices (arXiv 2601.05732).

Registered as ``torch.ops.mhc.coefficients_permutations``; used when ``MHCConfig.constraint="permutations"``.
The logits are laid out ``[pre (n) | post (n) | res (n!)]``, the permutations in ``itertools.permutations``
order (the identity first). With ``v = vec(X)``, ``z = (v @ phi) / rms(v)``, ``logits = gain·z + bias``:

    H_pre  = sigmoid(logits_pre),  H_post = 2·sigmoid(logits_post)      (as in mode "mhc")
    w      = softmax(logits_res)                                         # [..., n!]
    H_res  = sum_k w_k P_k                                               # exactly doubly stochastic

Every ``P_k`` has rows and columns summing to 1 and the weights are a probability vector, so ``H_res`` is
doubly stochastic up to rounding, with no iteration (Sinkhorn's 20 rounds leave the columns approximate).
Static mode (``streams``, ``phi``, ``alpha`` None) applies the same maps to ``bias`` alone. Math in float32
(float64 for float64 inputs); the backward (:func:`coefficients_permutations_backward_ref`) recomputes it.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from .coefficients import (
    empty_for_absent,
    fake_grads,
    gain,
    gate_gradients,
    present_grads,
    projection,
    projection_grads,
    save_optional,
    saved_optional,
)
from .sinkhorn import compute_dtype


def permutation_matrices(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The n! permutation matrices ``[n!, n, n]``, in ``itertools.permutations`` order (identity first).

    ``P_k[i, j] = 1`` where the k-th permutation sends row ``i`` to column ``j = perm_k[i]``.
    """
    perms = torch.tensor(list(itertools.permutations(range(n))), device=device)  # [n!, n]
    return torch.nn.functional.one_hot(perms, n).to(dtype)


def num_permutation_logits(n: int) -> int:
    """Width of the projection under ``constraint="permutations"``: n (pre) + n (post) + n! (res)."""
    return 2 * n + math.factorial(n)


def identity_logit(n: int, diagonal: float) -> float:
    """The logit ``c`` on the identity permutation (0 on the others) for which ``H_res``'s diagonal is ``diagonal``.

    With ``E = e^c`` the diagonal is ``(E + (n-1)! - 1) / (E + n! - 1)`` (the identity, plus the other
    ``(n-1)! - 1`` permutations that fix a given index); solved for ``E``. Off the diagonal the entries are
    equal, as after Sinkhorn of ``c'·I``, so both constraints can start from the same ``H_res``.
    """
    total, fixing = math.factorial(n), math.factorial(n - 1)
    lowest = (fixing - 1) / (total - 1)  # the identity's weight at zero (c -> -inf)
    if not lowest < diagonal < 1:
        raise ValueError(f"no logit on the identity gives a diagonal of {diagonal}: at n={n} it must lie strictly "
                         f"between {lowest} (the identity's weight at zero) and 1 (all weight on the identity)")
    return math.log((diagonal * (total - 1) - (fixing - 1)) / (1.0 - diagonal))


def _logits(streams, phi, alpha, bias, n):
    """``(logits, z, gain, v, rms)``; all but ``logits`` are None in static mode."""
    acc = compute_dtype(bias.dtype if streams is None else streams.dtype)
    b = bias.to(acc)
    if streams is None:
        return b, None, None, None, None
    v, rms, z = projection(streams, phi)
    gain_ = gain(alpha.to(acc), n, math.factorial(n))
    return z * gain_ + b, z, gain_, v, rms


def coefficients_permutations_ref(
    streams: Optional[torch.Tensor],
    phi: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    bias: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch mHC-lite coefficients; see the module docstring.

    Args:
        streams: ``[..., n, C]`` (dynamic) or None (static).
        phi: ``[n·C, 2n + n!]`` or None.  alpha: ``[3]`` (pre, post, res) or None.  bias: ``[2n + n!]``.
        n: number of streams (``MHCConfig`` allows at most 6).
    Returns:
        ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` in float32 (float64 for float64 input).
    """
    logits, *_ = _logits(streams, phi, alpha, bias, n)
    weights = torch.softmax(logits[..., 2 * n :], dim=-1)
    perms = permutation_matrices(n, logits.dtype, logits.device).flatten(1)  # [n!, n²]
    h_res = (weights @ perms).unflatten(-1, (n, n))
    return torch.sigmoid(logits[..., :n]), 2.0 * torch.sigmoid(logits[..., n : 2 * n]), h_res


def coefficients_permutations_backward_ref(grad_pre, grad_post, grad_res, streams, phi, alpha, bias, n):
    """Exact gradients ``(d_streams, d_phi, d_alpha, d_bias)`` of :func:`coefficients_permutations_ref`.

    ``g`` is the gradient of the logits: ``g_pre = dH_pre·s(1-s)``, ``g_post = dH_post·2s(1-s)``, and for the
    softmax weights ``dw_k = <dH_res, P_k>``, ``g_res = w ⊙ (dw - <w, dw>)``. From there as for Sinkhorn's
    coefficients: ``dz = g·gain``, ``d_gain = g·z``, ``du = dz / r``, ``dr = -sum(dz·z) / r``,
    ``d_phi = vᵀ du``, ``dv = du phiᵀ + dr·v / (D·r)``; static mode has only ``d_bias``.
    """
    logits, z, gain_, v, rms = _logits(streams, phi, alpha, bias, n)
    weights = torch.softmax(logits[..., 2 * n :], dim=-1)
    perms = permutation_matrices(n, logits.dtype, logits.device).flatten(1)
    d_weights = grad_res.to(logits.dtype).flatten(-2) @ perms.T
    g_res = weights * (d_weights - (weights * d_weights).sum(dim=-1, keepdim=True))
    g = torch.cat([gate_gradients(grad_pre, grad_post, logits, n), g_res], dim=-1)
    dz, d_gain = (None, None) if streams is None else (g * gain_, g * z)
    return projection_grads(g, dz, d_gain, v, rms, z, streams, phi, alpha, bias, n)


@torch.library.custom_op("mhc::coefficients_permutations", mutates_args=())
def coefficients_permutations(
    streams: Optional[torch.Tensor],
    phi: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    bias: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(H_pre, H_post, H_res)`` of one site under mHC-lite; see :func:`coefficients_permutations_ref`."""
    outs = coefficients_permutations_ref(streams, phi, alpha, bias, n)
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in outs)


@coefficients_permutations.register_fake
def _(streams, phi, alpha, bias, n):
    acc = compute_dtype(bias.dtype if streams is None else streams.dtype)
    lead = () if streams is None else tuple(streams.shape[:-2])
    return tuple(bias.new_empty(shape, dtype=acc) for shape in ((*lead, n), (*lead, n), (*lead, n, n)))


@torch.library.custom_op("mhc::coefficients_permutations_backward", mutates_args=())
def coefficients_permutations_backward(
    grad_pre: torch.Tensor,
    grad_post: torch.Tensor,
    grad_res: torch.Tensor,
    streams: Optional[torch.Tensor],
    phi: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    bias: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`coefficients_permutations`; absent inputs get empty gradients."""
    grads = coefficients_permutations_backward_ref(grad_pre, grad_post, grad_res, streams, phi, alpha, bias, n)
    return empty_for_absent(grads, bias)


@coefficients_permutations_backward.register_fake
def _(grad_pre, grad_post, grad_res, streams, phi, alpha, bias, n):
    return fake_grads(streams, phi, alpha, bias)


def _setup_context(ctx, inputs, output):
    streams, phi, alpha, bias, n = inputs
    save_optional(ctx, streams, phi, alpha, bias)
    ctx.n = n


def _backward(ctx, grad_pre, grad_post, grad_res):
    grads = torch.ops.mhc.coefficients_permutations_backward(grad_pre, grad_post, grad_res, *saved_optional(ctx), ctx.n)
    return *present_grads(ctx, grads), None


coefficients_permutations.register_autograd(_backward, setup_context=_setup_context)
