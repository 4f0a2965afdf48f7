"""The README's main job (examples/convert_llama.py) runs and reports what it should."""

import os
import re
import subprocess
import sys

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
