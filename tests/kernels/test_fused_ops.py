"""The fused triton_ops: registration, autograd against the reference ops, and the lowering pass."""

import copy

import pytest
import torch

import mhc_rewrite

from models import GPT, GPTConfig, perturb_mhc
from tolerances import GRADCHECK, assert_close

mhc = torch.ops.mhc


def _inputs(n=4, C=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, n, C, generator=g), torch.randn(n * C, n * n + 2 * n, generator=g) / 10,
            0.5 * torch.randn(3, generator=g), torch.randn(n * n + 2 * n, generator=g))


def test_opcheck():
    streams, phi, alpha, bias = (t.requires_grad_() for t in _inputs())
    torch.library.opcheck(mhc.fused_pre_mix.default, (streams, phi, alpha, bias, 4, 20, "mhc"))
    h_post, h_res = torch.rand(2, 5, 4, requires_grad=True), torch.rand(2, 5, 4, 4, requires_grad=True)
    torch.library.opcheck(mhc.fused_post_res_mix.default, (streams, torch.randn(2, 5, 24), h_post, h_res))


def test_gradcheck_of_the_reference_path_float64():
    streams, phi, alpha, bias = (t.double()[:1, :2].requires_grad_() if t.dim() == 4 else t.double().requires_grad_()
                                 for t in _inputs(C=3))
    fused = lambda *a: mhc.fused_pre_mix(*a, 4, 10, "mhc")[:4]  # noqa: E731  (the link is checked below)
    assert torch.autograd.gradcheck(fused, (streams, phi, alpha, bias), **GRADCHECK)
    branch = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(1, 2, 4, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mhc.fused_post_res_mix, (streams, branch, h_post, h_res), **GRADCHECK)

    def linked_site(streams, phi, alpha, bias, weight):
        """A site as the lowering leaves it: the post-mix takes the pre-mix's link (the value is a stand-in, not
        read; only the pair's gradient means anything, and numerical differences of the pair check it)."""
        y, _, h_post, h_res, link = mhc.fused_pre_mix(streams, phi, alpha, bias, 4, 10, "mhc")
        return mhc.fused_post_res_mix(streams, torch.tanh(y * weight), h_post, h_res, link)

    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linked_site, (streams, phi, alpha, bias, weight), **GRADCHECK)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_fused_pre_mix_equals_coefficients_then_pre_mix(mode):
    inputs = _inputs()
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    y, h_pre, h_post, h_res, _ = mhc.fused_pre_mix(*a, 4, 20, mode)
    r_pre, r_post, r_res = mhc.coefficients(*b, 4, 20, mode)[:3]
    r_y = mhc.pre_mix(b[0], r_pre)
    for got, want in ((y, r_y), (h_pre, r_pre), (h_post, r_post), (h_res, r_res)):
        assert_close(got, want, "same_math")
    weights = [torch.randn_like(t) for t in (y, h_post, h_res)]
    loss_a = sum((w * t).sum() for w, t in zip(weights, (y, h_post, h_res)))
    loss_b = sum((w * t).sum() for w, t in zip(weights, (r_y, r_post, r_res)))
    for got, want in zip(torch.autograd.grad(loss_a, a), torch.autograd.grad(loss_b, b)):
        assert_close(got, want, "same_math")


def _assert_same_forward_and_gradients(lowered, gm, idx):
    """The lowered model's output and every parameter's gradient against the unlowered model's."""
    want, got = gm(idx), lowered(idx)
    assert_close(got, want, "same_math")
    g_want = torch.autograd.grad(want.pow(2).mean(), list(gm.parameters()))
    g_got = torch.autograd.grad(got.pow(2).mean(), list(lowered.parameters()))
    for (name, _), a, b in zip(gm.named_parameters(), g_got, g_want):
        assert_close(a, b, "same_math", msg=name)


def test_lowered_model_matches_the_reference_graph():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, block_size=16))
    idx = torch.randint(0, 64, (2, 16))
    gm = perturb_mhc(mhc_rewrite.convert(gpt, example_inputs=(idx,)))
    lowered = copy.deepcopy(gm)
    mhc_rewrite.lower(lowered)
    graph = mhc_rewrite.converted_graph(lowered, idx)
    targets = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert mhc.fused_pre_mix.default in targets and mhc.fused_post_res_mix.default in targets
    assert mhc.coefficients.default not in targets and mhc.pre_mix.default not in targets
    _assert_same_forward_and_gradients(lowered, gm, idx)


def test_static_sites_keep_reference_coefficients():
    """A lowered static model, forward and every gradient, against the unlowered one."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, block_size=16))
    idx = torch.randint(0, 64, (2, 16))
    gm = perturb_mhc(mhc_rewrite.convert(gpt, example_inputs=(idx,), dynamic=False))
    lowered = copy.deepcopy(gm)
    mhc_rewrite.lower(lowered)
    targets = [node.target for node in mhc_rewrite.converted_graph(lowered, idx).graph.nodes
               if node.op == "call_function"]
    assert mhc.coefficients.default in targets and mhc.fused_post_res_mix.default in targets
    _assert_same_forward_and_gradients(lowered, gm, idx)
