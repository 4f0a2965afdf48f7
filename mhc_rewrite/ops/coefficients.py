"""The mHC mappings H_pre, H_post, H_res of one site, as ``torch.ops.mhc.coefficients``.

Dynamic (per token, the paper's Eq. 7-9), with ``m = n² + 2n`` and ``phi = [phi_pre | phi_post | phi_res]``:

    v = vec(X)                                  # [..., n·C], float32
    z = (v @ phi) / rms(v)                      # [..., m]; the divide comes after the matmul (§4.3)
    logits = [a_pre·z_pre, a_post·z_post, a_res·z_res] + bias
    mode "mhc":  H_pre = sigmoid,  H_post = 2·sigmoid,  H_res = SinkhornKnopp(mat(logits_res))
    mode "hc":   H = bias + a·tanh(z)          # unconstrained hyper-connections, for comparison

``rms(v) = sqrt(mean(v²) + eps)`` is computed without overflow (:func:`rms`), so streams of any finite size give
their true coefficients, not the bias alone.

Static (``streams``, ``phi`` and ``alpha`` are None): the same gates applied to ``bias`` alone, giving
``[n]``, ``[n]``, ``[n, n]`` shared by every token.

All of it runs in float32 (float64 for float64 inputs). The op also returns the projection ``z`` and ``rms(v)``
(not differentiable; graphs use only the three mappings) so that the backward (derived in
:func:`coefficients_backward_ref`) does not recompute ``v @ phi``; it recomputes the Sinkhorn iterations.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..constants import RMS_EPS
from .sinkhorn import compute_dtype, sinkhorn_backward, sinkhorn_forward, sinkhorn_knopp_ref

MODES = ("mhc", "hc")


def gain(alpha: torch.Tensor, n: int, res_width: int) -> torch.Tensor:
    """``[a_pre]*n + [a_post]*n + [a_res]*res_width`` (``n²`` logits for Sinkhorn, ``n!`` for mHC-lite), built with
    static sizes (tracing-friendly)."""
    return torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(res_width)])


def gate_gradients(grad_pre: torch.Tensor, grad_post: torch.Tensor, logits: torch.Tensor, n: int) -> torch.Tensor:
    """The gradient of the gate logits ``[..., 2n]``: ``dH_pre·s(1-s)`` and ``dH_post·2s(1-s)``, ``s`` their sigmoid
    (``H_pre = s``, ``H_post = 2s``), in the dtype of ``logits``."""
    sig = torch.sigmoid(logits[..., : 2 * n])
    scale = torch.tensor([1.0] * n + [2.0] * n, dtype=logits.dtype, device=sig.device)
    return torch.cat([grad_pre.to(logits.dtype), grad_post.to(logits.dtype)], dim=-1) * sig * (1 - sig) * scale


def projection_grads(g, dz, d_gain, v, r, z, streams, phi, alpha, bias, n):
    """``(d_streams, d_phi, d_alpha, d_bias)`` from ``g``, the gradient of the logits ``z·gain + bias``, and ``dz``,
    ``d_gain``, its parts through ``z`` and the gain; static mode (``streams`` None) has only ``d_bias``."""
    d_bias = g.sum_to_size(bias.shape).to(bias.dtype)
    if streams is None:
        return None, None, None, d_bias
    res_width = d_gain.shape[-1] - 2 * n
    d_alpha = torch.stack([part.sum() for part in d_gain.split([n, n, res_width], dim=-1)]).to(alpha.dtype)
    dv, d_phi = projection_backward(v, r, z, dz, phi)
    return dv.reshape(streams.shape).to(streams.dtype), d_phi.to(phi.dtype), d_alpha, d_bias


# The ops take optional streams, phi, alpha (None for a static site); autograd saves what is there and gives None
# gradients for what is not, and the backward ops return empty tensors for the absent ones (an op returns tensors).


def save_optional(ctx, streams, phi, alpha, bias, *extra) -> None:
    ctx.save_for_backward(*(t if t is not None else bias.new_empty(0) for t in (streams, phi, alpha, bias)), *extra)
    ctx.present = tuple(t is not None for t in (streams, phi, alpha))


def saved_optional(ctx) -> tuple:
    """``(streams, phi, alpha, bias, *extra)`` as :func:`save_optional` saved them, absent ones None."""
    saved = ctx.saved_tensors
    return (*(t if keep else None for t, keep in zip(saved[:3], ctx.present)), *saved[3:])


def present_grads(ctx, grads) -> tuple:
    """The gradients of ``(streams, phi, alpha, bias)``, None for the inputs that were absent."""
    return (*(g if keep else None for g, keep in zip(grads[:3], ctx.present)), grads[3])


def empty_for_absent(grads, bias: torch.Tensor) -> tuple:
    return tuple(bias.new_empty(0) if g is None else g for g in grads)


def fake_grads(streams, phi, alpha, bias) -> tuple:
    return tuple(bias.new_empty(0) if t is None else torch.empty_like(t) for t in (streams, phi, alpha, bias))


def num_logits(n: int) -> int:
    """Width of the fused projection: n (pre) + n (post) + n² (res)."""
    return n * n + 2 * n


def rms(v: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """``sqrt(mean(v²) + eps)`` over the last axis, ``[..., D]`` -> ``[..., 1]``, without overflow; traceable.

    Squaring float32 values above ~1.8e19 overflows to inf. Each row is divided by its largest magnitude ``s``
    first (when that exceeds 1, so that ordinary rows compute the plain formula), as robust norm implementations
    do: ``rms = s · sqrt(mean((v/s)²) + eps/s²)``. No data-dependent branch: graphs (export, Dynamo, fake tensors)
    can trace it. The ops' eager implementations use :func:`_rms_eager`, the same value in fewer passes.

    Args:
        v: ``[..., D]`` float tensor.
        eps: added to the mean square.
    Returns:
        ``[..., 1]``, in ``v``'s dtype.
    """
    scale = torch.linalg.vector_norm(v, ord=float("inf"), dim=-1, keepdim=True).clamp_min(1.0)
    mean_sq = torch.linalg.vector_norm(v / scale, dim=-1, keepdim=True).square() / v.shape[-1]
    return scale * torch.sqrt(mean_sq + eps / scale.square())


def _rms_eager(v: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """:func:`rms` for real tensors inside an op: on the CPU the plain sum of squares (one read of ``v`` instead of
    three), falling back to the scaled form where it overflows; elsewhere the scaled form (checking would wait for
    the device). Not traceable (it branches on the values)."""
    if v.device.type == "cpu":
        mean_sq = torch.linalg.vector_norm(v, dim=-1, keepdim=True).square() / v.shape[-1]
        if bool(torch.isfinite(mean_sq).all()):
            return torch.sqrt(mean_sq + eps)
    return rms(v, eps)


def _vec(streams: torch.Tensor) -> torch.Tensor:
    """``vec(X)``: ``[..., n, C]`` -> ``[..., n·C]`` in the compute dtype."""
    return streams.reshape(*streams.shape[:-2], -1).to(compute_dtype(streams.dtype))


def projection(streams: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v, r, z)`` with ``v = vec(X)`` in the compute dtype, ``r = rms(v)``, ``z = (v @ phi) / r``; for the ops'
    implementations (real tensors: the RMS branches on the values, see :func:`_rms_eager`).

    Args:
        streams: ``[..., n, C]``.  phi: ``[n·C, m]``.
    Returns:
        ``v [..., n·C]``, ``r [..., 1]``, ``z [..., m]``.
    """
    v = _vec(streams)
    r = _rms_eager(v)
    return v, r, (v @ phi.to(v.dtype)) / r


def projection_backward(
    v: torch.Tensor, r: torch.Tensor, z: torch.Tensor, dz: torch.Tensor, phi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dv, d_phi)`` of ``z = (v @ phi) / r``, ``r = sqrt(mean(v²) + eps)`` over ``D`` entries.

    ``du = dz / r``, ``dr = -sum_k dz_k z_k / r``; ``d_phi = vᵀ du``, ``dv = du phiᵀ + dr·v / (D·r)``. ``dv`` is
    built in one buffer: ``dr·v``, divided by ``D·r`` in place (in this order: the factor ``dr / (D·r)`` alone
    underflows float32 for streams of size 1e20), then the matmul added in place.

    Returns:
        ``dv`` shaped like ``v`` in its dtype, ``d_phi [D, m]`` in the compute dtype.
    """
    width = v.shape[-1]
    v2, dz2, r2 = v.reshape(-1, width), dz.reshape(-1, dz.shape[-1]), r.reshape(-1, 1)
    du = dz2 / r2
    dr = (dz2 * z.reshape(dz2.shape)).sum(dim=-1, keepdim=True).div_(-r2)
    d_phi = v2.T @ du
    dv = torch.mul(v2, dr).div_(r2 * width).addmm_(du, phi.to(v.dtype).T)
    return dv.reshape(v.shape), d_phi


def _inputs(streams, phi, alpha, bias, n, z=None, r=None):
    """``(v, rms(v), z, gain, b)``, in the compute dtype; the first four are None in static mode. A projection
    ``z``, ``r`` the forward saved is used as given instead of recomputing ``v @ phi``."""
    acc = compute_dtype(bias.dtype if streams is None else streams.dtype)
    if streams is None:
        return None, None, None, None, bias.to(acc)
    if z is None:
        v, r, z = projection(streams, phi)
    else:
        v = _vec(streams)
    return v, r, z, gain(alpha.to(acc), n, n * n), bias.to(acc)


def _forward(streams, phi, alpha, bias, n, sinkhorn_iters, mode, project: Callable):
    """``(h_pre, h_post, h_res, z, r)``, with ``project`` the Sinkhorn implementation (reference or fast); ``z`` and
    ``r = rms(v)`` are None in static mode."""
    _, r, z, gain, b = _inputs(streams, phi, alpha, bias, n)
    if mode == "mhc":
        logits = b if z is None else z * gain + b
        h_pre = torch.sigmoid(logits[..., :n])
        h_post = 2.0 * torch.sigmoid(logits[..., n : 2 * n])
        h_res = project(logits[..., 2 * n :].unflatten(-1, (n, n)), sinkhorn_iters)
    elif mode == "hc":
        h = b if z is None else torch.tanh(z) * gain + b
        h_pre, h_post, h_res = h[..., :n], h[..., n : 2 * n], h[..., 2 * n :].unflatten(-1, (n, n))
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return h_pre, h_post, h_res, z, r


def coefficients_ref(
    streams: Optional[torch.Tensor],
    phi: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    bias: torch.Tensor,
    n: int,
    sinkhorn_iters: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch mHC coefficients, differentiable by autograd; see the module docstring.

    Args:
        streams: ``[..., n, C]`` (dynamic) or None (static).
        phi: ``[n·C, n²+2n]`` or None.  alpha: ``[3]`` (pre, post, res) or None.  bias: ``[n²+2n]``.
        n: number of streams.  sinkhorn_iters: Sinkhorn rounds.  mode: ``"mhc"`` or ``"hc"``.
    Returns:
        ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` in float32 (float64 for float64 input).
    """
    return _forward(streams, phi, alpha, bias, n, sinkhorn_iters, mode, sinkhorn_knopp_ref)[:3]


def _out_shapes(streams, bias, n):
    if streams is None:
        return (n,), (n,), (n, n), (0,), (0,)
    lead = tuple(streams.shape[:-2])
    return (*lead, n), (*lead, n), (*lead, n, n), (*lead, bias.shape[0]), (*lead, 1)


@torch.library.custom_op("mhc::coefficients", mutates_args=())
def coefficients(
    streams: Optional[torch.Tensor],
    phi: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    bias: torch.Tensor,
    n: int,
    sinkhorn_iters: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(H_pre, H_post, H_res, z, r)`` of one site; see :func:`coefficients_ref`.

    ``z [..., m]`` and ``r = rms(v) [..., 1]`` are the projection, returned for the backward (which would otherwise
    recompute ``v @ phi``, a quarter of the coefficient path's matmul work); graphs use only the first three
    outputs. Static mode returns them empty.
    """
    h_pre, h_post, h_res, z, r = _forward(streams, phi, alpha, bias, n, sinkhorn_iters, mode, sinkhorn_forward)
    outs = [t.clone(memory_format=torch.contiguous_format) for t in (h_pre, h_post, h_res)]  # never alias the bias
    if z is None:
        z, r = bias.new_empty(0, dtype=h_pre.dtype), bias.new_empty(0, dtype=h_pre.dtype)
    return (*outs, z, r)


@coefficients.register_fake
def _(streams, phi, alpha, bias, n, sinkhorn_iters, mode):
    acc = compute_dtype(bias.dtype if streams is None else streams.dtype)
    return tuple(bias.new_empty(shape, dtype=acc) for shape in _out_shapes(streams, bias, n))


def coefficients_backward_ref(
    grad_pre: torch.Tensor,
    grad_post: torch.Tensor,
    grad_res: torch.Tensor,
    streams: Optional[torch.Tensor],
    phi: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    bias: torch.Tensor,
    n: int,
    sinkhorn_iters: int,
    mode: str,
    z: Optional[torch.Tensor] = None,
    r: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Exact gradients ``(d_streams, d_phi, d_alpha, d_bias)`` of :func:`coefficients_ref`, recomputing it (the
    projection ``z``, ``r`` only where not given).

    With ``g`` the gradient of the logits (mhc) or of ``h`` (hc), ``u = v @ phi``, ``z = u / r``,
    ``r = sqrt(mean(v²) + eps)`` over ``D = n·C`` entries:

        mhc: g_pre = dH_pre·s(1-s),  g_post = dH_post·2s(1-s) (s the sigmoid),  g_res = Sinkhorn-backward(dH_res)
             dz = g·gain,            d_gain = g·z
        hc:  g = dH,  t = tanh(z):   dz = g·gain·(1-t²),  d_gain = g·t
        d_bias = sum_tokens g        d_alpha = segment sums of d_gain over (pre, post, res)
        du = dz / r,  dr = -sum_k dz_k z_k / r
        d_phi = v^T du               dv = du @ phi^T + dr · v / (D·r)
    Static mode (no streams) has only ``d_bias``; the others are None.
    """
    acc = compute_dtype(bias.dtype if streams is None else streams.dtype)
    v, r, z, gain_, b = _inputs(streams, phi, alpha, bias, n, z, r)
    dz = d_gain = None
    if mode == "mhc":
        logits = b if z is None else z * gain_ + b
        g_res = sinkhorn_backward(grad_res, logits[..., 2 * n :].unflatten(-1, (n, n)), sinkhorn_iters)
        g = torch.cat([gate_gradients(grad_pre, grad_post, logits, n), g_res.to(acc).flatten(-2)], dim=-1)
        if z is not None:
            dz, d_gain = g * gain_, g * z
    elif mode == "hc":
        g = torch.cat([grad_pre.to(acc), grad_post.to(acc), grad_res.to(acc).flatten(-2)], dim=-1)
        if z is not None:
            t = torch.tanh(z)
            dz, d_gain = g * gain_ * (1 - t * t), g * t
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return projection_grads(g, dz, d_gain, v, r, z, streams, phi, alpha, bias, n)


@torch.library.custom_op("mhc::coefficients_backward", mutates_args=())
def coefficients_backward(
    grad_pre: torch.Tensor,
    grad_post: torch.Tensor,
    grad_res: torch.Tensor,
    streams: Optional[torch.Tensor],
    phi: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    bias: torch.Tensor,
    n: int,
    sinkhorn_iters: int,
    mode: str,
    z: Optional[torch.Tensor] = None,
    r: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`coefficients`; see :func:`coefficients_backward_ref`. ``z``, ``r``: the forward's
    projection outputs (recomputed when None).

    Absent inputs (static mode) get empty gradients, which the autograd wrapper turns into None.
    """
    grads = coefficients_backward_ref(grad_pre, grad_post, grad_res, streams, phi, alpha, bias, n, sinkhorn_iters, mode,
                                      z, r)
    return empty_for_absent(grads, bias)


@coefficients_backward.register_fake
def _(grad_pre, grad_post, grad_res, streams, phi, alpha, bias, n, sinkhorn_iters, mode, z=None, r=None):
    return fake_grads(streams, phi, alpha, bias)


def _setup_context(ctx, inputs, output):
    streams, phi, alpha, bias, n, iters, mode = inputs
    z, r = output[3:]
    ctx.mark_non_differentiable(z, r)
    save_optional(ctx, streams, phi, alpha, bias, z, r)
    ctx.args = (n, iters, mode)


def _backward(ctx, grad_pre, grad_post, grad_res, _grad_z, _grad_r):
    streams, phi, alpha, bias, z, r = saved_optional(ctx)
    projected = (z, r) if streams is not None else (None, None)
    grads = torch.ops.mhc.coefficients_backward(grad_pre, grad_post, grad_res, streams, phi, alpha, bias, *ctx.args,
                                                *projected)
    return *present_grads(ctx, grads), None, None, None


coefficients.register_autograd(_backward, setup_context=_setup_context)
