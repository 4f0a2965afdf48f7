"""The stream ops of an mHC chain: expand, pre-mix, post+residual mix, reduce.

Layout: a stream tensor ``X`` is ``[..., n, C]``: the residual ``x [..., C]`` with a stream axis inserted
before the channels (DeepSeek-V4's ``[B, S, n, D]``). Coefficients are float32 (float64 for float64 streams);
``h_pre``/``h_post`` are ``[..., n]`` (per token) or ``[n]`` (static), ``h_res`` is ``[..., n, n]`` or ``[n, n]``.

    expand_streams(x, n)             X[..., i, :] = x                       (copy into every stream)
    pre_mix(X, h_pre)                y = sum_i h_pre[i] X[i]                (the branch input)
    post_res_mix(X, f, h_post, h_res) X'[i] = sum_j h_res[i, j] X[j] + h_post[i] f
    reduce_streams(X)                x = mean_i X[i]                         (where the stream leaves)

Each is a ``torch.ops.mhc`` op with a reference implementation (this file), a fake kernel and autograd.
Mixing accumulates in the coefficients' dtype and returns the stream's dtype.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .sinkhorn import compute_dtype


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a per-token gradient down to the (possibly static) coefficient's shape and dtype."""
    return grad.sum_to_size(like.shape).to(like.dtype)


def _per_token(h_res: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """A static ``[n, n]`` mapping expanded (a view) to ``[..., n, n]``, one per token of ``streams [..., n, C]``.

    ``matmul`` would otherwise fold the tokens into the rows of one ``[tokens·C, n] @ [n, n]`` product, with two
    transposing copies of the streams around a matrix too thin for a BLAS: 4x slower on the CPU than the
    per-token batched product (measured inside a converted GPT, 6 x 128).
    """
    return h_res.expand(*streams.shape[:-1], h_res.shape[-1]) if h_res.dim() == 2 else h_res


# --- expand / reduce -------------------------------------------------------------------------------


@torch.library.custom_op("mhc::expand_streams", mutates_args=())
def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x [..., C]`` -> ``[..., n, C]``, a copy of ``x`` in every stream."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).clone()


@expand_streams.register_fake
def _(x, n):
    return x.new_empty((*x.shape[:-1], n, x.shape[-1]))


expand_streams.register_autograd(
    lambda ctx, grad: (grad.sum(dim=-2), None),
    setup_context=lambda ctx, inputs, output: None,
)


@torch.library.custom_op("mhc::reduce_streams", mutates_args=())
def reduce_streams(streams: torch.Tensor) -> torch.Tensor:
    """``[..., n, C]`` -> ``[..., C]``, the mean of the streams."""
    return streams.mean(dim=-2)


@reduce_streams.register_fake
def _(streams):
    return streams.new_empty((*streams.shape[:-2], streams.shape[-1]))


def _reduce_setup(ctx, inputs, output):
    ctx.n = inputs[0].shape[-2]


def _reduce_backward(ctx, grad):
    return (grad / ctx.n).unsqueeze(-2).expand(*grad.shape[:-1], ctx.n, grad.shape[-1]).contiguous()


reduce_streams.register_autograd(_reduce_backward, setup_context=_reduce_setup)


# --- pre-mix ---------------------------------------------------------------------------------------


def pre_mix_ref(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ``y[..., c] = sum_i h_pre[..., i] * X[..., i, c]``."""
    acc = compute_dtype(streams.dtype)
    return torch.einsum("...i,...ic->...c", h_pre.to(acc), streams.to(acc)).to(streams.dtype)


@torch.library.custom_op("mhc::pre_mix", mutates_args=())
def pre_mix(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """The block input ``H_pre · X``: ``[..., n, C]``, ``[..., n]`` -> ``[..., C]``."""
    return pre_mix_ref(streams, h_pre)


@pre_mix.register_fake
def _(streams, h_pre):
    return streams.new_empty((*streams.shape[:-2], streams.shape[-1]))


def _pre_mix_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def pre_mix_backward_ref(
    streams: torch.Tensor, h_pre: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`pre_mix_ref`: ``(d_streams, d_h_pre)``, both in the compute dtype, ``d_h_pre`` per token.

    ``dX[..., i, c] = h[..., i] g[..., c]``;   ``dh[..., i] = sum_c g[..., c] X[..., i, c]``.
    """
    acc = compute_dtype(streams.dtype)
    g = grad.to(acc)
    return h_pre.to(acc).unsqueeze(-1) * g.unsqueeze(-2), torch.einsum("...c,...ic->...i", g, streams.to(acc))


def _pre_mix_backward(ctx, grad):
    streams, h_pre = ctx.saved_tensors
    d_streams, d_h = pre_mix_backward_ref(streams, h_pre, grad)
    return d_streams.to(streams.dtype), _reduce_to(d_h, h_pre)


pre_mix.register_autograd(_pre_mix_backward, setup_context=_pre_mix_setup)


# --- post + residual mix ---------------------------------------------------------------------------


def post_res_mix_ref(
    streams: torch.Tensor, branch: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """Pure-PyTorch ``X'[..., i, c] = sum_j h_res[..., i, j] X[..., j, c] + h_post[..., i] f[..., c]``."""
    acc = compute_dtype(streams.dtype)
    out = torch.matmul(_per_token(h_res.to(acc), streams), streams.to(acc))
    if is_fake(out):  # addcmul's meta fails on symbolic sizes (torch 2.13: a lowered graph's fake pass logged it)
        return (out + h_post.to(acc).unsqueeze(-1) * branch.to(acc).unsqueeze(-2)).to(streams.dtype)
    out.addcmul_(h_post.to(acc).unsqueeze(-1), branch.to(acc).unsqueeze(-2))  # in place: no second [.., n, C]
    return out.to(streams.dtype)


@torch.library.custom_op("mhc::post_res_mix", mutates_args=())
def post_res_mix(
    streams: torch.Tensor, branch: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """``H_res · X + H_post^T · f``: ``[..., n, C]``, ``[..., C]``, ``[..., n]``, ``[..., n, n]`` -> ``[..., n, C]``."""
    return post_res_mix_ref(streams, branch, h_post, h_res)


@post_res_mix.register_fake
def _(streams, branch, h_post, h_res):
    return torch.empty_like(streams)


def _post_res_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def post_res_mix_backward_ref(
    streams: torch.Tensor, branch: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d_streams, d_branch, d_h_post, d_h_res)`` of :func:`post_res_mix_ref`, shaped like the inputs.

    ``dX[j, c] = sum_i h_res[i, j] dY[i, c]``       ``df[c] = sum_i h_post[i] dY[i, c]``
    ``dh_res[i, j] = sum_c dY[i, c] X[j, c]``       ``dh_post[i] = sum_c dY[i, c] f[c]``
    (static coefficients: summed over the tokens).
    """
    acc = compute_dtype(streams.dtype)
    g, x, f = grad.to(acc), streams.to(acc), branch.to(acc)
    d_streams = torch.matmul(_per_token(h_res.to(acc), streams).transpose(-1, -2), g).to(streams.dtype)
    # the two sums below as a broadcast product and a sum: on the CPU 13 % faster than einsum's batched [n x C]
    # matmuls (too small for a BLAS), measured side by side inside a converted GPT; in the pre-mix einsum was faster
    d_branch = (g * h_post.to(acc).unsqueeze(-1)).sum(dim=-2).to(branch.dtype)
    d_h_res = torch.matmul(g, x.transpose(-1, -2))
    d_h_post = (g * f.unsqueeze(-2)).sum(dim=-1)
    return d_streams, d_branch, _reduce_to(d_h_post, h_post), _reduce_to(d_h_res, h_res)


def _post_res_backward(ctx, grad):
    return post_res_mix_backward_ref(*ctx.saved_tensors, grad)


post_res_mix.register_autograd(_post_res_backward, setup_context=_post_res_setup)
