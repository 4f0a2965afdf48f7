"""convert() with collapse="learned" and constraint="permutations": function kept at init, parameters train."""

import pytest
import torch
from torch.nn import functional as F

import mhc_rewrite
from mhc_rewrite.ops.collapse import CollapseParams, learned_collapse

from models import GPT, GPTConfig, ResidualMLP
from tolerances import assert_close, tolerance

TOL = 1e-5


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def gpt_and_inputs():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, n_layer=2)), (torch.randint(0, 64, (4, 19)),)


def train_steps(model, steps, lr=3e-2):
    """A few AdamW steps on next-token prediction of a fixed random sequence."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (8, 20))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def params_named(model, fragment):
    return {name: p for name, p in model.named_parameters() if fragment in name}


@pytest.mark.parametrize("options", [dict(collapse="learned"), dict(constraint="permutations"),
                                     dict(constraint="permutations", collapse="learned"), dict(n=3, collapse="learned"),
                                     dict(constraint="permutations", dynamic=False)])
def test_function_is_preserved_at_init(options):
    model, inputs = gpt_and_inputs()
    converted = mhc_rewrite.convert(model, example_inputs=inputs, **options)
    with torch.no_grad():
        assert rel_err(converted(*inputs), model(*inputs)) <= TOL


def test_learned_collapse_at_init_is_the_mean_and_moves_when_its_gate_does():
    torch.manual_seed(0)
    streams = torch.randn(3, 5, 4, 8)
    params = CollapseParams(4, 8)
    y = learned_collapse(streams, params.phi, params.alpha, params.bias)
    assert_close(y, streams.mean(dim=-2), "few_roundings")
    with torch.no_grad():
        params.alpha.fill_(1.0)
    y = learned_collapse(streams, params.phi, params.alpha, params.bias)
    assert (y - streams.mean(dim=-2)).abs().max() > 1e-2


def test_learned_collapse_replaces_the_exit_reduce_only():
    model, inputs = gpt_and_inputs()
    converted = mhc_rewrite.convert(model, example_inputs=inputs, collapse="learned")
    collapses = params_named(converted, "collapse")
    # one chain (the GPT's residual stream) -> one exit -> phi, alpha, bias
    assert sorted(name.rsplit(".", 1)[1] for name in collapses) == ["alpha", "bias", "phi"]
    mean = mhc_rewrite.convert(model, example_inputs=inputs)
    extra = sum(p.numel() for p in converted.parameters()) - sum(p.numel() for p in mean.parameters())
    assert extra == 4 * 32 * 4 + 1 + 4


def test_gradients_reach_the_learned_collapse():
    model, inputs = gpt_and_inputs()
    converted = mhc_rewrite.convert(model, example_inputs=inputs, collapse="learned")
    collapse = params_named(converted, "collapse")
    train_steps(converted, 1)  # alpha = 0 at init: phi's gradient waits for alpha to move
    assert all(p.grad is not None and p.grad.abs().max() > 0 for name, p in collapse.items() if "phi" not in name)
    train_steps(converted, 1)
    assert all(p.grad.abs().max() > 0 for p in collapse.values())


def test_the_last_sites_h_res_learns_only_with_the_learned_collapse():
    """With a mean reduce the last site's H_res is inert (columns sum to 1); a learned gate gives it a gradient."""
    def last_res_grad(collapse):
        model, inputs = gpt_and_inputs()
        converted = mhc_rewrite.convert(model, example_inputs=inputs, collapse=collapse)
        train_steps(converted, 3)
        last = [p for name, p in converted.named_parameters() if name.endswith(".bias") and "collapse" not in name
                and p.numel() == 4 * 4 + 2 * 4][-1]
        return last.grad[2 * 4:].abs().max().item()

    inert, learned = last_res_grad("mean"), last_res_grad("learned")
    assert inert <= tolerance("zero_grad")  # float32 rounding only; the interior sites get ~1e-6 after 3 steps
    assert learned > 1e3 * max(inert, 1e-12)  # ~3e-7 after 3 steps, growing as the gate moves


def test_permutations_train_and_every_parameter_gets_a_gradient():
    model, inputs = gpt_and_inputs()
    converted = mhc_rewrite.convert(model, example_inputs=inputs, constraint="permutations")
    original = {id(p) for p in model.parameters()}  # convert() shares the original's parameters
    site_params = {name: p for name, p in converted.named_parameters() if id(p) not in original}
    assert len(site_params) == 3 * 4  # phi, alpha, bias at 2 layers x (attn, mlp)
    assert all(p.shape[-1] == 32 for name, p in site_params.items() if name.endswith(".bias"))
    train_steps(converted, 3)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in site_params.values())
    diagnostics = mhc_rewrite.stream_diagnostics(converted, *inputs)
    forward, backward = diagnostics.max_gain()
    assert_close(torch.tensor([forward, backward]), torch.ones(2), "composite_gain")


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="constraint"):
        mhc_rewrite.MHCConfig(constraint="birkhoff")
    with pytest.raises(ValueError, match="hc"):
        mhc_rewrite.MHCConfig(mode="hc", constraint="permutations")
    with pytest.raises(ValueError, match="n <= 6"):
        mhc_rewrite.MHCConfig(n=7, constraint="permutations")
    with pytest.raises(ValueError, match="collapse"):
        mhc_rewrite.MHCConfig(collapse="max")
    converted = mhc_rewrite.convert(ResidualMLP(), collapse="learned", constraint="permutations", n=3)
    assert converted(torch.randn(2, 6)).shape == (2, 3)
