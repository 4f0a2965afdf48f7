"""Architectures a new user converts train, as converted (issue 21): mixture-of-experts blocks get mHC whatever
dispatches their experts, and export-path models (buffers updated in place, copies, strided views) train.

Each test builds a small model (an in-repo one, or a Hugging Face one from a small config with random weights),
converts it with default options as loaded, and compares it with the original in eval and train mode; then one
training step: the loss goes backward and every mHC parameter gets a gradient.
"""

import pytest
import torch

import mhc_rewrite

from models import LoopMoE, MoENet, ScatterMoE
from tolerances import assert_close

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")

VOCAB = 96


def mixtral():
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(config)


def qwen2_moe():
    config = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.Qwen2MoeForCausalLM(config)


def deepseek_v3():
    """MoE (the second layer; the first is dense) with multi-head latent attention."""
    config = transformers.DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                           topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                           max_position_embeddings=64)
    return transformers.DeepseekV3ForCausalLM(config)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def check_trains(original, converted, inputs: dict, loss_of) -> None:
    """Eval and train outputs equal the original's (function kept at init), and one training step sends a
    gradient to every mHC parameter."""
    for train in (False, True):
        original.train(train), converted.train(train)
        with torch.no_grad():
            assert_close(_logits(converted(**inputs)), _logits(original(**inputs)), "function_at_init",
                         msg=f"train={train}")
    loss = loss_of(converted(**inputs))
    loss.backward()
    mhc = {name: p for name, p in converted.named_parameters() if "mhc." in name}
    assert mhc and all(p.grad is not None for p in mhc.values()), [n for n, p in mhc.items() if p.grad is None]
    assert torch.isfinite(loss)


# --- mixture of experts: the expert block maps each token's hidden vector to a hidden vector ----------------------


MOE = {
    "loop_index_add": (lambda: MoENet(LoopMoE), "moe"),  # a Python loop over the experts, index_add_ back
    "scatter_gather": (lambda: MoENet(ScatterMoE), "moe"),  # scattered into expert slots, gathered back
    "mixtral": (mixtral, "mlp"),  # transformers' experts: sorted by expert, grouped matmul
    "qwen2_moe": (qwen2_moe, "mlp"),  # the same, beside a shared expert
    "deepseek_v3": (deepseek_v3, "mlp"),  # its attention writes into a slice: a functional aten.copy (no derivative)
}


@pytest.mark.parametrize("name", list(MOE))
def test_moe_expert_blocks_get_mhc_and_train(name):
    build, expert_block = MOE[name]
    torch.manual_seed(0)
    original = build()
    ids = torch.randint(0, 64, (2, 8))
    converted = mhc_rewrite.convert(original, example_inputs=(ids,))
    experts = [s for s in converted.mhc_sites + converted.mhc_skipped if s.module_path.endswith(expert_block)]
    assert experts and all(s.rewritten and s.channel_dim == -1 for s in experts), \
        [(s.module_path, s.skip_reason) for s in experts]
    if isinstance(original, MoENet):
        check_trains(original, converted, {"idx": ids}, lambda out: out.square().mean())
    else:
        check_trains(original, converted, {"input_ids": ids, "labels": ids}, lambda out: out.loss)
