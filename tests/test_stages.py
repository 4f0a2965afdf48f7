"""split_stages (one process): chained stages compute the unsplit converted model, gradients included (float64);
the stages partition its state_dict; what crosses a boundary is the n-stream tensor; the refusals say why.
The multi-process runs (PipelineStage + ScheduleGPipe over gloo) are in tests/scenarios/test_distributed.py."""

import os
import sys

import pytest
import torch
import transformers

import mhc_rewrite
from mhc_rewrite import MHCRewriteError, split_stages

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from nanogpt import GPT, GPTConfig  # noqa: E402

from tolerances import assert_close  # noqa: E402

CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=32)
N = 4


def _converted(dtype=torch.float32):
    torch.manual_seed(0)
    model = mhc_rewrite.convert(GPT(CONFIG), n=N).to(dtype)
    with torch.no_grad():  # off the identity: H_pre, H_post, H_res all differ from stream to stream and token to token
        for name, p in model.named_parameters():
            if name.startswith("mhc."):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _run(stages, x):
    value = x
    for stage in stages:
        value = stage(*value) if isinstance(value, tuple) else stage(value)
    return value


def test_chained_stages_equal_the_unsplit_model_in_float64():
    x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    model = _converted(torch.float64)
    stages = split_stages(model, x, ["h.1", "h.2"])
    got = _run(stages, x)
    want = model(x)
    assert_close(got, want, "float64")
    got.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    want.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad.abs().max() > 0 or name.endswith(".phi"), name  # every gradient reached (phi: a = 0 at init)
        assert_close(grads[name], p.grad, "float64", msg=name)


def test_stages_partition_the_state_dict_and_hold_their_sites():
    model = _converted()
    x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    stages = split_stages(model, x, ["h.2"])
    keys = [set(stage.state_dict()) for stage in stages]
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(model.state_dict())
    assert {k for k in keys[0] if k.startswith("mhc.")} == {k for k in model.state_dict()
                                                          if k.startswith(("mhc.h_0_", "mhc.h_1_"))}
    assert {k for k in keys[1] if k.startswith("mhc.")} == {k for k in model.state_dict() if k.startswith("mhc.h_2_")}
    for stage in stages:  # the same parameters, not copies
        for name, p in stage.named_parameters():
            assert p is model.get_parameter(name)


def test_the_streams_cross_as_one_tensor():
    model = _converted()
    x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    first, second = split_stages(model, x, ["h.1"])
    sent = first(x)
    assert isinstance(sent, torch.Tensor) and sent.shape == (2, CONFIG.block_size, N, CONFIG.n_embd)
    assert len(second.meta["mhc_stage"]["receives"]) == 1


def test_refusals_say_why():
    x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    model = _converted()
    with pytest.raises(MHCRewriteError, match="no node of the converted graph lies inside 'h.7'"):
        split_stages(model, x, ["h.7"])
    with pytest.raises(MHCRewriteError, match="in graph order"):
        split_stages(model, x, ["h.2", "h.1"])
    first, _ = split_stages(model, x, ["h.1"])
    first.eval()
    with pytest.raises(MHCRewriteError, match="train-mode call and is called in eval mode"):
        first(x)

    torch.manual_seed(0)
    tied = GPT(CONFIG)
    tied.lm_head.weight = tied.wte.weight
    with pytest.raises(MHCRewriteError, match="'wte.weight' in stage 0 and 'lm_head.weight' in stage 1"):
        split_stages(mhc_rewrite.convert(tied, n=N), x, ["h.1"])

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    llama = mhc_rewrite.convert(transformers.LlamaForCausalLM(config), n=N, example_inputs={"input_ids": x})
    with pytest.raises(MHCRewriteError, match="region of LlamaForCausalLM is 'model', not the model"):
        split_stages(llama, x, ["model.layers.1"])
