"""The learned collapse (``collapse="learned"``) against its formula written out in float64, and its init: the mean.

    z = (vec(X) phi) / rms(vec(X));  w = sigmoid(alpha z + bias);  y = sum_i w_i X_i
"""

import pytest
import torch

from mhc_rewrite.ops.collapse import CollapseParams, learned_collapse

from tolerances import assert_close

N, C = 4, 8


def collapse_float64(X, phi, alpha, bias):
    """The formula, one step a line, in float64, with an explicit sum over the streams."""
    X, phi, alpha, bias = (t.double() for t in (X, phi, alpha, bias))
    v = X.flatten(-2)
    z = (v @ phi) / torch.sqrt((v * v).mean(dim=-1, keepdim=True) + 1e-6)
    w = torch.sigmoid(alpha * z + bias)
    return sum(w[..., i, None] * X[..., i, :] for i in range(X.shape[-2]))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, N, C, generator=g), torch.randn(N * C, N, generator=g) / 4,
            torch.tensor([0.8]), torch.randn(N, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learned_collapse_matches_its_formula_in_float64(dtype):
    X, phi, alpha, bias = _inputs()
    X = X.to(dtype)
    y = learned_collapse(X, phi, alpha, bias)
    assert y.shape == (2, 3, C) and y.dtype == dtype
    assert_close(y, collapse_float64(X, phi, alpha, bias), "streams", dtype)


def test_learned_collapse_gradients_match_float64_autograd():
    inputs = [t.requires_grad_() for t in _inputs()]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    weights = torch.randn(2, 3, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((weights.float() * learned_collapse(*inputs)).sum(), inputs)
    grads64 = torch.autograd.grad((weights * collapse_float64(*inputs64)).sum(), inputs64)
    for i, (grad, grad64) in enumerate(zip(grads, grads64)):
        assert_close(grad, grad64, "coefficient_grads", msg=f"input {i}")


@pytest.mark.parametrize("n", [2, 4])
def test_fresh_parameters_collapse_to_the_mean(n):
    torch.manual_seed(0)
    params = CollapseParams(n, C, "blocks.1")
    assert params.phi.shape == (n * C, n) and params.alpha.shape == (1,) and params.bias.shape == (n,)
    assert torch.equal(params.alpha, torch.zeros(1)) and 0 < params.phi.abs().max() < 1
    X = torch.randn(5, n, C)
    assert_close(learned_collapse(X, params.phi, params.alpha, params.bias), X.mean(dim=-2), "few_roundings")
    assert params.extra_repr() == f"n={n}, channels={C}, module_path='blocks.1'"


def test_float64_streams_are_collapsed_in_float64():
    X, phi, alpha, bias = (t.double() for t in _inputs())
    y = learned_collapse(X, phi, alpha, bias)
    assert y.dtype == torch.float64
    assert_close(y, collapse_float64(X, phi, alpha, bias), "float64")


def test_parameters_are_made_on_the_given_device_and_default_to_no_module_path():
    params = CollapseParams(3, 5, device="meta")
    assert all(p.device.type == "meta" for p in params.parameters())
    assert CollapseParams(3, 5).module_path == ""


def test_a_bf16_model_collapses_in_float32():
    """A model cast to bf16 has bf16 collapse parameters too: the gate is still computed in float32."""
    X, phi, alpha, bias = (t.bfloat16() for t in _inputs())
    y = learned_collapse(X, phi, alpha, bias)
    assert y.dtype == torch.bfloat16
    assert_close(y, collapse_float64(X, phi, alpha, bias), "streams", torch.bfloat16)
