"""Memory and time of a training step with and without ``recompute_streams``, on CPU.

    python benchmarks/recompute_cpu.py [--layers 12] [--width 128] [--batch 16] [--seq 128]

For a converted nanoGPT (n=4) reports, per variant: the bytes saved for backward (unique storages, exact), the
process's peak resident memory (each variant in a fresh subprocess), and the median fwd+bwd step time.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from nanogpt import GPT, GPTConfig  # noqa: E402

import mhc_rewrite  # noqa: E402
from mhc_rewrite.recompute import count_saved_bytes  # noqa: E402


def run(args, variant):
    torch.manual_seed(0)
    model = mhc_rewrite.convert(GPT(GPTConfig(block_size=args.seq, n_layer=args.layers, n_embd=args.width)), n=4)
    idx = torch.randint(0, 256, (args.batch, args.seq + 1))

    def context():
        return mhc_rewrite.recompute_streams(model) if variant == "recompute" else count_saved_bytes()

    def step():
        ctx = context()
        with ctx:
            loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        return ctx

    ctx = step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "kept_MB": ctx.kept_bytes / 1e6, "step_ms": 1e3 * statistics.median(times),
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
            "segment": getattr(ctx, "every", None)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one variant, so that peak RSS is its own
        print(json.dumps(run(args, args.variant)))
        return
    rows = []
    for variant in ("store", "recompute"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], capture_output=True,
                             text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"GPT {args.layers} x {args.width}, batch {args.batch} x {args.seq}, n=4, fp32, CPU")
    print(f"{'variant':<11}{'segment':>8}{'saved for bwd MB':>18}{'peak RSS MB':>13}{'step ms':>10}")
    for r in rows:
        print(f"{r['variant']:<11}{str(r['segment'] or '-'):>8}{r['kept_MB']:>18.1f}{r['peak_rss_MB']:>13.0f}"
              f"{r['step_ms']:>10.1f}")


if __name__ == "__main__":
    main()
