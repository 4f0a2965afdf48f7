"""The mHC paper's equations written out plainly in float64, as the tests' independent reference.

This file imports nothing from ``mhc_rewrite``: a bug in the library cannot hide in its own reference. Each step
is written as the paper states it (DeepSeek, "mHC: Manifold-Constrained Hyper-Connections", Eq. 7-9 and §4.3),
one operation per line, in the order the paper gives, not in the library's fused order:

    x~      = RMSNorm(vec(X))                    (no learnable weight; eps 1e-6)
    H~_pre  = a_pre  · (x~ phi_pre)  + b_pre     H_pre  = sigmoid(H~_pre)
    H~_post = a_post · (x~ phi_post) + b_post    H_post = 2 · sigmoid(H~_post)
    H~_res  = a_res  · mat(x~ phi_res) + b_res   H_res  = Sinkhorn-Knopp(H~_res)
    Sinkhorn-Knopp: M = exp(H~_res); repeat: divide each column by its sum, then each row by its sum
    branch input  y     = sum_i H_pre[i] X[i]
    stream update X'[i] = sum_j H_res[i, j] X[j] + H_post[i] f(y)
"""

from __future__ import annotations

import itertools

import torch

RMS_EPS = 1e-6  # the paper's RMSNorm epsilon


def rms_norm(v: torch.Tensor) -> torch.Tensor:
    """``v / sqrt(mean(v²) + eps)`` over the last axis, without a weight."""
    return v / torch.sqrt((v * v).mean(dim=-1, keepdim=True) + RMS_EPS)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp, columns then rows, ``iters`` rounds. Differentiable by autograd (the tests' backward).

    ``exp(L - max L)`` instead of ``exp(L)``: the constant factor ``exp(-max L)`` cancels in the first column
    division, and float64 would overflow at logits past ~700.
    """
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)  # every column sums to 1
        m = m / m.sum(dim=-1, keepdim=True)  # every row sums to 1
    return m


def coefficients(X, phi, alpha, bias, n: int, iters: int):
    """``(H_pre [..., n], H_post [..., n], H_res [..., n, n])`` of the dynamic mHC mapping, in float64.

    Args:
        X: streams ``[..., n, C]``.  phi: ``[n·C, n² + 2n]`` laid out ``[pre | post | res]``.
        alpha: ``[3]`` (a_pre, a_post, a_res).  bias: ``[n² + 2n]``, same layout as phi's columns.
    """
    X, phi, alpha, bias = (t.double() for t in (X, phi, alpha, bias))
    x = rms_norm(X.flatten(-2))  # x~ = RMSNorm(vec(X))
    phi_pre, phi_post, phi_res = phi[:, :n], phi[:, n : 2 * n], phi[:, 2 * n :]
    b_pre, b_post, b_res = bias[:n], bias[n : 2 * n], bias[2 * n :]
    pre_logits = alpha[0] * (x @ phi_pre) + b_pre
    post_logits = alpha[1] * (x @ phi_post) + b_post
    res_logits = (alpha[2] * (x @ phi_res) + b_res).unflatten(-1, (n, n))  # row-major: entry (i, j) at i·n + j
    return torch.sigmoid(pre_logits), 2 * torch.sigmoid(post_logits), sinkhorn(res_logits, iters)


def static_coefficients(bias, n: int, iters: int):
    """The static mapping: the same gates on the bias alone, shared by every token."""
    bias = bias.double()
    return (torch.sigmoid(bias[:n]), 2 * torch.sigmoid(bias[n : 2 * n]),
            sinkhorn(bias[2 * n :].view(n, n), iters))


def hc_coefficients(X, phi, alpha, bias, n: int):
    """Unconstrained hyper-connections (the HC paper): ``H = b + a · tanh(x~ phi)`` for every mapping."""
    X, phi, alpha, bias = (t.double() for t in (X, phi, alpha, bias))
    x = rms_norm(X.flatten(-2))
    z = torch.tanh(x @ phi)
    h_pre = bias[:n] + alpha[0] * z[..., :n]
    h_post = bias[n : 2 * n] + alpha[1] * z[..., n : 2 * n]
    h_res = (bias[2 * n :] + alpha[2] * z[..., 2 * n :]).unflatten(-1, (n, n))
    return h_pre, h_post, h_res


def pre_mix(X, h_pre):
    """``y = sum_i H_pre[i] X[i]``, a loop over the streams."""
    return sum(h_pre[..., i, None] * X[..., i, :] for i in range(X.shape[-2]))


def post_res_mix(X, f, h_post, h_res):
    """``X'[i] = sum_j H_res[i, j] X[j] + H_post[i] f``, loops over the streams."""
    n = X.shape[-2]
    rows = [sum(h_res[..., i, j, None] * X[..., j, :] for j in range(n)) + h_post[..., i, None] * f for i in range(n)]
    return torch.stack(rows, dim=-2)


def permutation_mixture(logits: torch.Tensor, n: int) -> torch.Tensor:
    """mHC-lite's ``H_res = sum_k softmax(logits)_k P_k`` over the n! permutation matrices (``itertools`` order, the
    identity first), written out index by index in the logits' dtype; differentiable by autograd."""
    weights = torch.softmax(logits, dim=-1)
    out = torch.zeros(*logits.shape[:-1], n, n, dtype=logits.dtype)
    for k, perm in enumerate(itertools.permutations(range(n))):
        for i, j in enumerate(perm):
            out[..., i, j] = out[..., i, j] + weights[..., k]
    return out
