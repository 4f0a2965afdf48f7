"""What a new specialisation costs: converting an HF Llama as loaded, and re-tracing its region for a new mode.

    python benchmarks/retrace_cost.py [--layers 2 32]

For each depth: ``convert`` (the analysis trace + the region's parameters), the first call in train mode (the
region traced and rewritten for it, then run), a second train call (cached), and the first eval call (a new
specialisation: traced again). The re-trace cost is the first eval call minus a cached eval call.
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mhc_rewrite


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    args = parser.parse_args()
    print("| layers | convert s | first train call s | cached train call s | first eval call s | cached eval call s "
          "| re-trace s |")
    print("|---|---|---|---|---|---|---|")
    for layers in args.layers:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, 256, (2, 32))
        convert = timed(lambda: setattr(main, "converted", mhc_rewrite.convert(model, example_inputs=(ids,))))
        converted = main.converted.train()
        first_train = timed(lambda: converted(input_ids=ids, labels=ids))
        cached_train = timed(lambda: converted(input_ids=ids, labels=ids))
        converted.eval()
        first_eval = timed(lambda: converted(input_ids=ids))
        cached_eval = timed(lambda: converted(input_ids=ids))
        print(f"| {layers} | {convert:.2f} | {first_train:.2f} | {cached_train:.3f} | {first_eval:.2f} | "
              f"{cached_eval:.3f} | {first_eval - cached_eval:.2f} |")


if __name__ == "__main__":
    main()
