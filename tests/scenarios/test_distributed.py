"""Real multi-process training of a converted GPT on CPU (gloo, 2 processes, torchrun): DDP gradients equal one
process on the full batch; FSDP2 trains the same; a torch.distributed.checkpoint save/resume continues exactly."""

import json
import os
import re
import socket
import subprocess
import sys
import uuid
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import distributed_train as example  # noqa: E402

from tolerances import assert_close  # noqa: E402

# What a rendezvous that lost its port prints: the only failure that earns a relaunch (a bug in training does not).
PORT_TAKEN = re.compile(r"Address already in use|EADDRINUSE|failed to (bind|listen)", re.IGNORECASE)
relaunches = []  # (wrap, the matched message): reported by the tests' warnings


def _free_port():
    """A port the OS has just handed out and taken back: free now, unlikely to be reused within the second."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(wrap, out):
    """One torchrun of the example, with its own rendezvous port and id (runs started at once by other test
    sessions on this machine never share a store). A clash on that port, recognised by its message, gets one
    relaunch on a new port, counted and reported; any other failure fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                   "--rdzv-id", uuid.uuid4().hex, "examples/distributed_train.py", "--wrap", wrap, "--out", str(out)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        clash = PORT_TAKEN.search(result.stderr)
        if result.returncode == 0 or clash is None or attempt == 1:
            break
        relaunches.append((wrap, clash.group(0)))
        warnings.warn(f"torchrun relaunch {len(relaunches)} ({wrap}): its rendezvous port was taken ({clash.group(0)})")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One DDP and one FSDP2 run, shared by the tests: ``{wrap: (results, output folder)}``."""
    outs = {wrap: tmp_path_factory.mktemp(wrap) for wrap in ("ddp", "fsdp")}
    return {wrap: (_torchrun(wrap, out), out) for wrap, out in outs.items()}


def test_ddp_gradients_equal_one_process_on_the_full_batch(runs):
    results, out = runs["ddp"]
    assert results["world"] == 2
    ddp_grads = torch.load(out / "first_grads.pt")
    model = example.build(seed=0)
    x, y = example.global_batch(0)
    example.loss_on(model, x, y).backward()
    names = [name for name, _ in model.named_parameters()]
    assert sorted(ddp_grads) == sorted(names) and any(name.startswith("mhc.") for name in names)
    for name, p in model.named_parameters():
        assert_close(ddp_grads[name], p.grad, "data_parallel", msg=name)
    assert results["resumed"] == results["uninterrupted"][3:]  # exact: the same operations on the same state
    assert results["uninterrupted"][-1] < results["uninterrupted"][0] - 0.3  # it learns


def test_fsdp2_trains_and_resumes_like_ddp(runs):
    fsdp, ddp = runs["fsdp"][0], runs["ddp"][0]
    assert fsdp["resumed"] == fsdp["uninterrupted"][3:]  # exact, as for DDP
    assert fsdp["uninterrupted"] == ddp["uninterrupted"]  # exact on CPU with one thread per process (measured)
