"""Training-step time on CPU: a plain GPT against the same GPT with mHC from this library and from two peers.

    python benchmarks/cpu_step.py [--shapes 6x128x8 12x256x4] [--seq 128] [--repeats 7] [--threads 1]
                                  [--variants plain mhc_rewrite lucidrains hf] [--compile] [--out results.json]

A training step is forward + cross-entropy + backward + AdamW on a pre-norm GPT (``examples/nanogpt.py``: LayerNorm,
SDPA attention, GELU MLP). Shapes are LAYERSxWIDTHxBATCH. Variants, all n = 4 streams and 20 Sinkhorn rounds:

- ``plain``: the GPT as written;
- ``mhc_rewrite``: ``mhc_rewrite.convert(gpt, n=4)`` (eager, the library's CPU ops);
- ``lucidrains``: the same GPT with each attention and MLP branch wrapped by the ``hyper-connections`` package's
  mHC module (PyPI ``hyper-connections``; this script installs it with ``pip --target`` into ``--peer-dir`` on first
  use, it is not a dependency of the library);
- ``hf``: the same GPT with ``transformers``' ``DeepseekV4HyperConnection`` around each branch, wired as
  ``DeepseekV4DecoderLayer`` does (streams ``[B, T, n, C]``, reduced by their mean at the end).

With ``--compile``, also ``torch.compile`` of the plain and the converted model (default Inductor, and
``backend="mhc"`` for the converted one), with the seconds of the first compiled step (compilation included;
Inductor's caches are disabled). Steps of all variants are interleaved (one step of each, ``--repeats`` times) and
the median is reported with its ratio to ``plain`` from the same run.
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # first-compile times must include compiling

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from nanogpt import GPT, GPTConfig  # noqa: E402

import mhc_rewrite  # noqa: E402

N_STREAMS = 4
PEER_PACKAGES = ["hyper-connections==0.4.11", "einops==0.8.2", "torch-einops-utils==0.2.0"]


# --- peers wired into the same GPT ----------------------------------------------------------------------------


def import_lucidrains(peer_dir: str):
    """Import ``hyper_connections``, installing it (without its torch requirement) into ``peer_dir`` if needed."""
    sys.path.insert(0, peer_dir)
    try:
        import hyper_connections
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", peer_dir,
                        *PEER_PACKAGES], check=True)
        importlib.invalidate_caches()
        import hyper_connections
    return hyper_connections


class LucidrainsGPT(nn.Module):
    """``GPT``'s modules, each branch wrapped by lucidrains' mHC (streams folded into the batch, reduced by sum)."""

    def __init__(self, gpt: GPT, peer_dir: str):
        super().__init__()
        hc = import_lucidrains(peer_dir)
        init_hc, self.expand, self.reduce = hc.mc_get_init_and_expand_reduce_stream_functions(
            N_STREAMS, dim=gpt.config.n_embd, sinkhorn_iters=20)
        self.gpt = gpt
        self.branches = nn.ModuleList()
        for block in gpt.h:
            self.branches.append(init_hc(branch=nn.Sequential(block.ln_1, block.attn)))
            self.branches.append(init_hc(branch=nn.Sequential(block.ln_2, block.mlp)))

    def forward(self, idx):
        x = self.gpt.wte(idx) + self.gpt.wpe.weight[: idx.shape[1]]
        x = self.expand(x)
        for branch in self.branches:
            x = branch(x)
        return self.gpt.lm_head(self.gpt.ln_f(self.reduce(x)))


class HFStreamsGPT(nn.Module):
    """``GPT``'s modules with ``DeepseekV4HyperConnection`` around each branch, as ``DeepseekV4DecoderLayer``."""

    def __init__(self, gpt: GPT):
        super().__init__()
        from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

        config = DeepseekV4Config(hidden_size=gpt.config.n_embd, hc_mult=N_STREAMS, hc_sinkhorn_iters=20)
        self.gpt = gpt
        self.hcs = nn.ModuleList(DeepseekV4HyperConnection(config) for _ in range(2 * len(gpt.h)))
        for hc in self.hcs:  # DeepseekV4PreTrainedModel._init_weights
            nn.init.normal_(hc.fn, std=0.02)
            nn.init.zeros_(hc.base)
            nn.init.ones_(hc.scale)

    def forward(self, idx):
        x = self.gpt.wte(idx) + self.gpt.wpe.weight[: idx.shape[1]]
        streams = x.unsqueeze(-2).repeat(1, 1, N_STREAMS, 1)  # [B, T, n, C], as DeepseekV4Model does
        for i, block in enumerate(self.gpt.h):
            for hc, branch in ((self.hcs[2 * i], lambda h: block.attn(block.ln_1(h))),
                               (self.hcs[2 * i + 1], lambda h: block.mlp(block.ln_2(h)))):
                post, comb, collapsed = hc(streams)
                out = branch(collapsed)
                streams = post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)
        return self.gpt.lm_head(self.gpt.ln_f(streams.mean(dim=-2)))


# --- timing -----------------------------------------------------------------------------------------------------


def build(variant: str, layers: int, width: int, seq: int, peer_dir: str) -> nn.Module:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=seq, n_layer=layers, n_embd=width, n_head=4))
    if variant == "plain":
        return gpt
    if variant == "lucidrains":
        return LucidrainsGPT(gpt, peer_dir)
    if variant == "hf":
        return HFStreamsGPT(gpt)
    model = mhc_rewrite.convert(gpt, n=N_STREAMS)
    if variant == "mhc_rewrite":
        return model
    raise ValueError(variant)


def make_step(model: nn.Module, idx: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_shape(layers, width, batch, args) -> list[dict]:
    idx = torch.randint(0, 256, (batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    steps, first = {}, {}
    for variant in args.variants:
        steps[variant] = make_step(build(variant, layers, width, args.seq, args.peer_dir), idx)
    if args.compile:
        # one-time costs of the first compile in a process (imports, compiler start-up) are not any model's
        torch.compile(lambda t: (t * 2).sum())(torch.ones(4, requires_grad=True)).backward()
        for name, base, backend in (("compiled plain", "plain", "inductor"),
                                    ("compiled mhc_rewrite", "mhc_rewrite", "inductor"),
                                    ("compiled mhc_rewrite, backend=mhc", "mhc_rewrite", "mhc")):
            torch._dynamo.reset()
            model = torch.compile(build(base, layers, width, args.seq, args.peer_dir), backend=backend)
            steps[name] = make_step(model, idx)
            start = time.perf_counter()
            steps[name]()  # compiles forward and backward
            first[name] = time.perf_counter() - start
    for step in steps.values():  # warm-up (allocator, lazy init)
        step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        rows.append({"shape": f"{layers}x{width}", "batch": batch, "variant": name, "median_ms": ms,
                     "min_ms": 1e3 * min(ts), "first_step_s": first.get(name)})
    for row in rows:
        base = "compiled plain" if row["variant"].startswith("compiled") else "plain"
        row["ratio"] = row["median_ms"] / next(r["median_ms"] for r in rows if r["variant"] == base)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["6x128x8", "12x256x4"], help="LAYERSxWIDTHxBATCH")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["plain", "mhc_rewrite", "lucidrains", "hf"])
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows")
    parser.add_argument("--peer-dir", default=os.path.expanduser("~/.cache/mhc_rewrite_bench/peers"))
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | batch | variant | median ms | min ms | x plain | first compiled step s |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        layers, width, batch = (int(v) for v in shape.split("x"))
        for row in run_shape(layers, width, batch, args):
            rows.append(row)
            first = "" if row["first_step_s"] is None else f"{row['first_step_s']:.1f}"
            print(f"| {row['shape']} | {row['batch']} | {row['variant']} | {row['median_ms']:.0f} | {row['min_ms']:.0f}"
                  f" | {row['ratio']:.2f} | {first} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                       "threads": args.threads, "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
