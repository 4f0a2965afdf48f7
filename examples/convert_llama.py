"""Main demo: convert a Hugging Face Llama (built from its config, random weights) to mHC and show what changed.

    python examples/convert_llama.py [--layers 4] [--n 4] [--steps 20] [--save outputs.pt]

The model is built as users load one (default config: key-value cache on). Prints the residual sites found,
the code of one decoder layer before and after the rewrite, the error of the converted model against the
original at init (fp32), greedy generation from both, and a few training steps with ``labels=``.
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mhc_rewrite
from mhc_rewrite.convert import trace_unconverted
from mhc_rewrite.inspect import block_code, sites_table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--n", type=int, default=4, help="residual streams (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="training steps to run after converting (default 20)")
    parser.add_argument("--save", help="write the logits at init and the losses to this file (torch.save)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 32))
    print(f"Llama from config: {args.layers} layers, hidden {config.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    start = time.perf_counter()
    converted = mhc_rewrite.convert(model, n=args.n, example_inputs=(ids,))
    seconds = time.perf_counter() - start
    added = sum(p.numel() for name, p in converted.named_parameters() if ".mhc." in name)
    print(f"converted in {seconds:.2f} s: {len(converted.mhc_sites)} sites, {added:,} new mHC parameters; "
          f"still a {type(converted).__name__}, its {type(converted.model).__name__} now runs mHC\n")
    print(sites_table(converted.mhc_sites + converted.mhc_skipped))

    print("\n=== model.layers.0, before (torch.export graph) ===")
    print(block_code(trace_unconverted(model, (ids,)), "model.layers.0"))
    print("\n=== model.layers.0, after ===")
    print(block_code(mhc_rewrite.converted_graph(converted, ids), "model.layers.0"))

    with torch.no_grad():
        want, got = model(ids).logits, converted(ids).logits
    err = (got - want).abs().max().item()
    print(f"\nmax |converted - original| at init: {err:.3e} (relative {err / want.abs().max().item():.3e})")
    prompt = ids[:1, :8]
    same = torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False),
                       converted.generate(prompt, max_new_tokens=8, do_sample=False))
    print(f"greedy generate(), 8 new tokens: {'the same tokens as the original' if same else 'DIFFERENT tokens'}")

    losses = []
    if args.steps:
        print(f"\ntraining the converted model for {args.steps} steps on counting sequences:")
        converted.train()
        opt = torch.optim.AdamW(converted.parameters(), lr=3e-3)
        for step in range(args.steps):
            seq = (torch.randint(0, config.vocab_size, (8, 1)) + torch.arange(33)) % config.vocab_size
            loss = converted(input_ids=seq, labels=seq).loss  # the model's own loss, as with Trainer
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
