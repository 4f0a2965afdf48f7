"""Where the fused ops run their Triton kernels and where their pure-PyTorch reference (ops/fused.py)."""

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mhc_rewrite  # noqa: F401  (registers torch.ops.mhc)
from mhc_rewrite.ops import fused, use_triton

import paper
from tolerances import assert_close

mhc = torch.ops.mhc


@pytest.mark.skipif(fused.fused_pre is None, reason="triton is not installed: the fused ops have only the reference")
def test_the_kernels_run_for_real_float32_tensors_under_the_interpreter(monkeypatch):
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py
    t = torch.randn(3)
    assert use_triton(t) and use_triton(t.bfloat16())
    assert not use_triton(t.double())  # the kernels compute in float32: float64 takes the reference
    with FakeTensorMode() as mode:
        assert not use_triton(mode.from_tensor(t))  # tracing calls the reference ops
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not use_triton(t)  # a CPU tensor without the interpreter


def _inputs(n=4, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n * n + 2 * n
    return [torch.randn(2, 3, n, C, generator=g, dtype=torch.float64), torch.randn(n * C, m, generator=g).double() / 4,
            torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64), torch.randn(m, generator=g).double()]


@pytest.mark.parametrize("outputs", ["all", "y only", "h_res only"])
def test_float64_reference_path_and_its_gradients_match_the_paper(outputs):
    """float64 takes the reference path; its backward must still add the pre-mix's and the coefficients' terms."""
    inputs = [t.requires_grad_() for t in _inputs()]
    inputs64 = [t.detach().clone().requires_grad_() for t in inputs]
    got = mhc.fused_pre_mix(*inputs, 4, 20, "mhc")[:4]  # the link: test_fused_ops.py
    h_pre, h_post, h_res = paper.coefficients(*inputs64, 4, 20)
    want = (paper.pre_mix(inputs64[0], h_pre), h_pre, h_post, h_res)
    for out, ref in zip(got, want):
        assert out.dtype == torch.float64
        assert_close(out, ref, "float64")
    used = {"all": [0, 1, 2, 3], "y only": [0], "h_res only": [3]}[outputs]
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(want[i].shape, generator=g, dtype=torch.float64) for i in used]
    grads = torch.autograd.grad(sum((w * got[i]).sum() for w, i in zip(weights, used)), inputs)
    grads64 = torch.autograd.grad(sum((w * want[i]).sum() for w, i in zip(weights, used)), inputs64)
    for i, (grad, grad64) in enumerate(zip(grads, grads64)):
        assert_close(grad, grad64, "float64", msg=f"input {i}")


def test_float64_post_res_mix_takes_the_reference_path_with_its_gradients():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 4, 6), (2, 3, 6), (2, 3, 4), (2, 3, 4, 4)]
    inputs = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    got, want = mhc.fused_post_res_mix(*inputs), paper.post_res_mix(*inputs)
    assert_close(got, want, "float64")
    weights = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for grad, grad64 in zip(torch.autograd.grad((weights * got).sum(), inputs),
                            torch.autograd.grad((weights * want).sum(), inputs)):
        assert_close(grad, grad64, "float64")
