"""Conversion time against depth: does the analysis stay linear in the size of the graph?

    python benchmarks/convert_time.py [--layers 12 24 48 96] [--hf]

For a pre-norm decoder traced with torch.fx.symbolic_trace (every layer: attention and MLP residuals),
reports the trace time, the time of the passes (find sites, group chains, rewrite) and the total, per depth,
with the graph size. ``--hf`` adds Hugging Face Llama built from config, traced by torch.export.
"""

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import mhc_rewrite
from mhc_rewrite.config import MHCConfig
from mhc_rewrite.passes import find_residual_sites, group_chains, rewrite_mhc
from mhc_rewrite.trace import trace


class Layer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads, self.width = heads, width

    def attention(self, x):  # (B, T, C), traceable without reading sizes
        qkv, w = self.qkv(x), self.width
        q, k, v = (qkv[..., i * w:(i + 1) * w].unflatten(-1, (self.heads, -1)).transpose(1, 2) for i in range(3))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).flatten(-2))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class Decoder(nn.Module):
    def __init__(self, layers: int, width: int = 64, heads: int = 4, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([Layer(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


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
        find_residual_sites(gm)
        group_chains(gm)
        rewrite_mhc(gm, config)
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
    rows = [("decoder (symbolic)", n, Decoder(n), None) for n in args.layers]
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
