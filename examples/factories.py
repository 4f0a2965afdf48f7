"""Model factories for ``python -m mhc_rewrite inspect examples/factories.py:tiny_llama --out out/``.

A factory returns a model, or ``(model, example_inputs)``.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama():
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(config).eval(), (torch.randint(0, 256, (2, 32)),)


def tiny_gpt2():
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), (torch.randint(0, 256, (2, 32)),)
