"""The science examples' --quick runs: each verdict is recomputed here from results.json, not read off a print."""

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg

from tolerances import assert_close

ROOT = Path(__file__).resolve().parents[2]


def run_example(script, out, *flags):
    result = subprocess.run([sys.executable, f"examples/{script}", "--quick", "--out", str(out), *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text())


def test_retrofit_quick_run(tmp_path):
    results = run_example("retrofit.py", tmp_path)
    k, m = results["config"]["pre_steps"], results["config"]["steps"]
    seeds = results["seeds"]
    assert len(seeds) >= 3
    for runs in seeds.values():
        assert set(runs) == {"plain", "identity", "paper", "scratch"}
        before = runs["plain"]["loss_before_conversion"]
        for variant in ("plain", "identity", "paper"):
            run = runs[variant]
            assert run["loss_before_conversion"] == before  # one checkpoint for all three
            curves = run["curves"]
            # step K is evaluated twice: the checkpoint, then the converted model; the last evaluation is at K + M
            at_k = [v for step, v in zip(curves["eval_step"], curves["val_loss"]) if step == k]
            assert at_k == [before, run["loss_after_conversion"]]
            assert curves["eval_step"][-1] == k + m and curves["val_loss"][-1] == run["final_val_loss"]
            assert all(math.isfinite(x) for x in curves["train_loss"] + curves["val_loss"])
        # the verdicts, from the recorded losses
        assert runs["plain"]["loss_after_conversion"] == before
        assert_close(runs["identity"]["loss_after_conversion"], before, "function_at_init")
        assert math.isfinite(runs["paper"]["loss_after_conversion"])
        scratch = runs["scratch"]["curves"]
        assert scratch["step"] == list(range(k + m)) and scratch["val_loss"][-1] == runs["scratch"]["final_val_loss"]
        # mHC's composite map: non-negative row-stochastic factors keep every row sum at 1
        for variant in ("identity", "paper", "scratch"):
            forward = runs[variant]["curves"]["amax_forward"]
            assert_close(max(forward[-3:]), 1.0, "composite_gain")
    assert mpimg.imread(tmp_path / "retrofit.png").shape[:2] == (700, 1100)


def test_stability_quick_stress_run(tmp_path):
    results = run_example("stability.py", tmp_path, "--stress")
    curves = results["curves"]
    assert set(curves) == {"baseline", "hc", "mhc", "mhc_lite", "mhc_learned"}
    first = curves["baseline"]["train_loss"][0]
    for variant, log in curves.items():
        # every variant starts from the same function: all the conversions are exact at init
        assert_close(log["train_loss"][0], first, "function_at_init", msg=variant)
        assert results[variant]["max_grad_norm"] == max(log["grad_norm"])
        assert results[variant]["final_val_loss"] == log["val_loss"][-1]
    for variant in ("mhc", "mhc_lite", "mhc_learned"):
        assert_close(max(curves[variant]["amax_forward"]), 1.0, "composite_gain", msg=variant)
    # mHC-lite's H_res is exactly doubly stochastic: its columns sum to 1 as well, so the backward gain is 1
    assert_close(max(curves["mhc_lite"]["amax_backward"]), 1.0, "composite_gain")
    assert mpimg.imread(tmp_path / "stability.png").shape[:2] == (700, 1100)
