"""The examples run, and each test reaches its own verdict from what the example saved (its outputs, losses and
gains), not from the example's printed judgement."""

import json
import math
import os
import subprocess
import sys

import matplotlib.image as mpimg
import torch

from tolerances import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_main_demo_runs_and_preserves_the_function(tmp_path):
    result = subprocess.run([sys.executable, "examples/convert_llama.py", "--layers", "2", "--steps", "8", "--save",
                             str(tmp_path / "outputs.pt")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model.layers.1.mlp" in out and "rewritten" in out  # the sites table
    before, after = out.split("=== model.layers.0, after ===")
    assert "torch.ops.mhc" not in before.split("=== model.layers.0, before")[1]
    for op in ("expand_streams", "coefficients", "pre_mix", "post_res_mix"):
        assert f"torch.ops.mhc.{op}" in after
    saved = torch.load(tmp_path / "outputs.pt")
    assert saved["converted_logits"].shape == saved["original_logits"].shape == (2, 32, 256)
    assert_close(saved["converted_logits"], saved["original_logits"], "function_at_init")
    losses = saved["losses"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_quickstart_runs(tmp_path):
    result = subprocess.run([sys.executable, "examples/quickstart.py", str(tmp_path / "outputs.pt")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    saved = torch.load(tmp_path / "outputs.pt")
    assert saved["sites"] == 4 and "4 sites rewritten" in result.stdout
    assert_close(saved["converted"], saved["original"], "function_at_init")


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
    first = torch.tensor([curves[v]["train_loss"][0] for v in ("hc", "mhc")])
    assert_close(first, torch.full((2,), curves["baseline"]["train_loss"][0]), "function_at_init")
    # a product of non-negative row-stochastic maps has every row sum exactly 1
    assert_close(torch.tensor(results["mhc"]["max_amax_forward"]), torch.tensor(1.0), "coefficients")
    image = mpimg.imread(tmp_path / "stability.png")
    assert image.shape[:2] == (700, 1100)
    assert image[..., :3].std() > 0.05 and (image[..., :3].min(-1) < 0.9).mean() > 0.01  # not blank: ink drawn


def test_api_tour_runs(tmp_path):
    result = subprocess.run([sys.executable, "examples/api_tour.py", "--compile", "--save", str(tmp_path / "out.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = torch.load(tmp_path / "out.pt")
    losses = saved["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert_close(torch.tensor(saved["gain"][0]), torch.tensor(1.0), "coefficients")  # rows of H_res sum to 1
    assert_close(saved["compiled"], saved["eager"], "same_math")
    assert_close(saved["lowered"], saved["eager"], "same_math")
    assert torch.equal(saved["staged"], saved["eager"])  # two pipeline stages chained: the same ops in the same order


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
