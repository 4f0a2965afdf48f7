"""Main demo: convert a Hugging Face Llama (built from its config, random weights) to mHC and show what changed.

    python examples/convert_llama.py [--layers 4] [--n 4] [--steps 20] [--save outputs.pt]

Prints the residual sites found, the code of one decoder layer before and after the rewrite, the error of
the converted model against the original at init (fp32), and a few training steps of the converted model.
"""

import argparse
import time

import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import mhc_rewrite
from mhc_rewrite.inspect import block_code, sites_table
from mhc_rewrite.trace import trace


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--n", type=int, default=4, help="residual streams (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="training steps to run after converting (default 20)")
    parser.add_argument("--save", help="write the logits at init and the losses to this file (torch.save)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 32))
    print(f"Llama from config: {args.layers} layers, hidden {config.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    start = time.perf_counter()
    converted = mhc_rewrite.convert(model, n=args.n, example_inputs=(ids,))
    seconds = time.perf_counter() - start
    added = sum(p.numel() for name, p in converted.named_parameters() if name.startswith("mhc."))
    print(f"converted in {seconds:.2f} s: {len(converted.mhc_sites)} sites, {added:,} new mHC parameters\n")
    print(sites_table(converted.mhc_sites + converted.mhc_skipped))

    print("\n=== model.layers.0, before (torch.export graph) ===")
    print(block_code(trace(model, (ids,)), "model.layers.0"))
    print("\n=== model.layers.0, after ===")
    print(block_code(converted, "model.layers.0"))

    with torch.no_grad():
        want, got = model(ids).logits, converted(ids).logits
    err = (got - want).abs().max().item()
    print(f"\nmax |converted - original| at init: {err:.3e} (relative {err / want.abs().max().item():.3e})")

    losses = []
    if args.steps:
        print(f"\ntraining the converted model for {args.steps} steps on counting sequences:")
        opt = torch.optim.AdamW(converted.parameters(), lr=3e-3)
        for step in range(args.steps):
            seq = (torch.randint(0, config.vocab_size, (8, 1)) + torch.arange(33)) % config.vocab_size
            loss = F.cross_entropy(converted(seq[:, :-1]).logits.flatten(0, 1), seq[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % 5 == 0 or step == args.steps - 1:
                print(f"  step {step:3d}  loss {loss.item():.3f}")
    if args.save:
        torch.save({"original_logits": want, "converted_logits": got, "losses": losses}, args.save)


if __name__ == "__main__":
    main()
