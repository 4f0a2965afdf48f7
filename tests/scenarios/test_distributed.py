"""Real multi-process training of a converted model on CPU (gloo, 2 processes, torchrun): DDP gradients equal one
process on the full batch; FSDP2 trains the same; a torch.distributed.checkpoint save/resume continues exactly; a
2-stage pipeline (split_stages + ScheduleGPipe) gives the loss and gradients of one process; FSDP2 per layer, in
mixed precision, on a converted Hugging Face Llama trains, shards the mHC parameters and resumes bitwise."""

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

from tolerances import assert_close, tolerance  # noqa: E402

# What a rendezvous that lost its port prints: the only failure that earns a relaunch (a bug in training does not).
PORT_TAKEN = re.compile(r"Address already in use|EADDRINUSE|failed to (bind|listen)", re.IGNORECASE)
relaunches = []  # (wrap, the matched message): reported by the tests' warnings


def _free_port():
    """A port the OS has just handed out and taken back: free now, unlikely to be reused within the second."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(wrap, out, *options):
    """One torchrun of the example, with its own rendezvous port and id (runs started at once by other test
    sessions on this machine never share a store). A clash on that port, recognised by its message, gets one
    relaunch on a new port, counted and reported; any other failure fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                   "--rdzv-id", uuid.uuid4().hex, "examples/distributed_train.py", "--wrap", wrap, "--out", str(out),
                   *options]
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


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """A 2-stage pipeline run per schedule: ``{schedule: (results, output folder)}``."""
    outs = {schedule: tmp_path_factory.mktemp(f"pipeline_{schedule}") for schedule in ("gpipe", "1f1b")}
    return {schedule: (_torchrun("pipeline", out, "--schedule", schedule), out) for schedule, out in outs.items()}


def test_pipeline_two_stages_equal_one_process_on_the_full_batch(pipeline_runs):
    results, out = pipeline_runs["gpipe"]
    assert results["world"] == 2
    stage_grads = [torch.load(out / f"first_grads_rank{rank}.pt") for rank in range(2)]
    assert not set(stage_grads[0]) & set(stage_grads[1])  # each parameter in one stage
    grads = {**stage_grads[0], **stage_grads[1]}
    model = example.build(seed=0)
    x, y = example.global_batch(0)
    loss = example.loss_on(model, x, y)
    loss.backward()
    assert sorted(grads) == sorted(name for name, _ in model.named_parameters())
    assert any(name.startswith("mhc.h_0") for name in stage_grads[0])
    assert any(name.startswith("mhc.h_1") for name in stage_grads[1])
    assert_close(torch.tensor(results["uninterrupted"][0]), loss.detach(), "pipeline", msg="loss")
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, "pipeline", msg=name)
    assert results["resumed"] == results["uninterrupted"][3:]  # exact: each stage resumes from its own keys
    assert results["uninterrupted"][-1] < results["uninterrupted"][0] - 0.3  # it learns


def test_pipeline_1f1b_computes_what_gpipe_does(pipeline_runs):
    """Another order of the same micro-batch steps, the same sums per parameter in the same order: bitwise equal."""
    (gpipe, gpipe_out), (one_f_one_b, one_f_one_b_out) = pipeline_runs["gpipe"], pipeline_runs["1f1b"]
    assert one_f_one_b["uninterrupted"] == gpipe["uninterrupted"]
    for rank in range(2):
        want, got = (torch.load(out / f"first_grads_rank{rank}.pt") for out in (gpipe_out, one_f_one_b_out))
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    """FSDP2 per decoder layer and at the root on a converted HF Llama: bf16 parameters (the mixed-precision run)
    and float32 parameters (whose gradients can be held to one process's)."""
    runs = {}
    for dtype in ("bfloat16", "float32"):
        out = tmp_path_factory.mktemp(f"llama_{dtype}")
        runs[dtype] = (_torchrun("fsdp", out, "--model", "llama", "--param-dtype", dtype), out)
    return runs


def test_fsdp2_per_layer_mixed_precision_on_hf_llama_resumes_bitwise(llama_runs):
    results, _ = llama_runs["bfloat16"]
    assert results["units"] == ["", "model.layers.0", "model.layers.1"]  # per layer, and the root
    mhc = {name: kind for name, kind in results["sharded"].items() if ".mhc." in name}
    assert mhc and set(results["sharded"].values()) == {"DTensor[Shard(dim=0)]"}  # mHC parameters like the others
    assert results["resumed"] == results["uninterrupted"][3:]  # bitwise
    model = example.build(seed=0, model="llama")  # one process, float32, full batch
    want = example.loss_on(model, *example.global_batch(0)).item()
    assert abs(results["uninterrupted"][0] - want) <= tolerance("loss_vs_fp32", torch.bfloat16)
    assert results["uninterrupted"][0] != want  # it did run in bf16
    assert results["uninterrupted"][-1] < results["uninterrupted"][0] - 0.3  # it learns


def test_fsdp2_per_layer_gradients_equal_one_process(llama_runs):
    """Each layer's unit is gathered by the converted region and reduce-scattered by the root's end-of-backward
    callback (mhc_rewrite/sharding.py): in float32 its gradients are one process's on the full batch."""
    results, out = llama_runs["float32"]
    assert results["resumed"] == results["uninterrupted"][3:]
    grads = torch.load(out / "first_grads.pt")
    model = example.build(seed=0, model="llama")
    example.loss_on(model, *example.global_batch(0)).backward()
    assert sorted(grads) == sorted(name for name, _ in model.named_parameters())
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, "data_parallel", msg=name)
