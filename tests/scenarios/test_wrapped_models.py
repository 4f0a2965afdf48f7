"""Hugging Face models whose key-value cache is not switched off by an argument of the forward that convert() traces.

A model wrapped before conversion (PEFT's ``get_peft_model``: ``PeftModel.forward(**kwargs)`` over a ``LoraModel``
over the causal LM) and a causal LM that takes ``use_cache`` only through ``**kwargs`` (GraniteMoe) both made a
``DynamicCache`` in the traced output, which torch.export refuses (``TraceError`` at convert). Each is converted as
loaded (cache on in its config) and compared with a deep copy of the original: eval logits, the training loss with
``labels=`` and the gradients of every trainable parameter after one ``loss.backward()``.
"""

import copy

import pytest
import torch

import mhc_rewrite

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")

TOL = 1e-5  # fp32 relative error of a converted model at identity init (README; measured <= 2e-7 here)
VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def lora_llama():
    peft = pytest.importorskip("peft", reason="the dev extra installs peft")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; random B makes the LoRA path part of the function compared
            torch.nn.init.normal_(p, std=0.02)
    return wrapped


def granite_moe():
    return transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(**SMALL, num_local_experts=4,
                                                                            num_experts_per_tok=2))


@pytest.mark.parametrize("make", [lora_llama, granite_moe], ids=["peft-lora-then-convert", "granite-moe"])
def test_converts_and_trains_like_the_original(make):
    torch.manual_seed(0)
    original = make()
    assert original.config.use_cache  # as loaded
    reference = copy.deepcopy(original)
    ids = torch.randint(3, VOCAB, (2, 12))
    converted = mhc_rewrite.convert(original, example_inputs={"input_ids": ids})  # TraceError before the fix
    assert converted.mhc_sites and not converted.mhc_skipped

    converted.eval(), reference.eval()
    with torch.no_grad():
        assert rel_err(converted(input_ids=ids).logits, reference(input_ids=ids).logits) <= TOL

    converted.train(), reference.train()
    loss, want = converted(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - want.item()) <= TOL * abs(want.item())
    loss.backward()
    want.backward()
    trainable = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    if make is lora_llama:
        assert trainable and all("lora_" in name for name in trainable)  # PEFT froze the base model
    for name, p in trainable.items():
        assert rel_err(converted.get_parameter(name).grad, p.grad) <= TOL, name
    mhc = [p for name, p in converted.named_parameters() if ".mhc." in name]
    assert mhc and all(p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all() for p in mhc)
    assert any(p.grad.abs().sum() > 0 for p in mhc)
    assert original.config.use_cache  # convert switched the cache off only while it traced
