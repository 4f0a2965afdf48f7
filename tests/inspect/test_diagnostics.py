"""Amax gain against hand-computed values; stream diagnostics of converted models against their parameters."""

import pytest
import torch

import mhc_rewrite
from mhc_rewrite.inspect import amax_gain, composite_gains, stream_diagnostics

from models import GPT, GPTConfig, ResidualMLP
from tolerances import assert_close


def _birkhoff(n, seed):
    """A random convex mix of permutation matrices: exactly doubly stochastic."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(5, generator=g, dtype=torch.float64)
    weights /= weights.sum()
    perms = [torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)] for _ in range(5)]
    return sum(w * p for w, p in zip(weights, perms))


def test_doubly_stochastic_products_have_gain_one():
    maps = [_birkhoff(4, seed) for seed in range(30)]
    gains = composite_gains(maps)
    assert len(gains["forward"]) == len(gains["backward"]) == 30
    assert_close(torch.tensor(gains["forward"] + gains["backward"]), torch.ones(60, dtype=torch.float64), "float64")


def test_gain_of_a_known_product_of_non_stochastic_maps():
    a = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # by hand: b @ a = [[2, 0], [2, -1]]: row sums |.| = 2, 3; column sums 4, 1
    assert amax_gain(b @ a) == (3.0, 4.0)
    gains = composite_gains([a, b])  # depth order: a first
    assert gains["forward"] == [3.0, 3.0]  # gain(a) rows 3, 1; gain(ba) rows 2, 3
    assert gains["backward"] == [4.0, 2.0]  # from the top: gain(ba) columns 4, 1; gain(b) columns 2, 1


@pytest.mark.parametrize("dynamic", [True, False])
def test_maps_at_identity_init(dynamic):
    model = GPT(GPTConfig(n_layer=2))
    idx = torch.randint(0, 64, (2, 12))
    gm = mhc_rewrite.convert(model, example_inputs=(idx,), dynamic=dynamic)
    diag = stream_diagnostics(gm, idx)
    assert [s.module_path for s in diag.sites] == ["h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp"]
    # logits I are balanced, so Sinkhorn returns exp(I) scaled: diagonal e / (e + 3), elsewhere 1 / (e + 3)
    e = torch.exp(torch.tensor(1.0, dtype=torch.float64))
    expected_res = torch.full((4, 4), 1 / (e + 3), dtype=torch.float64).fill_diagonal_(e / (e + 3))
    for k, site in enumerate(diag.sites):
        favoured = torch.full((4,), 0.2, dtype=torch.float64)
        favoured[k % 4] = 0.4
        assert_close(site.h_pre, favoured, "few_roundings")
        assert_close(site.h_post, torch.ones(4, dtype=torch.float64), "few_roundings")
        assert_close(site.h_res, expected_res, "few_roundings")
    assert_close(torch.tensor(diag.max_gain()), torch.ones(2), "coefficients")


def test_hc_maps_are_not_bounded_and_the_gain_shows_it():
    model = ResidualMLP(depth=6)
    x = torch.randn(16, 6)
    gm = mhc_rewrite.convert(model, mode="hc", dynamic=False)
    with torch.no_grad():
        for params in gm.mhc.values():
            params.bias[8:] = (torch.eye(4) + 0.5 * torch.ones(4, 4)).flatten()  # rows sum to 3
    diag = stream_diagnostics(gm, x)
    assert_close(torch.tensor(diag.gains[0]["forward"][-1]), torch.tensor(3.0 ** 6), "float64")  # exact inputs
    assert_close(torch.tensor(diag.max_gain()[0]), torch.tensor(3.0 ** 6), "float64")


def test_to_dict_is_json_ready():
    import json

    model = ResidualMLP(depth=2)
    gm = mhc_rewrite.convert(model)
    data = json.loads(json.dumps(stream_diagnostics(gm, torch.randn(4, 6)).to_dict()))
    assert len(data["sites"]) == 2
    assert_close(torch.tensor(data["max_amax_forward"]), torch.tensor(1.0), "coefficients")
    assert len(data["sites"][0]["h_res"]) == 4


def test_unconverted_model_is_refused():
    with pytest.raises(ValueError, match="needs a model returned by mhc_rewrite.convert"):
        stream_diagnostics(torch.fx.symbolic_trace(ResidualMLP()), torch.randn(2, 6))
