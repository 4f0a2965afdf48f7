"""Every public op (``torch.ops.mhc.*``) as autograd and tracing see it: forward and gradients through the op's
registered autograd against float64 autograd of the paper's equations (tests/paper.py), and each op's fake kernel
against a real run, in float32 and bf16.

The op tests next to this file check the references and the hand-derived backwards directly; this file checks the
glue that only calls through the registered op reach (saved tensors, the backward's arguments, the fake kernels'
shapes and dtypes), with small inputs, so that it stays in the mutation run's fast selection. It names no internal
helper: a refactor of the ops keeps it valid.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401  (registers torch.ops.mhc)

import paper
from tolerances import assert_close

mhc = torch.ops.mhc
N, C, ITERS = 4, 8, 20
M = N * N + 2 * N  # projection width: pre | post | res


def _coefficient_inputs(seed=0, m=M):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, N, C, generator=g), torch.randn(N * C, m, generator=g) / 4,
            torch.tensor([0.7, -0.4, 1.3]), torch.randn(m, generator=g)]


def _mixing_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, N, C, generator=g), torch.randn(2, 3, C, generator=g),
            torch.rand(2, 3, N, generator=g), torch.rand(2, 3, N, N, generator=g)]


def _paper_permutations(X, phi, alpha, bias):
    """mHC-lite: the paper's gates for H_pre and H_post, and H_res a convex mixture of the n! permutations."""
    x = paper.rms_norm(X.flatten(-2))
    z_pre, z_post, z_res = x @ phi[:, :N], x @ phi[:, N:2 * N], x @ phi[:, 2 * N:]
    return (torch.sigmoid(alpha[0] * z_pre + bias[:N]), 2 * torch.sigmoid(alpha[1] * z_post + bias[N:2 * N]),
            paper.permutation_mixture(alpha[2] * z_res + bias[2 * N:], N))


def _fused_pre_reference(X, phi, alpha, bias):
    h_pre, h_post, h_res = paper.coefficients(X, phi, alpha, bias, N, ITERS)
    return paper.pre_mix(X, h_pre), h_pre, h_post, h_res


# name -> (the op on float32 inputs, the paper's float64 function, inputs, tolerance kind of outputs and gradients).
# The coefficient op's outputs past H_pre, H_post, H_res are saved for its backward (not differentiable): not compared.
CASES = {
    "sinkhorn_knopp": (lambda L: mhc.sinkhorn_knopp(L, ITERS), lambda L: paper.sinkhorn(L, ITERS),
                       lambda: [torch.randn(2, 3, N, N, generator=torch.Generator().manual_seed(0))],
                       ("few_roundings", "sinkhorn_grad")),
    "coefficients": (lambda *a: mhc.coefficients(*a, N, ITERS, "mhc")[:3],
                     lambda *a: paper.coefficients(*a, N, ITERS), _coefficient_inputs,
                     ("coefficients", "coefficient_grads")),
    "coefficients_hc": (lambda *a: mhc.coefficients(*a, N, ITERS, "hc")[:3],
                        lambda *a: paper.hc_coefficients(*a, N), _coefficient_inputs,
                        ("coefficients", "coefficient_grads")),
    "coefficients_static": (lambda b: mhc.coefficients(None, None, None, b, N, ITERS, "mhc")[:3],
                            lambda b: paper.static_coefficients(b, N, ITERS), lambda: _coefficient_inputs()[3:],
                            ("coefficients", "coefficient_grads")),
    "coefficients_static_hc": (lambda b: mhc.coefficients(None, None, None, b, N, ITERS, "hc")[:3],  # H = b
                               lambda b: (b[:N], b[N:2 * N], b[2 * N:].unflatten(-1, (N, N))),
                               lambda: _coefficient_inputs()[3:], ("coefficients", "coefficient_grads")),
    "coefficients_permutations": (lambda *a: mhc.coefficients_permutations(*a, N), _paper_permutations,
                                  lambda: _coefficient_inputs(m=2 * N + 24), ("coefficients", "coefficient_grads")),
    "fused_pre_mix": (lambda *a: mhc.fused_pre_mix(*a, N, ITERS, "mhc")[:4], _fused_pre_reference,
                      _coefficient_inputs, ("coefficients", "coefficient_grads")),
    "pre_mix": (mhc.pre_mix, paper.pre_mix, lambda: [_mixing_inputs()[0], _mixing_inputs()[2]],
                ("streams", "streams")),
    "post_res_mix": (mhc.post_res_mix, paper.post_res_mix, _mixing_inputs, ("streams", "streams")),
    "fused_post_res_mix": (mhc.fused_post_res_mix, paper.post_res_mix, _mixing_inputs, ("streams", "streams")),
    "post_res_mix_static": (mhc.post_res_mix, paper.post_res_mix,  # static [n], [n, n] mappings (dynamic=False)
                            lambda: [*_mixing_inputs()[:2], torch.rand(N), torch.rand(N, N)], ("streams", "streams")),
    "expand_streams": (lambda x: mhc.expand_streams(x, N), lambda x: torch.stack([x] * N, dim=-2),
                       lambda: [_mixing_inputs()[1]], ("streams", "streams")),
    "reduce_streams": (mhc.reduce_streams, lambda X: sum(X[..., i, :] for i in range(N)) / N,
                       lambda: [_mixing_inputs()[0]], ("streams", "streams")),
}


@pytest.mark.parametrize("name", CASES)
def test_forward_and_autograd_gradients_match_the_paper_in_float64(name):
    op, reference, make_inputs, kinds = CASES[name]
    _check_against_the_paper(op, reference, make_inputs(), kinds)


def _check_against_the_paper(op, reference, inputs, kinds):
    out_kind, grad_kind = kinds
    inputs = [t.requires_grad_() for t in inputs]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    got, want = op(*inputs), reference(*inputs64)
    got, want = (got, want) if isinstance(got, (tuple, list)) else ((got,), (want,))
    assert len(got) == len(want)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
    for out, ref in zip(got, want):
        assert out.shape == ref.shape
        assert_close(out, ref, out_kind, torch.float32)
    grads = torch.autograd.grad(sum((w.float() * out).sum() for w, out in zip(weights, got)), inputs)
    grads64 = torch.autograd.grad(sum((w * ref).sum() for w, ref in zip(weights, want)), inputs64)
    for i, (grad, grad64) in enumerate(zip(grads, grads64)):
        assert grad.dtype == inputs[i].dtype
        assert_close(grad, grad64, grad_kind, torch.float32, msg=f"input {i}")


@pytest.mark.parametrize("lead", [(5,), (2, 2, 3)], ids=["tokens", "batch-height-width"])
@pytest.mark.parametrize("name", ["pre_mix", "post_res_mix", "fused_post_res_mix", "expand_streams", "reduce_streams"])
def test_mixing_ops_on_streams_of_other_ranks(name, lead):
    """Streams ``[T, n, C]`` (an MLP's ``[B, C]`` residual) and ``[B, H, W, n, C]`` (channel-last images): an axis
    counted from the front instead of the back shows only at ranks other than 4."""
    g = torch.Generator().manual_seed(0)
    X, f = torch.randn(*lead, N, C, generator=g), torch.randn(*lead, C, generator=g)
    h_post, h_res = torch.rand(*lead, N, generator=g), torch.rand(*lead, N, N, generator=g)
    mixed = [X, f, h_post, h_res]
    inputs = {"pre_mix": [X, h_post], "post_res_mix": mixed, "fused_post_res_mix": mixed, "expand_streams": [f],
              "reduce_streams": [X]}[name]
    op, reference, _, kinds = CASES[name]
    _check_against_the_paper(op, reference, inputs, kinds)


def _backward_cases(dtype):
    """(op, args) for every forward and backward op, streams in ``dtype``, coefficient parameters in float32."""
    X, phi, alpha, bias = _coefficient_inputs()
    X = X.to(dtype)
    _, f, h_post, h_res = _mixing_inputs()
    f = f.to(dtype)
    h_pre = torch.rand(2, 3, N)
    d_pre, d_post, d_res = torch.randn(2, 3, N), torch.randn(2, 3, N), torch.randn(2, 3, N, N)
    logits = torch.randn(2, 3, N, N).to(dtype)
    Xp, phip, alphap, biasp = _coefficient_inputs(m=2 * N + 24)
    return [
        (mhc.sinkhorn_knopp.default, (logits, ITERS)),
        (mhc.sinkhorn_knopp_backward.default, (torch.randn(2, 3, N, N).to(dtype), logits, ITERS)),
        (mhc.coefficients.default, (X, phi, alpha, bias, N, ITERS, "mhc")),
        (mhc.coefficients.default, (None, None, None, bias, N, ITERS, "mhc")),
        (mhc.coefficients_backward.default, (d_pre, d_post, d_res, X, phi, alpha, bias, N, ITERS, "mhc")),
        (mhc.coefficients_permutations.default, (Xp.to(dtype), phip, alphap, biasp, N)),
        (mhc.coefficients_permutations_backward.default, (d_pre, d_post, d_res, Xp.to(dtype), phip, alphap, biasp, N)),
        (mhc.pre_mix.default, (X, h_pre)),
        (mhc.post_res_mix.default, (X, f, h_post, h_res)),
        (mhc.expand_streams.default, (f, N)),
        (mhc.reduce_streams.default, (X,)),
        (mhc.fused_pre_mix.default, (X, phi, alpha, bias, N, ITERS, "mhc")),
        (mhc.fused_pre_mix_backward.default,
         (X, phi, alpha, bias, h_pre, f, d_pre, d_post, d_res, N, ITERS, "mhc")),
        (mhc.fused_post_res_mix.default, (X, f, h_post, h_res)),
        (mhc.fused_post_res_mix_backward.default, (X, f, h_post, h_res, X.detach().clone())),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_kernels_give_the_shapes_and_dtypes_of_a_real_run(dtype):
    """What torch.export, torch.compile and the rewrite's fake values see must be what the op returns."""
    for op, args in _backward_cases(dtype):
        torch.library.opcheck(op, args, test_utils="test_faketensor")


@pytest.mark.parametrize("constraint", ["sinkhorn", "permutations"])
def test_float64_streams_with_float32_parameters_compute_in_float64(constraint):
    """The streams' dtype sets the precision (float64 stays float64); each gradient has its input's dtype."""
    X, phi, alpha, bias = _coefficient_inputs(m=M if constraint == "sinkhorn" else 2 * N + 24)
    X = X.double().requires_grad_()
    params = [t.requires_grad_() for t in (phi, alpha, bias)]
    if constraint == "sinkhorn":
        got = mhc.coefficients(X, *params, N, ITERS, "mhc")[:3]
        want = paper.coefficients(X, *(p.double() for p in params), N, ITERS)
    else:
        got = mhc.coefficients_permutations(X, *params, N)
        want = _paper_permutations(X, *(p.double() for p in params))
    for out, ref in zip(got, want):
        assert out.dtype == torch.float64
        assert_close(out, ref, "float64")
    grads = torch.autograd.grad(sum(out.sum() for out in got), [X, *params])
    grads64 = torch.autograd.grad(sum(ref.sum() for ref in want), [X, *params])
    dtypes = [torch.float64, torch.float32, torch.float32, torch.float32]
    assert [g.dtype for g in grads] == dtypes
    for grad, grad64 in zip(grads, grads64):
        assert_close(grad, grad64, "coefficient_grads")
    ones = [torch.ones_like(out) for out in got]  # the backward op itself, before autograd casts anything
    if constraint == "sinkhorn":
        direct = mhc.coefficients_backward(*ones, X, *params, N, ITERS, "mhc")
    else:
        direct = mhc.coefficients_permutations_backward(*ones, X, *params, N)
    assert [g.dtype for g in direct] == dtypes


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_static_coefficients_of_a_bf16_bias_compute_in_float32(mode):
    """A bf16 model's static site: the bias is bf16, the coefficients are computed and returned in float32."""
    bias = _coefficient_inputs()[3].bfloat16()
    got = mhc.coefficients(None, None, None, bias, N, ITERS, mode)[:3]
    b = bias.double()
    want = (paper.static_coefficients(b, N, ITERS) if mode == "mhc"
            else (b[:N], b[N:2 * N], b[2 * N:].unflatten(-1, (N, N))))
    for out, ref in zip(got, want):
        assert out.dtype == torch.float32
        assert_close(out, ref, "coefficients", torch.float32)


@pytest.mark.parametrize("name", ["pre_mix", "post_res_mix", "post_res_mix_static"])
def test_mixing_ops_take_coefficients_in_another_dtype_than_the_streams(name):
    """Coefficients in bf16 (a user's own, or a bf16 static site's) mix float32 streams in float32."""
    op, reference, make_inputs, _ = CASES[name]
    inputs = make_inputs()
    inputs = [t if t.shape[-1] == C else t.bfloat16() for t in inputs]  # the coefficients, not streams or branch
    got = op(*inputs)
    assert got.dtype == torch.float32
    assert_close(got, reference(*(t.double() for t in inputs)), "streams", torch.float32)
