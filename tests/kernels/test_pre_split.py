"""The split pre-mix (kernels/pre_split.py + pre_split_backward.py) against the paper's equations in float64
(tests/paper.py), every output and every gradient, under TRITON_INTERPRET=1 (or compiled on a GPU: tests/devices.py).

The blocks are made tiny so that a few tokens already give several K splits (partials summed in the tail), several M
splits (d_phi partials), partial blocks and K tiles that straddle two streams. Tolerances: tests/tolerances.py.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401

import paper
from devices import on_device
from tolerances import assert_close, rel_err, tolerance

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")
from mhc_rewrite.kernels.pre_split import pre_mix_split_fwd, split_k_of  # noqa: E402
from mhc_rewrite.kernels.pre_split_backward import pre_mix_split_bwd, split_m_of  # noqa: E402

# (leading dims, n, C): C=40 a partial channel block and K tiles across two streams, n=3 the padding of n
SHAPES = [((2, 9), 4, 40), ((20,), 2, 16), ((17,), 8, 16), ((3, 5), 3, 24)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# tiny blocks: 16 tokens x 16 of K per step, ~8 programs per grid, so every test shape splits K and M
BLOCKS = dict(project_blocks=dict(block_m=16, block_k=16, programs=8, num_warps=4),
              tail_blocks=dict(block_t=16, block_c=16, num_warps=4))
DX = dict(dx_blocks=dict(block_m=8, block_k=16, programs=8, split_m=2, num_warps=4))


def _inputs(lead, n, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    streams = torch.randn(*lead, n, C, generator=g).to(dtype)
    phi = torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C) ** 0.5
    alpha = 0.5 * torch.randn(3, generator=g)
    bias = torch.randn(n * n + 2 * n, generator=g)
    return streams, phi, alpha, bias


def _reference(inputs, n, mode):
    """Float64 outputs ``(y, h_pre, h_post, h_res)`` of the paper's equations and the float64 inputs."""
    ref_in = [t.double().requires_grad_() for t in inputs]
    if mode == "mhc":
        h = paper.coefficients(*ref_in, n, 20)
    else:
        h = paper.hc_coefficients(*ref_in, n)
    return (paper.pre_mix(ref_in[0], h[0]), *h), ref_in


def _upstream(ref_out, dtype, seed=1):
    """Random gradients of ``(y, h_pre, h_post, h_res)`` (randn: a ones gradient would hide index errors)."""
    g = torch.Generator().manual_seed(seed)
    d_y = torch.randn(ref_out[0].shape, generator=g).to(dtype)
    return (d_y, *(torch.randn(r.shape, generator=g) for r in ref_out[1:]))


def test_the_tiny_blocks_split_k_and_m():
    """The test shapes do exercise the partial sums (else the tests below would not test them)."""
    for lead, n, C in SHAPES:
        T = torch.Size(lead).numel()
        assert split_k_of(T, n * C, C, BLOCKS["project_blocks"])[0] > 1
        assert split_m_of(T, n * C, DX["dx_blocks"])[0] > 1


@pytest.mark.parametrize("lead,n,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_split_pre_mix_forward_and_backward(lead, n, C, dtype, mode):
    inputs = _inputs(lead, n, C, dtype)
    y, h_pre, h_post, h_res = on_device(pre_mix_split_fwd, *inputs, n, 20, mode, **BLOCKS)
    ref_out, ref_in = _reference(inputs, n, mode)
    assert y.dtype == dtype and h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    assert_close(y, ref_out[0], "streams", dtype, msg="y")
    for name, got, want in zip(("h_pre", "h_post", "h_res"), (h_pre, h_post, h_res), ref_out[1:]):
        assert_close(got, want, "coefficients", msg=name)

    d_y, d_pre, d_post, d_res = _upstream(ref_out, dtype)
    want = torch.autograd.grad(ref_out, ref_in, (d_y.double(), d_pre.double(), d_post.double(), d_res.double()))
    got = on_device(pre_mix_split_bwd, *inputs, h_pre, d_y, d_pre, d_post, d_res, n, 20, mode, **BLOCKS, **DX)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_close(got[0], want[0], "streams", dtype, msg="d_streams")
    for name, gt, wt in zip(("d_phi", "d_alpha", "d_bias"), got[1:], want[1:]):
        assert_close(gt, wt, "coefficient_grads", msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tf32_split_products_keep_float32_accuracy(dtype):
    """With the tensor core's TF32 truncation emulated, the default "split" products pass the float32 tolerances
    (forward and backward); a single TF32 product per dot does not (why "split" is the default)."""
    n, lead, C = 4, (2, 9), 40
    inputs = _inputs(lead, n, C, dtype)
    ref_out, ref_in = _reference(inputs, n, "mhc")
    d_y, d_pre, d_post, d_res = _upstream(ref_out, dtype)
    want = torch.autograd.grad(ref_out, ref_in, (d_y.double(), d_pre.double(), d_post.double(), d_res.double()))
    errors = {}
    for precision in ("split", "tf32"):
        opts = dict(precision=precision, emulate_tf32=True, **BLOCKS)
        y, h_pre, h_post, h_res = on_device(pre_mix_split_fwd, *inputs, n, 20, "mhc", **opts)
        got = on_device(pre_mix_split_bwd, *inputs, h_pre, d_y, d_pre, d_post, d_res, n, 20, "mhc", **opts, **DX)
        errors[precision] = (max(rel_err(a, b) for a, b in zip((h_pre, h_post, h_res), ref_out[1:])),
                             max(rel_err(a, b) for a, b in zip(got[1:], want[1:])))
        if precision == "split":
            assert_close(y, ref_out[0], "streams", dtype, msg="y")
            assert_close(got[0], want[0], "streams", dtype, msg="d_streams")
    assert errors["split"][0] <= tolerance("coefficients"), errors
    assert errors["split"][1] <= tolerance("coefficient_grads"), errors
    # one TF32 rounding of phi (2^-11 per product) fails both limits (measured 9e-5 and 9e-4 at bf16): the
    # emulation does truncate, and "split" is what keeps the coefficients float32-accurate
    assert errors["tf32"][0] > tolerance("coefficients") and errors["tf32"][1] > tolerance("coefficient_grads"), errors


def test_gradient_accumulated_in_the_dx_kernel():
    """``grad_acc`` (a float32 stream gradient from elsewhere) is added in float32 before the one bf16 store."""
    n, lead, C, dtype = 4, (2, 9), 40, torch.bfloat16
    inputs = _inputs(lead, n, C, dtype)
    ref_out, ref_in = _reference(inputs, n, "mhc")
    _, h_pre, _, _ = on_device(pre_mix_split_fwd, *inputs, n, 20, "mhc", **BLOCKS)
    d_y, d_pre, d_post, d_res = _upstream(ref_out, dtype)
    acc = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3))
    (want,) = torch.autograd.grad(ref_out, ref_in[:1], (d_y.double(), d_pre.double(), d_post.double(),
                                                        d_res.double()))
    got = on_device(pre_mix_split_bwd, *inputs, h_pre, d_y, d_pre, d_post, d_res, n, 20, "mhc", grad_acc=acc,
                    **BLOCKS, **DX)[0]
    assert got.dtype == dtype
    assert_close(got, want + acc.double(), "streams", dtype)


def test_separate_dx_and_dphi_kernels_give_the_same_bits():
    n, lead, C = 4, (2, 9), 40
    inputs = _inputs(lead, n, C, torch.float32)
    _, h_pre, h_post, h_res = on_device(pre_mix_split_fwd, *inputs, n, 20, "mhc", **BLOCKS)
    d_y, d_pre, d_post, d_res = _upstream((inputs[0][..., 0, :], h_pre, h_post, h_res), torch.float32)
    args = (*inputs, h_pre, d_y, d_pre, d_post, d_res, n, 20, "mhc")
    fused = on_device(pre_mix_split_bwd, *args, **BLOCKS, **DX)
    apart = on_device(pre_mix_split_bwd, *args, fuse_dx_dphi=False, **BLOCKS, **DX)
    for a, b in zip(fused, apart):
        assert torch.equal(a, b)


def test_streams_at_1e20_in_one_split_match_float64():
    """The RMS's (scale, sumsq) partials of splits at very different magnitudes merge without overflow: one stream
    at 1e20, the others at 1."""
    n, C = 4, 16
    streams, phi, alpha, bias = _inputs((24,), n, C, torch.float32, seed=5)
    streams[:, 2] *= 1e20
    _, h_pre, h_post, h_res = on_device(pre_mix_split_fwd, streams, phi, alpha, bias, n, 20, "mhc", **BLOCKS)
    ref_out, _ = _reference((streams, phi, alpha, bias), n, "mhc")
    for got, want in zip((h_pre, h_post, h_res), ref_out[1:]):
        assert_close(got, want.detach(), "coefficients")


def test_identity_init_is_exact_through_the_split_kernels():
    """Function preservation: equal streams read with weights summing to 1 give back the stream."""
    n, C = 4, 32
    params = mhc_rewrite.MHCSiteParams(mhc_rewrite.MHCConfig(n=n), C, site_index=1)
    x = torch.randn(6, C)
    streams = x.unsqueeze(-2).expand(6, n, C).contiguous()
    y, _, _, h_res = on_device(pre_mix_split_fwd, streams, params.phi.detach(), params.alpha.detach(),
                               params.bias.detach(), n, 20, "mhc", **BLOCKS)
    assert_close(y, x, "few_roundings")
    assert_close(h_res.sum(-1), torch.ones(6, n), "few_roundings")


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_op_runs_the_split_kernels_when_asked(monkeypatch, mode):
    """``MHC_PRE_MIX_KERNEL=split``: mhc::fused_pre_mix (forward and autograd) against the reference ops."""
    from mhc_rewrite.ops import fused

    monkeypatch.setenv("MHC_PRE_MIX_KERNEL", "split")
    assert fused.pre_mix_kernel(24) == "split" and fused.pre_mix_kernel(8) == "one_pass"
    inputs = _inputs((2, 5), 4, 24, torch.float32)
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out = torch.ops.mhc.fused_pre_mix(*a, 4, 20, mode)[:4]
    r_pre, r_post, r_res = torch.ops.mhc.coefficients(*b, 4, 20, mode)[:3]
    ref = (torch.ops.mhc.pre_mix(b[0], r_pre), r_pre, r_post, r_res)
    for got, want in zip(out, ref):
        assert_close(got, want, "same_math")
    weights = [torch.randn_like(t) for t in out]
    grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), a)
    wants = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), b)
    for got, want in zip(grads, wants):
        assert_close(got, want, "same_math")
    monkeypatch.setenv("MHC_PRE_MIX_KERNEL", "fastest")
    with pytest.raises(ValueError, match="MHC_PRE_MIX_KERNEL"):
        fused.pre_mix_kernel(24)
