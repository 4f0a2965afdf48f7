"""python -m mhc_rewrite inspect, in a subprocess, on Hugging Face GPT-2 built from config; and its errors."""

import json
import os
import subprocess
import sys

import matplotlib.image as mpimg
import pytest
import torch

from tolerances import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mhc_rewrite", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_inspect_hf_gpt2(tmp_path):
    result = _run("inspect", "examples/factories.py:tiny_gpt2", "--n", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "GPT2LMHeadModel: 12 residual site(s) found; rewrote 8 in 1 chain(s) with n=2" in result.stdout
    assert "transformer.h.3.mlp" in result.stdout
    assert result.stdout.count("skipped: branch has no parameterised op") == 4  # the tanh-GELU's x + 0.044715 x³
    assert "Amax gain of the composite residual map: forward 1.0000, backward 1.0000" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["rewritten"] == 8 and report["config"]["n"] == 2
    assert_close(torch.tensor(report["diagnostics"]["max_amax_forward"]), torch.tensor(1.0), "coefficients")
    for name in ("block_before.png", "block_after.png", "h_res.png", "gains.png"):
        image = mpimg.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 400, name
        rgb = image[..., :3]
        assert rgb.std() > 0.05 and (rgb.min(-1) < 0.9).mean() > 0.01, f"{name} is blank"  # ink on the page


def test_help_explains_every_flag():
    result = _run("inspect", "--help")
    assert result.returncode == 0
    for flag in ("MODULE:FACTORY", "--n", "--static", "--mode", "--init", "--sinkhorn-iters", "--block", "--out"):
        assert flag in result.stdout


@pytest.mark.parametrize("spec,message", [
    ("examples/factories.py", "expected MODULE:FACTORY"),
    ("no/such/file.py:build", "no such file: no/such/file.py"),
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("examples/factories.py:missing", "has no attribute 'missing'"),
    ("examples/factories.py:torch", "is not callable"),
    ("json:dumps", "the factory raised TypeError"),
    ("os:getcwd", "must return an nn.Module or (model, example_inputs), got str"),
])
def test_bad_factories(spec, message):
    result = _run("inspect", spec)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
