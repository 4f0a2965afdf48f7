"""The fused mHC ops, ``torch.library.triton_op``s that Inductor sees and schedules on CUDA.

    mhc::fused_pre_mix(X, phi, alpha, bias, n, iters, mode) -> (y, h_pre, h_post, h_res, link)
        = pre_mix(X, coefficients(X, ...)[0]) and the coefficients, in one kernel (dynamic sites)
    mhc::fused_post_res_mix(X, f, h_post, h_res, link=None) -> X'     = post_res_mix, in one kernel

The streams' gradient is written once per site. ``X`` feeds both ops of a site, so autograd would sum two full-width
gradients (the post-mix's ``H_resᵀ·dX'`` and the pre-mix's) in a third pass. Instead the lowering hands the post-mix
the pre-mix's ``link``, a zero-stride stand-in shaped like ``X`` (one element stored, never read): the post-mix's
backward returns its streams' gradient there rather than at ``X``, and the pre-mix's backward kernel adds it to its own
in float32 registers before its one store. At 16384 x 4 x 4096 bf16 that saves two of the three 537 MB passes of the
sum (~0.26 ms at 4.1 TB/s) and one bf16 rounding. A post-mix without a link returns the gradient at ``X`` as usual.
Decision: the hand-over is in the streams' dtype, not an fp32 buffer: with one kernel on each side, an fp32 hand-over
would write and read twice the bytes and cost what the sum did; the accumulation itself is in float32.

Where the Triton kernels run: CUDA tensors, or any tensor under ``TRITON_INTERPRET=1`` (the CPU interpreter, for
tests). Elsewhere the ops compute their pure-PyTorch reference, so a lowered graph runs everywhere.
``passes/lower_fused.py`` puts these ops in place of the reference ones.

Which pre-mix kernel runs: ``MHC_PRE_MIX_KERNEL`` in the environment, read at each call (so at trace time under
torch.compile). ``one_pass`` (the default): ``kernels/fused_pre.py``. ``split``: the split-K projection on tensor cores
plus a tail (``kernels/pre_split.py``, ``pre_split_backward.py``), for widths C >= 16 (narrower sites keep the
one-pass kernel). The one-pass kernel stays the default until the split pair beats it on a GPU in the same run.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from . import coefficients as _coefficients  # noqa: F401  (registers torch.ops.mhc.coefficients*)
from .mixing import post_res_mix_backward_ref, post_res_mix_ref, pre_mix_backward_ref, pre_mix_ref
from .sinkhorn import compute_dtype

try:
    from mhc_rewrite.kernels import fused_pre, post_res, pre_split, pre_split_backward
except ImportError:  # no triton (not Linux): the reference path only
    fused_pre = post_res = pre_split = pre_split_backward = None

PRE_MIX_KERNELS = ("one_pass", "split")


def pre_mix_kernel(channels: int) -> str:
    """The pre-mix kernel for a site of this width: ``MHC_PRE_MIX_KERNEL`` (default ``one_pass``), see above."""
    choice = os.environ.get("MHC_PRE_MIX_KERNEL", "one_pass")
    if choice not in PRE_MIX_KERNELS:
        raise ValueError(f"MHC_PRE_MIX_KERNEL must be one of {PRE_MIX_KERNELS}, got {choice!r}")
    return "split" if choice == "split" and pre_split.supports(channels) else "one_pass"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for this tensor: CUDA (fake CUDA tensors too, so that Inductor captures
    the kernels when it traces the op), or real CPU tensors under the interpreter (``TRITON_INTERPRET=1``)."""
    if fused_pre is None or t.dtype == torch.float64:
        return False
    return t.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and not is_fake(t))


# --- fused coefficients + pre-mix -------------------------------------------------------------------


def stream_link(streams: torch.Tensor) -> torch.Tensor:
    """The pre-mix's ``link`` output: shaped like ``streams``, zero strides, one stored element (see above)."""
    return streams.new_zeros(()).expand(streams.shape)


@triton_op("mhc::fused_pre_mix", mutates_args=())
def fused_pre_mix(
    streams: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, n: int, sinkhorn_iters: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pre_mix(X, h_pre), h_pre, h_post, h_res, link)`` with ``(h_pre, h_post, h_res) = coefficients(X, ...)``
    and ``link`` the stand-in through which the site's post-mix hands back the streams' gradient."""
    if use_triton(streams):
        if pre_mix_kernel(streams.shape[-1]) == "split":
            out = pre_split.pre_mix_split_fwd(streams, phi.float().contiguous(), alpha, bias, n, sinkhorn_iters, mode)
        else:
            out = fused_pre.fused_pre_mix_fwd(streams, phi.float().contiguous(), alpha, bias, None, n, sinkhorn_iters,
                                              mode)
        return (*out, stream_link(streams))
    # elsewhere: the opaque reference ops, so that Inductor, which traces into a triton_op, calls them instead of
    # compiling twenty unrolled Sinkhorn rounds per site (forward and backward)
    h_pre, h_post, h_res, *_ = torch.ops.mhc.coefficients(streams, phi, alpha, bias, n, sinkhorn_iters, mode)
    return pre_mix_ref(streams, h_pre), h_pre, h_post, h_res, stream_link(streams)


def _pre_backward_ref(streams, phi, alpha, bias, h_pre, d_y, d_h_pre, d_h_post, d_h_res, n, iters, mode, grad_acc):
    d_x_mix, d_h_pre_mix = pre_mix_backward_ref(streams, h_pre, d_y)
    d_x, d_phi, d_alpha, d_bias = torch.ops.mhc.coefficients_backward(d_h_pre + d_h_pre_mix, d_h_post, d_h_res,
                                                                      streams, phi, alpha, bias, n, iters, mode)
    acc = compute_dtype(streams.dtype)
    d_x = d_x.to(acc) + d_x_mix
    if grad_acc is not None:
        d_x = d_x + grad_acc.to(acc)
    return d_x.to(streams.dtype), d_phi, d_alpha, d_bias


@triton_op("mhc::fused_pre_mix_backward", mutates_args=())
def fused_pre_mix_backward(
    streams: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, h_pre: torch.Tensor,
    d_y: torch.Tensor, d_h_pre: torch.Tensor, d_h_post: torch.Tensor, d_h_res: torch.Tensor, n: int,
    sinkhorn_iters: int, mode: str, grad_acc: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d_streams, d_phi, d_alpha, d_bias)`` of :func:`fused_pre_mix`; ``grad_acc`` (the gradient that
    reached ``link``, may be None) is added to ``d_streams``."""
    args = (streams, phi, alpha, bias, h_pre, d_y, d_h_pre, d_h_post, d_h_res, n, sinkhorn_iters, mode)
    if use_triton(streams):
        if pre_mix_kernel(streams.shape[-1]) == "split":
            split_args = (streams, phi.float().contiguous(), *args[2:])
            d_x, d_phi, d_alpha, d_bias = pre_split_backward.pre_mix_split_bwd(*split_args, grad_acc=grad_acc)
        else:
            d_x, d_phi, d_alpha, d_bias = fused_pre.fused_pre_mix_bwd(*args, grad_acc=grad_acc)
        return d_x, d_phi.to(phi.dtype), d_alpha, d_bias
    return _pre_backward_ref(*args, grad_acc)


def _pre_setup(ctx, inputs, output):
    streams, phi, alpha, bias, n, iters, mode = inputs
    ctx.save_for_backward(streams, phi, alpha, bias, output[1])
    ctx.args = (n, iters, mode)


def _pre_backward(ctx, d_y, d_h_pre, d_h_post, d_h_res, d_link):
    streams, phi, alpha, bias, h_pre = ctx.saved_tensors
    d_h_pre = torch.zeros_like(h_pre) if d_h_pre is None else d_h_pre
    d_h_post = torch.zeros_like(h_pre) if d_h_post is None else d_h_post
    d_h_res = h_pre.new_zeros((*h_pre.shape, h_pre.shape[-1])) if d_h_res is None else d_h_res
    grads = torch.ops.mhc.fused_pre_mix_backward(streams, phi, alpha, bias, h_pre, d_y, d_h_pre, d_h_post, d_h_res,
                                                 *ctx.args, d_link)
    return (*grads, None, None, None)


fused_pre_mix.register_autograd(_pre_backward, setup_context=_pre_setup)


# --- fused post + residual mix ------------------------------------------------------------------------


@triton_op("mhc::fused_post_res_mix", mutates_args=())
def fused_post_res_mix(
    streams: torch.Tensor, branch: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor,
    link: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``H_res · X + H_post^T · f`` in one read of ``X`` and ``f``; see ``ops/mixing.py``. ``link`` (not read): the
    ``fused_pre_mix`` output of the same site's pre-mix, which then receives the streams' gradient (see above)."""
    if use_triton(streams):
        return post_res.post_res_mix_fwd(streams, branch, h_post, h_res)
    return post_res_mix_ref(streams, branch, h_post, h_res)


@triton_op("mhc::fused_post_res_mix_backward", mutates_args=())
def fused_post_res_mix_backward(
    streams: torch.Tensor, branch: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d_streams, d_branch, d_h_post, d_h_res)`` of :func:`fused_post_res_mix`."""
    if use_triton(streams):
        return post_res.post_res_mix_bwd(streams, branch, h_post, h_res, grad)
    return post_res_mix_backward_ref(streams, branch, h_post, h_res, grad)


def _post_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.linked = inputs[4] is not None


def _post_backward(ctx, grad):
    d_streams, *rest = torch.ops.mhc.fused_post_res_mix_backward(*ctx.saved_tensors, grad)
    if ctx.linked:  # to the pre-mix's backward, which adds it to its own before writing the streams' gradient once
        return None, *rest, d_streams
    return d_streams, *rest, None


fused_post_res_mix.register_autograd(_post_backward, setup_context=_post_setup)
