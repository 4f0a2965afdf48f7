"""CI: check the installed wheel from outside the source tree.

Run by ``.ci/wheel`` with the interpreter of a clean virtual environment that holds only torch and the wheel,
from a directory outside the repository. Checks that the package imports from site-packages (not from the source
tree), ships every subpackage and nothing else, converts a small model to the same function, runs the inspect
command line on a factory defined in this file, and compiles with ``torch.compile(backend="mhc")`` found through
its entry point. Exits non-zero on the first failure.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused ops' Triton kernels would run on the CPU interpreter

import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyModel(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


def tiny_model():
    """Factory for ``python -m mhc_rewrite inspect .ci/wheel_check.py:tiny_model``."""
    torch.manual_seed(0)
    return TinyModel().eval(), (torch.randn(2, 5, 16),)


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"wheel check FAILED: {what}")
    print(f"ok  {what}")


def check_install() -> None:
    import mhc_rewrite

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(mhc_rewrite.__file__).resolve()
    check(site in where.parents, f"mhc_rewrite imports from site-packages ({where})")
    check(REPO not in where.parents, "mhc_rewrite does not import from the source tree")
    shipped = {str(f) for f in importlib.metadata.files("mhc-rewrite")}
    for package in ("mhc_rewrite", "mhc_rewrite.ops", "mhc_rewrite.kernels", "mhc_rewrite.passes",
                    "mhc_rewrite.inspect"):
        check(package.replace(".", "/") + "/__init__.py" in shipped, f"the wheel ships {package}")
        importlib.import_module(package)
    tops = {name.split("/")[0] for name in shipped if not name.split("/")[0].endswith((".dist-info", ".data"))}
    check(tops == {"mhc_rewrite"}, f"the wheel installs one top-level package (found {sorted(tops)})")
    check(importlib.util.find_spec("passes") is None, "no top-level 'passes' module can be imported")


def check_convert() -> None:
    import mhc_rewrite

    model, (x,) = tiny_model()
    converted = mhc_rewrite.convert(model, n=4, example_inputs=(x,))
    check(len(converted.mhc_sites) == 3, f"convert rewrote the 3 residual sites (got {len(converted.mhc_sites)})")
    with torch.no_grad():
        err = ((converted(x) - model(x)).norm() / model(x).norm()).item()
    check(err < 1e-5, f"the converted model computes the original function (relative error {err:.1e})")


def check_cli(out: Path) -> None:
    cmd = [sys.executable, "-m", "mhc_rewrite", "inspect", f"{Path(__file__).resolve()}:tiny_model", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    check(done.returncode == 0, f"python -m mhc_rewrite inspect exits 0 (stderr: {done.stderr[-2000:]})")
    check("3 residual site(s) found" in done.stdout, "the inspect report lists the 3 sites")
    for name in ("report.json", "block_before.png", "block_after.png", "h_res.png", "gains.png"):
        check((out / name).stat().st_size > 0, f"inspect wrote {name}")


def check_compile() -> None:
    import torch._functorch.config
    from torch._dynamo.backends.registry import lookup_backend

    import mhc_rewrite
    import mhc_rewrite.backend

    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    check(points.get("mhc") == "mhc_rewrite.backend:mhc_backend", "the wheel declares the torch_dynamo_backends entry")
    check(lookup_backend("mhc") is mhc_rewrite.backend.mhc_backend, "torch resolves backend='mhc' by its entry point")
    # Inductor calls the triton_ops as ops on the CPU instead of compiling their kernels for it
    torch._functorch.config.decompose_custom_triton_ops = False
    model, (x,) = tiny_model()
    converted = mhc_rewrite.convert(model, n=4, example_inputs=(x,))
    compiled = torch.compile(converted, backend="mhc", fullgraph=True)
    with torch.no_grad():
        mhc_rewrite.converted_graph(converted, x)  # this mode's graph is traced before Dynamo sees the model
        got, want = compiled(x), converted(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    check(True, "torch.compile(backend='mhc') output equals eager")


def main() -> None:
    check(REPO not in Path.cwd().resolve().parents and Path.cwd().resolve() != REPO,
          f"running outside the source tree ({Path.cwd()})")
    check_install()
    check_convert()
    with tempfile.TemporaryDirectory() as tmp:
        check_cli(Path(tmp) / "inspect")
    check_compile()
    print("wheel check passed")


if __name__ == "__main__":
    main()
