"""Greedy generation with the key-value cache: a converted Llama against the original (issue 22).

A small Llama built from its config (random weights, no download): prompt of 16 tokens, 128 and 512 new tokens,
greedy, batch 1. The decode time per token is (time of generate(N) - time of generate(1)) / (N - 1), so the
prefill is left out; both models run in the same process, alternately, best of the repeats. Also printed: the
converted model's traces during the timed calls (0 once both specialisations exist) and whether its tokens equal
the original's.

    .venv/bin/python benchmarks/generate_speed.py [--hidden 256] [--layers 4] [--repeats 3] [--threads 1]
        [--device cuda] [--dtype bfloat16] [--lower] [--tokens 128 512]

On a GPU (``--device cuda``) add ``--lower``: the converted model then runs the fused Triton ops (two kernels per
site), as a user's GPU model would; without it each Sinkhorn round is its own kernel launches.
"""

import argparse
import time

import torch
import transformers

import mhc_rewrite
from mhc_rewrite.region import region_state


def best_time(model, ids, new_tokens, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        if ids.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lower", action="store_true", help="run the converted model on the fused Triton ops")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="new tokens per timed generate")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024)
    original = transformers.LlamaForCausalLM(config).eval().to(args.device, getattr(torch, args.dtype))
    ids = torch.randint(0, 1000, (1, 16), device=args.device)
    converted = mhc_rewrite.convert(original, n=4, example_inputs={"input_ids": ids})
    if args.lower:
        mhc_rewrite.lower(converted)
    best_time(converted, ids, 2, 1)  # the two specialisations (prefill, decode) are traced here
    traces = region_state(converted).traces
    print(f"Llama hidden {args.hidden}, {args.layers} layers, prompt 16, n=4, {args.device} {args.dtype}"
          f"{' lowered' if args.lower else ''}, {torch.get_num_threads()} threads; traces to warm up: {traces}")
    print(f"{'new tokens':>10} | {'original ms/token':>17} | {'converted ms/token':>18} | {'ratio':>5} | "
          f"{'tokens equal':>12} | traces")
    with torch.no_grad():
        one = {name: best_time(model, ids, 1, args.repeats)[0] for name, model in
               (("original", original), ("converted", converted))}
        for new_tokens in args.tokens:
            t_orig, want = best_time(original, ids, new_tokens, args.repeats)
            t_conv, got = best_time(converted, ids, new_tokens, args.repeats)
            per_orig = (t_orig - one["original"]) / (new_tokens - 1) * 1e3
            per_conv = (t_conv - one["converted"]) / (new_tokens - 1) * 1e3
            print(f"{new_tokens:>10} | {per_orig:>17.3f} | {per_conv:>18.3f} | {per_conv / per_orig:>5.2f} | "
                  f"{str(torch.equal(got, want)):>12} | {region_state(converted).traces - traces}")


if __name__ == "__main__":
    main()
