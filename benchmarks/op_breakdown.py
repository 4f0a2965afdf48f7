"""Where a converted model's training step spends its mHC time: wall time of each op's implementation, per step.

    python benchmarks/op_breakdown.py [--shape 6x128x8] [--seq 128] [--steps 5] [--static]

Wraps the Python functions the ``torch.ops.mhc`` ops run (forward and backward, the Sinkhorn and the coefficient
projection inside them) with timers, runs training steps of a converted pre-norm GPT (``examples/nanogpt.py``, one
thread) and prints milliseconds per step for each, next to the whole step. Timers nest: the Sinkhorn and projection
rows are parts of the coefficient rows. What no row holds (the step minus the op rows minus the plain model's step)
is autograd's bookkeeping and gradient accumulation around the ops. Unlike torch.profiler, the timers add no
per-aten-op overhead, so small ops are not inflated.
"""

import argparse
import collections
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from cpu_step import make_step  # noqa: E402  (benchmarks/, the script's folder)
from nanogpt import GPT, GPTConfig  # noqa: E402

import mhc_rewrite  # noqa: E402

TIMED = {
    "mixing": ["pre_mix_ref", "pre_mix_backward_ref", "post_res_mix_ref", "post_res_mix_backward_ref"],
    "coefficients": ["_forward", "coefficients_backward_ref", "projection", "projection_backward",
                     "sinkhorn_forward", "sinkhorn_backward"],
}


def install_timers(totals: collections.Counter) -> None:
    """Replace each function in ``TIMED`` (looked up by the ops at call time) with a timed wrapper."""
    for module_name, names in TIMED.items():
        module = importlib.import_module(f"mhc_rewrite.ops.{module_name}")
        for name in names:
            def timed(*args, _fn=getattr(module, name), _name=name, **kwargs):
                start = time.perf_counter()
                out = _fn(*args, **kwargs)
                totals[_name] += time.perf_counter() - start
                return out
            setattr(module, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="6x128x8", help="LAYERSxWIDTHxBATCH")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--static", action="store_true", help="convert with dynamic=False")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers, width, batch = (int(x) for x in args.shape.split("x"))
    idx = torch.randint(0, 256, (batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    totals = collections.Counter()
    install_timers(totals)
    steps = {}
    for variant in ("plain", "converted"):
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(block_size=args.seq, n_layer=layers, n_embd=width, n_head=4))
        model = gpt if variant == "plain" else mhc_rewrite.convert(gpt, n=4, dynamic=not args.static)
        steps[variant] = make_step(model, idx)
        steps[variant]()
    wall = collections.Counter()
    totals.clear()
    for _ in range(args.steps):
        for variant, step in steps.items():  # interleaved
            start = time.perf_counter()
            step()
            wall[variant] += time.perf_counter() - start
    per_step = {k: 1e3 * v / args.steps for k, v in wall.items()}
    plain, converted = per_step["plain"], per_step["converted"]
    print(f"{args.shape}, seq {args.seq}, {'static' if args.static else 'dynamic'}: plain step {plain:.1f} ms, "
          f"converted {converted:.1f} ms ({converted / plain:.2f}x), extra {converted - plain:.1f} ms")
    print("| function (ops/) | ms per step | % of the extra |")
    print("|---|---|---|")
    extra = converted - plain
    for name, seconds in totals.most_common():
        ms = 1e3 * seconds / args.steps
        print(f"| `{name}` | {ms:.1f} | {100 * ms / extra:.0f} % |")


if __name__ == "__main__":
    main()
