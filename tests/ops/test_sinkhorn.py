"""Sinkhorn-Knopp: projection properties, agreement with the paper's rounds written out in float64
(tests/paper.py), exact backward against float64 autograd of those rounds, op registration."""

import pytest
import torch

import mhc_rewrite  # noqa: F401  (registers torch.ops.mhc)
from mhc_rewrite.ops.sinkhorn import sinkhorn_knopp_backward_ref

import paper
from tolerances import GRADCHECK, assert_close

sinkhorn = torch.ops.mhc.sinkhorn_knopp


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("center", ["zero", "identity_init"])
def test_doubly_stochastic_after_20_iterations(n, center):
    # Realistic logits: the identity init (1 on the diagonal) or zero, plus N(0, 0.5²) token-to-token spread.
    # Wider spreads converge more slowly: over 4096 draws the worst column-sum error after 20 rounds measured
    # 5e-4 (n=4) and 7e-3 (n=2) at std 1, and 2e-2..4e-2 at std 2, which is why the paper calls columns approximate.
    torch.manual_seed(n)
    logits = 0.5 * torch.randn(256, n, n) + (torch.eye(n) if center == "identity_init" else 0)
    h = sinkhorn(logits, 20)
    assert h.dtype == torch.float32 and h.shape == logits.shape
    assert (h >= 0).all()
    assert_close(h.sum(-1), torch.ones(256, n), "sinkhorn_rows")  # rows: exact after the last step
    assert_close(h.sum(-2), torch.ones(256, n), "sinkhorn_columns_20")  # columns: converged


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_extreme_logits_stay_finite(scale):
    torch.manual_seed(0)
    logits = scale * torch.randn(64, 4, 4).clamp(-1, 1)
    logits[0] = scale  # all equal and huge
    logits[1] = -scale
    logits[2, :, 0] = -scale  # a column far below the rest
    h = sinkhorn(logits, 20)
    assert torch.isfinite(h).all() and (h >= 0).all()
    assert_close(h[:2], torch.full((2, 4, 4), 0.25), "few_roundings")
    grad = torch.autograd.grad(sinkhorn(logits.requires_grad_(), 20).pow(2).sum(), logits)[0]
    assert torch.isfinite(grad).all()


def test_float32_matches_float64():
    torch.manual_seed(1)
    logits = torch.randn(32, 4, 4, dtype=torch.float64)
    expected = paper.sinkhorn(logits, 20)
    assert_close(sinkhorn(logits.float(), 20), expected, "coefficients")
    assert_close(sinkhorn(logits, 20), expected, "float64")


def test_bf16_input_computes_in_float32():
    logits = torch.randn(8, 4, 4)
    out = sinkhorn(logits.bfloat16(), 20)
    assert out.dtype == torch.float32
    assert torch.equal(out, sinkhorn(logits.bfloat16().float(), 20))  # the same float32 computation


def test_identity_logits_give_symmetric_doubly_stochastic():
    # exp(c·I) is already balanced: the result is exact, diagonal e^c / (e^c + n - 1)
    h = sinkhorn(torch.eye(4), 20)
    e = torch.exp(torch.tensor(1.0))
    expected = torch.full((4, 4), 1 / (e + 3)).fill_diagonal_(e / (e + 3))
    assert_close(h, expected, "few_roundings")


@pytest.mark.parametrize("iters", [1, 5, 20])
def test_hand_derived_backward_equals_autograd_through_iterations(iters):
    torch.manual_seed(iters)
    logits = torch.randn(16, 4, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(16, 4, 4, dtype=torch.float64)
    (expected,) = torch.autograd.grad(paper.sinkhorn(logits, iters), logits, grad)
    assert_close(sinkhorn_knopp_backward_ref(grad, logits.detach(), iters), expected, "float64")


def test_gradcheck_float64():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20), (logits,), **GRADCHECK)


def test_opcheck():
    torch.library.opcheck(torch.ops.mhc.sinkhorn_knopp.default, (torch.randn(5, 4, 4, requires_grad=True), 20))
    torch.library.opcheck(torch.ops.mhc.sinkhorn_knopp_backward.default,
                          (torch.randn(5, 4, 4), torch.randn(5, 4, 4), 20))
