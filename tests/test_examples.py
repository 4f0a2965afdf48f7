"""The README's main job (examples/convert_llama.py) runs and reports what it should."""

import json
import math
import os
import re
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_demo_runs_and_preserves_the_function():
    result = subprocess.run([sys.executable, "examples/convert_llama.py", "--layers", "2", "--steps", "8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model.layers.1.mlp" in out and "rewritten" in out  # the sites table
    before, after = out.split("=== model.layers.0, after ===")
    assert "torch.ops.mhc" not in before.split("=== model.layers.0, before")[1]
    for op in ("expand_streams", "coefficients", "pre_mix", "post_res_mix"):
        assert f"torch.ops.mhc.{op}" in after
    relative = float(re.search(r"relative ([0-9.e+-]+)\)", out).group(1))
    assert relative <= 1e-5
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_quickstart_runs():
    result = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4 sites rewritten" in result.stdout
    err = float(re.search(r"max \|converted - original\| = ([0-9.e+-]+)", result.stdout).group(1))
    assert err < 1e-5


def test_stability_quick_run(tmp_path):
    result = subprocess.run([sys.executable, "examples/stability.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    keys = {"final_train_loss", "final_val_loss", "max_amax_forward", "max_amax_backward", "max_grad_norm"}
    for variant in ("baseline", "hc", "mhc"):
        assert keys <= results[variant].keys()
        assert all(math.isfinite(results[variant][k]) for k in keys)
    curves = results["curves"]
    # every variant starts from the same function: the conversions are exact at init
    assert curves["hc"]["train_loss"][0] == pytest.approx(curves["baseline"]["train_loss"][0], rel=1e-5)
    assert curves["mhc"]["train_loss"][0] == pytest.approx(curves["baseline"]["train_loss"][0], rel=1e-5)
    # a product of non-negative row-stochastic maps has every row sum exactly 1
    assert results["mhc"]["max_amax_forward"] == pytest.approx(1.0, abs=1e-4)
    assert mpimg.imread(tmp_path / "stability.png").shape[:2] == (700, 1100)


def test_api_tour_runs():
    result = subprocess.run([sys.executable, "examples/api_tour.py", "--compile"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "forward 1.0000" in result.stdout and "compiled output matches: True" in result.stdout


def test_finetune_hf_example_saves_a_model_that_loads_back_and_generates_the_same(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    import mhc_rewrite

    result = subprocess.run([sys.executable, "examples/finetune_hf.py", "--steps", "3", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert len(record["losses"]) == 3 and all(math.isfinite(x) for x in record["losses"])
    loaded = mhc_rewrite.from_pretrained(LlamaForCausalLM, tmp_path / "model").eval()  # our own reload
    assert len(loaded.mhc_sites) == record["sites"] == 8
    prompt = torch.tensor([record["prompt"]])
    generated = loaded.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert generated[0].tolist() == record["generated"]  # the trained model's tokens, before it was saved
