"""torch.compile: a converted model compiles with fullgraph=True through the `mhc` backend (Inductor, CPU here),
forward and gradients equal eager; the backend refuses to train an unconverted model; mhc_rewrite.compile."""

import copy
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import mhc_rewrite
from mhc_rewrite import MHCRewriteError

from models import GPT, GPTConfig


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
    gm = mhc_rewrite.convert(gpt, example_inputs=(idx,))
    with torch.no_grad():
        for p in gm.mhc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    eager = copy.deepcopy(gm)
    mhc_rewrite.converted_graph(gm, idx)  # the region's graph for this call exists: no trace inside Dynamo
    counter = CompileCounterWithBackend("mhc")
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    out = compiled(idx)
    want = eager(idx)
    assert counter.frame_count == 1  # one graph: no graph break
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    got_grads = torch.autograd.grad(out.pow(2).mean(), list(gm.parameters()))
    want_grads = torch.autograd.grad(want.pow(2).mean(), list(eager.parameters()))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


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
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_mhc_rewrite_compile_trains_the_new_parameters():
    gpt, idx = _gpt()
    compiled = mhc_rewrite.compile(gpt, n=2, example_inputs=(idx,), compile_options={"fullgraph": True})
    names = [name for name, _ in compiled.named_parameters()]
    mhc_names = [name for name in names if ".mhc." in f".{name}"]
    assert len(mhc_names) == 2 * 3  # attn and mlp sites: phi, alpha, bias
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in compiled.named_parameters() if name in mhc_names}
    loss = compiled(idx).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    moved = [name for name, p in compiled.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert "bias" in " ".join(moved) and "alpha" in " ".join(moved)
