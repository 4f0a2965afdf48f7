"""Reproduce the mHC paper's stability comparison at small scale, on CPU: plain residual vs HC vs mHC.

    python examples/stability.py --out results/stability            # full run (about 12 minutes on 2 cores)
    python examples/stability.py --quick --out /tmp/stability        # smoke run (under a minute)
    python examples/stability.py --stress --out results/stability_stress   # lr 3e-2, 8 layers, all five variants

One deep, narrow GPT is built once; the three variants are made from it by this library: the plain model
(``baseline``), ``convert(mode="hc")`` (unconstrained hyper-connections) and ``convert(mode="mhc")``. Every variant
starts from the same weights (the conversions are function-preserving), sees the same batches in the same order,
and trains with the same optimiser, learning rate and number of steps. The data is character-level (bytes) text:
the Python standard library's own source files, which every machine with Python has, split into train and
held-out parts. Recorded per variant: training and validation loss, gradient norm, and the forward/backward
Amax gain of the composite residual map (``mhc_rewrite.stream_diagnostics`` on a fixed held-out batch).
Writes ``results.json`` and ``stability.png`` into ``--out``.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanogpt import GPT, GPTConfig  # noqa: E402

import mhc_rewrite  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a comfort, not a requirement
    def tqdm(iterable, **_):
        return iterable

# variant -> convert() options (None: the plain model)
VARIANT_OPTIONS = {
    "baseline": None,
    "hc": {"mode": "hc"},
    "mhc": {},
    "mhc_lite": {"constraint": "permutations"},  # mHC-lite: a softmax over the n! permutation matrices
    "mhc_learned": {"collapse": "learned"},  # a learned per-token gate at the chain's exit, not the mean
}
VARIANTS = ("baseline", "hc", "mhc")
STRESS_VARIANTS = tuple(VARIANT_OPTIONS)
# the stress setting: the learning rate 5x the default's (where a first 12-layer run saw HC's gradient norm reach
# 204 against mHC's 8.9), every mHC variant, no gradient clipping (as everywhere here). Removing the norms
# (--no-block-norm, --no-final-norm) broke the plain model first in short probes (RESULTS.md).
STRESS = {"layers": 8, "width": 64, "lr": 3e-2, "steps": 160, "eval_every": 20}
SPIKE_NATS = 1.0  # a step whose loss is this far above the median of the previous 20 counts as a spike


def stdlib_text(max_bytes: int) -> torch.Tensor:
    """The bytes of the standard library's .py files (sorted, so every machine reads them in one order)."""
    root = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, steps: int, batch: int, block: int, seed: int):
    """The same sequence of random windows for every variant."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        window = torch.stack([data[s:s + block + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def loss_of(model, x, y):
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model, val_batches):
    return sum(loss_of(model, x, y).item() for x, y in val_batches) / len(val_batches)


def count_spikes(losses, window=20):
    """Steps whose loss is more than ``SPIKE_NATS`` above the median of the ``window`` steps before."""
    spikes = 0
    for i in range(window, len(losses)):
        previous = sorted(losses[i - window:i])
        if losses[i] > previous[window // 2] + SPIKE_NATS:
            spikes += 1
    return spikes


def build_model(variant, args):
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=args.block, n_layer=args.layers, n_embd=args.width, n_head=args.heads)
    model = GPT(config)
    if args.no_block_norm:  # stress: the branches read the raw stream
        for block in model.h:
            block.ln_1, block.ln_2 = torch.nn.Identity(), torch.nn.Identity()
    if args.no_final_norm:  # stress: the head reads the raw stream
        model.ln_f = torch.nn.Identity()
    options = VARIANT_OPTIONS[variant]
    if options is not None:
        model = mhc_rewrite.convert(model, n=args.n, **options)
    return model.to(getattr(torch, args.dtype))  # bfloat16: weights, activations and streams all in bf16


def train_variant(variant, args, train, val_batches, probe):
    model = build_model(variant, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    log = {"step": [], "train_loss": [], "grad_norm": [], "eval_step": [], "val_loss": [],
           "amax_forward": [], "amax_backward": []}
    start, train_seconds = time.perf_counter(), 0.0
    bar = tqdm(enumerate(batches(train, args.steps, args.batch, args.block, args.seed)), total=args.steps,
               desc=f"{variant:>8}", leave=True)
    for step, (x, y) in bar:
        model.train()
        tick = time.perf_counter()
        loss = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()  # measure, no clip
        opt.step()
        sched.step()
        train_seconds += time.perf_counter() - tick
        log["step"].append(step)
        log["train_loss"].append(loss.item())
        log["grad_norm"].append(grad_norm)
        if step % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            log["eval_step"].append(step)
            log["val_loss"].append(evaluate(model, val_batches))
            if variant == "baseline":  # a plain residual's map is the identity: gain 1
                forward = backward = 1.0
            else:
                forward, backward = mhc_rewrite.stream_diagnostics(model, probe).max_gain()
            log["amax_forward"].append(forward)
            log["amax_backward"].append(backward)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{log['val_loss'][-1]:.3f}", amax=f"{forward:.2f}")
        if not math.isfinite(loss.item()):
            print(f"{variant}: loss is {loss.item()} at step {step}; stopping this variant")
            break
    tail = log["train_loss"][-max(1, args.steps // 20):]
    finite = [x for x in log["train_loss"] if math.isfinite(x)]
    summary = {
        "diverged_at": None if math.isfinite(log["train_loss"][-1]) else log["step"][-1],
        "loss_spikes": count_spikes(finite),
        "max_train_loss_after_warmup": max(finite[warmup:], default=float("nan")),
        "ms_per_step": 1000 * train_seconds / len(log["step"]),  # forward, backward, optimiser; no evaluation
        "final_train_loss": sum(tail) / len(tail),
        "final_val_loss": log["val_loss"][-1],
        "max_amax_forward": max(log["amax_forward"]),
        "max_amax_backward": max(log["amax_backward"]),
        "max_grad_norm": max(log["grad_norm"]),
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return summary, log


def plot(curves, path):
    """The four panels of the comparison, from the per-variant curves of ``results.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    for color, (variant, log) in zip(("C0", "C1", "C2", "C3", "C4"), curves.items()):
        smooth = max(1, len(log["train_loss"]) // 50)
        train = [sum(log["train_loss"][max(0, i - smooth):i + 1]) / len(log["train_loss"][max(0, i - smooth):i + 1])
                 for i in range(len(log["train_loss"]))]
        axes[0, 0].plot(log["step"], train, color=color, label=variant)
        axes[0, 1].plot(log["eval_step"], log["val_loss"], color=color, marker="o", markersize=3, label=variant)
        axes[1, 0].plot(log["step"], log["grad_norm"], color=color, label=variant, linewidth=0.8)
        axes[1, 1].plot(log["eval_step"], log["amax_forward"], color=color, marker="o", markersize=3,
                        label=f"{variant} forward")
        axes[1, 1].plot(log["eval_step"], log["amax_backward"], color=color, linestyle="--",
                        label=f"{variant} backward")
    for ax, title in zip(axes.flat, ("training loss (smoothed)", "validation loss", "gradient norm",
                                     "Amax gain of the composite H_res")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1, 0].set_yscale("log")
    axes[1, 1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for results.json and stability.png")
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke tests (under a minute)")
    parser.add_argument("--stress", action="store_true",
                        help=f"the stress setting {STRESS} with every variant of {STRESS_VARIANTS}")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANT_OPTIONS), default=None,
                        help=f"which variants to train (default {VARIANTS}; with --stress all)")
    parser.add_argument("--no-block-norm", action="store_true", help="replace the blocks' LayerNorms by identities")
    parser.add_argument("--no-final-norm", action="store_true", help="replace ln_f by an identity")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: the whole model (parameters, activations, streams) in bf16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--layers", type=int, default=24, help="transformer blocks (2 residual sites each)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="streams for hc and mhc")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=64, help="sequence length")
    parser.add_argument("--lr", type=float, default=6e-3, help="high on purpose: the comparison is about stability")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--data-bytes", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", action="store_true", help="redraw stability.png from --out/results.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        saved = json.loads((out / "results.json").read_text())
        plot(saved["curves"], out / "stability.png")
        print_table({variant: saved[variant] for variant in saved["curves"]})
        return
    if args.stress:
        vars(args).update(STRESS)
    variants = tuple(args.variants or (STRESS_VARIANTS if args.stress else VARIANTS))
    if args.quick:
        args.layers, args.steps, args.eval_every, args.data_bytes, args.batch = 4, 12, 6, 200_000, 8

    torch.set_num_threads(args.threads)
    data = stdlib_text(args.data_bytes)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    val_batches = list(batches(val, 4, args.batch, args.block, seed=1234))
    probe = val_batches[0][0][:4]
    print(f"data: {len(data):,} bytes of the standard library ({len(train):,} train / {len(val):,} held out); "
          f"GPT {args.layers} layers x {args.width} wide, lr {args.lr}, {args.steps} steps")

    results = {variant: train_variant(variant, args, train, val_batches, probe) for variant in variants}
    out.mkdir(parents=True, exist_ok=True)
    summary = {variant: s for variant, (s, _) in results.items()}
    (out / "results.json").write_text(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        **summary,
        "curves": {variant: log for variant, (_, log) in results.items()},
    }, indent=1))
    plot({variant: log for variant, (_, log) in results.items()}, out / "stability.png")
    print_table(summary)
    print(f"wrote {out / 'results.json'} and {out / 'stability.png'}")


def print_table(summary):
    print(f"\n{'variant':<12}{'train':>8}{'val':>8}{'amax fwd':>12}{'amax bwd':>12}{'max |g|':>10}{'spikes':>8}"
          f"{'ms/step':>9}")
    for variant, s in summary.items():
        print(f"{variant:<12}{s['final_train_loss']:>8.3f}{s['final_val_loss']:>8.3f}{s['max_amax_forward']:>12.4g}"
              f"{s['max_amax_backward']:>12.4g}{s['max_grad_norm']:>10.2f}{s.get('loss_spikes', 0):>8}"
              f"{s.get('ms_per_step', float('nan')):>9.0f}")


if __name__ == "__main__":
    main()
