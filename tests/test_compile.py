"""torch.compile: a converted model compiles with fullgraph=True through the `mhc` backend (Inductor, CPU here),
forward and gradients equal eager; the backend refuses to train an unconverted model; mhc_rewrite.compile."""

import copy
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn import functional as F

import mhc_rewrite
from mhc_rewrite import MHCRewriteError

from models import GPT, GPTConfig, perturb_mhc
from tolerances import assert_close


def _gpt(layers=1):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=layers, block_size=16, n_embd=32))
    idx = torch.randint(0, 64, (2, 16))
    return gpt, idx


def test_backend_is_found_by_name():
    assert "mhc" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("mhc") is mhc_rewrite.backend.mhc_backend


def test_converted_model_compiles_fullgraph_and_matches_eager():
    gpt, idx = _gpt()
    gm = perturb_mhc(mhc_rewrite.convert(gpt, example_inputs=(idx,)))
    eager = copy.deepcopy(gm)
    mhc_rewrite.converted_graph(gm, idx)  # the region's graph for this call exists: no trace inside Dynamo
    counter = CompileCounterWithBackend("mhc")
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    out = compiled(idx)
    want = eager(idx)
    assert counter.frame_count == 1  # one graph: no graph break
    assert_close(out, want, "same_math")
    got_grads = torch.autograd.grad(out.pow(2).mean(), list(gm.parameters()))
    want_grads = torch.autograd.grad(want.pow(2).mean(), list(eager.parameters()))
    for (name, _), a, b in zip(gm.named_parameters(), got_grads, want_grads):
        assert_close(a, b, "same_math", msg=name)


def test_unconverted_model_with_grad_is_refused():
    gpt, idx = _gpt()
    with pytest.raises(Exception) as info:
        torch.compile(gpt, backend="mhc")(idx)
    inner = getattr(info.value, "inner_exception", info.value)  # Dynamo wraps backend errors
    assert isinstance(inner, MHCRewriteError)
    assert "optimizer" in str(inner) and "mhc_rewrite.compile(model, n=4)" in str(inner)


def test_unconverted_model_under_no_grad_is_rewritten_for_inference(monkeypatch):
    gpt, idx = _gpt()
    lowered = []
    monkeypatch.setattr(mhc_rewrite.backend, "lower",
                        lambda gm: (lowered.append(gm), mhc_rewrite.pipeline.lower(gm))[1])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(gpt, backend="mhc")(idx)
        want = gpt(idx)
    assert any("identity-initialised mHC" in str(w.message) for w in caught)
    assert len(lowered) == 1 and len(lowered[0].mhc_sites) == 2  # the Dynamo graph was rewritten: attn and mlp
    assert_close(out, want, "function_at_init")


def test_mhc_rewrite_compile_trains_every_new_parameter_like_eager():
    """Three SGD steps, compiled and eager from the same weights: the same losses, the loss falls, every new
    parameter (phi, alpha, bias of both sites) moves, and the trained parameters agree."""
    gpt, idx = _gpt()
    torch.manual_seed(1)
    eager = mhc_rewrite.convert(copy.deepcopy(gpt), n=2, example_inputs=(idx,))
    torch.manual_seed(1)  # the same random phi in both
    compiled = mhc_rewrite.compile(gpt, n=2, example_inputs=(idx,), compile_options={"fullgraph": True})
    mhc_names = [name for name, _ in compiled.named_parameters() if ".mhc." in f".{name}"]
    assert len(mhc_names) == 2 * 3  # attn and mlp sites: phi, alpha, bias
    before = {name: p.detach().clone() for name, p in compiled.named_parameters() if name in mhc_names}
    targets = torch.roll(idx, -1, dims=1)
    losses = {}
    for label, model in (("compiled", compiled), ("eager", eager)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[label] = []
        for _ in range(3):
            loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[label].append(loss.item())
    assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), "same_math")
    assert losses["compiled"][-1] < losses["compiled"][0]
    trained = dict(compiled.named_parameters())
    unmoved = [name for name in mhc_names if torch.equal(trained[name], before[name])]
    assert unmoved == []
    eager_params = dict(eager.named_parameters())
    for name in mhc_names:
        eager_name = name.removeprefix("_orig_mod.")
        assert_close(trained[name] - before[name], eager_params[eager_name] - before[name], "same_math", msg=name)
