"""A model converted from example inputs of one shape runs at other sequence lengths and batch sizes, as users do.

Converted with (2, 16) token ids, then run at length 8, and at length 24 with batch 3: at identity init it equals
the original model there; with moved mHC parameters it equals the same parameters converted directly at that shape
(the rewrite does not depend on the example's shape), and gradients reach every new parameter.
"""

import copy

import pytest
import torch

import mhc_rewrite

from models import GPT, GPTConfig, hf_gpt2, hf_llama, perturb_mhc
from tolerances import assert_close

BUILDERS = {
    "nanogpt": lambda: GPT(GPTConfig(n_layer=2)),  # block_size 32, vocab 64
    "hf_gpt2": lambda: hf_gpt2(),  # n_positions 32, vocab 96
    "hf_llama": lambda: hf_llama(),  # vocab 96
}
VOCAB = {"nanogpt": 64, "hf_gpt2": 96, "hf_llama": 96}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("shape", [(2, 8), (3, 24)])
def test_other_sequence_lengths_and_batches(name, shape):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    vocab = VOCAB[name]
    converted = mhc_rewrite.convert(model, example_inputs=(torch.randint(0, vocab, (2, 16)),))
    idx = torch.randint(0, vocab, shape)
    with torch.no_grad():
        out = _logits(converted(idx))
        assert out.shape == (*shape, vocab)
        assert_close(out, _logits(model(idx)), "function_at_init")

    torch.manual_seed(1)
    perturb_mhc(converted)
    direct = mhc_rewrite.convert(copy.deepcopy(model), example_inputs=(idx,))
    direct.load_state_dict(converted.state_dict())
    out = _logits(converted(idx))
    assert_close(out, _logits(direct(idx)), "same_math")
    out.float().pow(2).mean().backward()
    silent = [n for n, p in converted.named_parameters() if n.startswith("mhc.") and not p.grad.abs().sum() > 0]
    assert silent == []
