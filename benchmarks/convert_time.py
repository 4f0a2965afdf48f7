"""Conversion time against depth: does the analysis stay linear in the size of the graph?

    python benchmarks/convert_time.py [--layers 12 24 48 96] [--hf]

For examples/nanogpt.py (a pre-norm GPT that torch.fx.symbolic_trace can trace; attention and MLP residuals),
reports the trace time, the time of the passes (find sites, group chains, rewrite) and the total, per depth,
with the graph size. ``--hf`` adds Hugging Face Llama built from config, traced by torch.export.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from nanogpt import GPT, GPTConfig  # noqa: E402

import mhc_rewrite  # noqa: E402
from mhc_rewrite.config import MHCConfig  # noqa: E402
from mhc_rewrite.pipeline import run_pipeline  # noqa: E402
from mhc_rewrite.trace import trace  # noqa: E402


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, example_inputs, repeats=3):
    config = MHCConfig(n=4)

    def passes():
        gm = trace(model, example_inputs)
        start = time.perf_counter()
        run_pipeline(gm, config)
        return gm, time.perf_counter() - start

    trace_s = _median_seconds(lambda: trace(model, example_inputs), repeats)
    pass_s = statistics.median(passes()[1] for _ in range(repeats))
    total_s = _median_seconds(lambda: mhc_rewrite.convert(model, example_inputs=example_inputs), repeats)
    nodes = len(trace(model, example_inputs).graph.nodes)
    return nodes, trace_s, pass_s, total_s


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--hf", action="store_true", help="also Hugging Face Llama through torch.export")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    header = ("model", "layers", "nodes", "trace s", "passes s", "convert s", "passes us/node")
    print(f"{header[0]:<22}" + "".join(f"{h:>{w}}" for h, w in zip(header[1:], (7, 8, 10, 10, 11, 16))))
    rows = [("nanogpt (symbolic)", n, GPT(GPTConfig(n_layer=n)), None) for n in args.layers]
    if args.hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        for n in args.layers:
            cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=n,
                              num_attention_heads=4, num_key_value_heads=2, use_cache=False)
            rows.append(("hf llama (export)", n, LlamaForCausalLM(cfg).eval(), (torch.randint(0, 256, (2, 16)),)))
    for name, layers, model, inputs in rows:
        nodes, trace_s, pass_s, total_s = measure(model, inputs, args.repeats)
        print(f"{name:<22}{layers:>7}{nodes:>8}{trace_s:>10.3f}{pass_s:>10.3f}{total_s:>11.3f}"
              f"{1e6 * pass_s / nodes:>16.1f}")


if __name__ == "__main__":
    main()
