"""Retrofit mHC onto an already-trained model: does it keep improving, with no loss jump at conversion?

    python examples/retrofit.py --out results/retrofit            # full run (9 minutes on a busy 2-core machine)
    python examples/retrofit.py --quick --out /tmp/retrofit        # smoke run (under a minute)

Per seed: a plain GPT (``examples/nanogpt.py``) trains ``--pre-steps`` (K) steps on byte-level text (the
standard library's source, as in ``examples/stability.py``). From that checkpoint it continues ``--steps`` (M)
more steps four ways, on the same batches in the same order:

- ``plain``: the checkpoint itself, continued;
- ``identity``: ``mhc_rewrite.convert(checkpoint, init="identity")``, which computes the checkpoint's function;
- ``paper``: ``mhc_rewrite.convert(checkpoint, init="paper")`` (the paper's ``a = 0.01, b = 0``: not
  function-preserving);
- ``scratch``: for reference, an mHC model converted at initialisation and trained K + M steps on the same data.

Each continuation starts a fresh AdamW (the same for all, with a short warm-up). The new mHC parameters are
the converted model's parameters that the checkpoint does not have; ``--mhc-lr-mult`` scales their learning
rate through an ordinary optimiser parameter group (no library option is involved).
Recorded per seed and variant: the validation loss just before and just after conversion, training and
validation loss at every evaluation (step K appears twice in a continuation's curves: the checkpoint, then
the converted model), and the Amax gains of the composite ``H_res``. Writes ``results.json``
and ``retrofit.png`` into ``--out``.
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanogpt import GPT, GPTConfig  # noqa: E402
from stability import batches, evaluate, loss_of, stdlib_text  # noqa: E402

import mhc_rewrite  # noqa: E402

VARIANTS = ("plain", "identity", "paper", "scratch")
COLORS = {"plain": "C0", "identity": "C2", "paper": "C3", "scratch": "C1"}


def make_optimizer(model, base_params, args):
    """AdamW; the parameters the plain model does not have (the new mHC ones) get ``lr * mhc_lr_mult``."""
    known = {id(p) for p in base_params}
    old = [p for p in model.parameters() if id(p) in known]
    new = [p for p in model.parameters() if id(p) not in known]
    groups = [{"params": old, "lr": args.lr}]
    if new:
        groups.append({"params": new, "lr": args.lr * args.mhc_lr_mult})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    return opt, sched


def gains(model, probe, converted):
    if not converted:  # a plain residual's map is the identity
        return 1.0, 1.0
    return mhc_rewrite.stream_diagnostics(model, probe).max_gain()


def train(model, base_params, data, first_step, args, val_batches, probe, converted, log):
    """Train on ``data`` (a list of batches), evaluating every ``eval_every`` global steps; appends to ``log``."""
    opt, sched = make_optimizer(model, base_params, args)
    for i, (x, y) in enumerate(data):
        step = first_step + i
        model.train()
        loss = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log["step"].append(step)
        log["train_loss"].append(loss.item())
        if (step + 1) % args.eval_every == 0 or i == len(data) - 1:
            model.eval()
            forward, backward = gains(model, probe, converted)
            log["eval_step"].append(step + 1)
            log["val_loss"].append(evaluate(model, val_batches))
            log["amax_forward"].append(forward)
            log["amax_backward"].append(backward)
    return log


def new_log():
    return {"step": [], "train_loss": [], "eval_step": [], "val_loss": [], "amax_forward": [], "amax_backward": []}


def run_seed(seed, args, train_data, val_batches, probe):
    config = GPTConfig(block_size=args.block, n_layer=args.layers, n_embd=args.width, n_head=args.heads)
    pre = list(batches(train_data, args.pre_steps, args.batch, args.block, seed))
    post = list(batches(train_data, args.steps, args.batch, args.block, seed + 10_000))
    out = {}

    torch.manual_seed(seed)
    base = GPT(config)
    init_state = copy.deepcopy(base.state_dict())
    start = time.perf_counter()
    pre_log = train(base, list(base.parameters()), pre, 0, args, val_batches, probe, False, new_log())
    pre_seconds = time.perf_counter() - start
    base.eval()
    before = evaluate(base, val_batches)
    print(f"seed {seed}: plain after {args.pre_steps} steps: val {before:.4f} ({pre_seconds:.0f} s)", flush=True)

    for variant in [v for v in ("plain", "identity", "paper") if v in args.variants]:
        torch.manual_seed(seed + 1)  # the new parameters' random phi
        model = copy.deepcopy(base)
        base_params = list(model.parameters())
        if variant != "plain":
            model = mhc_rewrite.convert(model, n=args.n, init=variant)
        model.eval()
        after = evaluate(model, val_batches)
        forward, backward = gains(model, probe, variant != "plain")
        log = copy.deepcopy(pre_log)
        log["val_loss"].append(after)  # the conversion point, recorded at step K
        log["eval_step"].append(args.pre_steps)
        log["amax_forward"].append(forward)
        log["amax_backward"].append(backward)
        start = time.perf_counter()
        train(model, base_params, post, args.pre_steps, args, val_batches, probe, variant != "plain", log)
        out[variant] = {"loss_before_conversion": before, "loss_after_conversion": after, "jump": after - before,
                        "final_val_loss": log["val_loss"][-1], "seconds": time.perf_counter() - start,
                        "curves": log}
        print(f"seed {seed}: {variant:>8}: jump {after - before:+.2e}, final val {log['val_loss'][-1]:.4f} "
              f"({out[variant]['seconds']:.0f} s)", flush=True)
    if "scratch" not in args.variants:
        return out

    torch.manual_seed(seed)
    model = GPT(config)
    model.load_state_dict(init_state)
    base_params = list(model.parameters())
    torch.manual_seed(seed + 1)
    model = mhc_rewrite.convert(model, n=args.n)
    start = time.perf_counter()
    log = new_log()
    # one continuous run: warm-up once, then the same K + M batches the others saw
    train(model, [], pre + post, 0, args, val_batches, probe, True, log)
    at_k = log["val_loss"][log["eval_step"].index(args.pre_steps)] if args.pre_steps in log["eval_step"] else None
    out["scratch"] = {"loss_before_conversion": None, "loss_after_conversion": None, "jump": None,
                      "val_loss_at_k": at_k, "final_val_loss": log["val_loss"][-1],
                      "seconds": time.perf_counter() - start, "curves": log}
    print(f"seed {seed}:  scratch: final val {log['val_loss'][-1]:.4f} ({out['scratch']['seconds']:.0f} s)",
          flush=True)
    return out


def plot(results, args, path):
    """Validation loss (all steps, and the continuation relative to ``plain``), training loss and Amax gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    k = args.pre_steps
    for s, seed in enumerate(results):
        runs = results[seed]
        plain = dict(zip(runs["plain"]["curves"]["eval_step"], runs["plain"]["curves"]["val_loss"]))
        for variant in runs:
            c = runs[variant]["curves"]
            label = variant if s == 0 else None
            axes[0, 0].plot(c["eval_step"], c["val_loss"], color=COLORS[variant], label=label, linewidth=0.9)
            pairs = [(st, v - plain[st]) for st, v in zip(c["eval_step"], c["val_loss"]) if st >= k and st in plain]
            axes[0, 1].plot([p[0] for p in pairs], [p[1] for p in pairs], color=COLORS[variant], label=label,
                            marker="o", markersize=2.5, linewidth=0.9)
            plain_train = dict(zip(runs["plain"]["curves"]["step"], runs["plain"]["curves"]["train_loss"]))
            steps = [st for st in c["step"] if st >= k]  # the same batches in every variant after step K
            diff = [loss - plain_train[st] for st, loss in zip(c["step"], c["train_loss"]) if st >= k]
            width = max(1, len(diff) // 10)
            smooth = [sum(diff[max(0, i - width):i + 1]) / len(diff[max(0, i - width):i + 1]) for i in range(len(diff))]
            axes[1, 0].plot(steps, smooth, color=COLORS[variant], label=label, linewidth=0.8)
            axes[1, 1].plot(c["eval_step"], c["amax_forward"], color=COLORS[variant], label=label, linewidth=0.9)
            axes[1, 1].plot(c["eval_step"], c["amax_backward"], color=COLORS[variant], linestyle="--",
                            linewidth=0.9)
    titles = ("validation loss (every seed)", "validation loss minus plain's, after the conversion",
              "training loss minus plain's, same batches (running mean)",
              "Amax gain of the composite H_res (--- backward)")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.axvline(k, color="grey", linewidth=0.6, linestyle=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 1].axhline(0.0, color="C0", linewidth=0.6)
    axes[1, 0].axhline(0.0, color="C0", linewidth=0.6)
    axes[1, 1].ticklabel_format(axis="y", useOffset=False)
    fig.suptitle(f"retrofit: plain GPT {args.layers}x{args.width} trained {k} steps, then {args.steps} more "
                 f"(n={args.n}, lr {args.lr}, mHC lr x{args.mhc_lr_mult})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarise(results):
    """Per variant, across seeds: mean final validation loss, mean difference from plain, largest |jump|."""
    table = {}
    for variant in next(iter(results.values())):
        finals = [results[s][variant]["final_val_loss"] for s in results]
        deltas = [results[s][variant]["final_val_loss"] - results[s]["plain"]["final_val_loss"] for s in results]
        jumps = [abs(results[s][variant]["jump"]) for s in results if results[s][variant]["jump"] is not None]
        table[variant] = {"mean_final_val_loss": sum(finals) / len(finals),
                          "mean_minus_plain": sum(deltas) / len(deltas), "deltas_minus_plain": deltas,
                          "below_plain_in_seeds": sum(d < 0 for d in deltas),
                          "max_abs_jump": max(jumps) if jumps else None}
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for results.json and retrofit.png")
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke tests (under a minute)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="streams")
    parser.add_argument("--pre-steps", type=int, default=200, help="K: plain training before the conversion")
    parser.add_argument("--steps", type=int, default=200, help="M: steps after the conversion")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=64, help="sequence length")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mhc-lr-mult", type=float, default=1.0, help="learning-rate factor of the new parameters")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps of every (fresh) optimiser")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which continuations to run (plain is always run: the others are compared to it)")
    parser.add_argument("--data-bytes", type=int, default=2_000_000)
    parser.add_argument("--plot-only", action="store_true", help="redraw retrofit.png from --out/results.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        saved = json.loads((out / "results.json").read_text())
        vars(args).update(saved["config"])
        plot(saved["seeds"], args, out / "retrofit.png")
        return
    if args.quick:
        args.layers, args.pre_steps, args.steps, args.eval_every = 1, 8, 8, 4
        args.batch, args.block, args.warmup, args.data_bytes = 8, 32, 2, 200_000

    args.variants = ["plain"] + [v for v in args.variants if v != "plain"]
    torch.set_num_threads(args.threads)
    data = stdlib_text(args.data_bytes)
    split = int(0.9 * len(data))
    train_data, val = data[:split], data[split:]
    val_batches = list(batches(val, 4, args.batch, args.block, seed=1234))
    probe = val_batches[0][0][:4]
    print(f"GPT {args.layers} x {args.width}, K={args.pre_steps} + M={args.steps} steps, seeds {args.seeds}",
          flush=True)
    start = time.perf_counter()
    results = {str(seed): run_seed(seed, args, train_data, val_batches, probe) for seed in args.seeds}
    summary = summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot_only")},
        "seconds": time.perf_counter() - start, "summary": summary, "seeds": results}, indent=1))
    plot(results, args, out / "retrofit.png")
    for variant, row in summary.items():
        jump = "" if row["max_abs_jump"] is None else f", max |jump| {row['max_abs_jump']:.2e}"
        print(f"{variant:>8}: final val {row['mean_final_val_loss']:.4f} (minus plain {row['mean_minus_plain']:+.4f}, "
              f"below plain in {row['below_plain_in_seeds']}/{len(results)} seeds{jump})")
    print(f"wrote {out / 'results.json'} and {out / 'retrofit.png'}")


if __name__ == "__main__":
    main()
