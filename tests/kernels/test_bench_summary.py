"""The GPU session's summary (``benchmarks/mhc_bench.py --merge``): each target's limit is scaled by the copy
bandwidth of the same run and judged at the benchmark shape only; a stage that did not come back leaves its
targets unjudged (``None``), never passed."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import mhc_bench  # noqa: E402


def _row(fwd, fwd_bwd, pct_fwd, pct_fwd_bwd):
    return {"ms": fwd, "pct_copy": pct_fwd}, {"ms": fwd_bwd, "pct_copy": pct_fwd_bwd}


def _kernels(shape, copy_gbps):
    timings = {}
    for name, pre, post in (("mhc_rewrite (triton)", (0.5, 1.5), (0.3, 0.9)),
                            ("mhc_rewrite split pre", (0.7, 2.0), (0.3, 0.9)),
                            ("liger-kernel", (1.0, 3.0), (0.5, 1.0))):
        pre_f, pre_fb = _row(*pre, 50, 50)
        post_f, post_fb = _row(*post, 90, 60)
        timings[name] = {"pre fwd": pre_f, "pre fwd+bwd": pre_fb, "post fwd": post_f, "post fwd+bwd": post_fb,
                         "pre bwd": {"ms": pre[1] - pre[0]}, "post bwd": {"ms": post[1] - post[0]}}
    return {"device": "H", "torch": "t", "triton": "tr", "date": "d",
            "kernels": {"shape": shape, "copy_GBps": copy_gbps, "timings": timings, "correctness": {}}}


def _met(summary):
    return {t["target"]: (t["limit"], t["met"]) for t in summary["targets"]}


def test_limits_scale_with_the_copy_bandwidth_of_the_run():
    # half the reference bandwidth: every time limit doubles (pre fwd 0.80 ms, pre bwd 2.4 ms)
    met = _met(mhc_bench.summary([_kernels(mhc_bench.BENCHMARK_SHAPE, mhc_bench.REFERENCE_GBPS / 2)]))
    assert met["mhc_rewrite (triton): pre fwd ms"] == (pytest.approx(0.80), True)  # 0.5 <= 0.8
    assert met["mhc_rewrite (triton): pre bwd ms"] == (pytest.approx(2.4), True)  # 1.0 <= 2.4
    assert met["mhc_rewrite split pre: pre bwd ms"] == (pytest.approx(2.4), True)  # 1.3
    assert met["mhc_rewrite split pre: pre fwd ms"] == (pytest.approx(0.80), True)  # 0.7
    assert met["mhc_rewrite (triton): post fwd % of copy"] == (85, True)  # 90 %
    assert met["mhc_rewrite (triton): post fwd+bwd % of copy"] == (70, False)  # 60 %
    assert met["mhc_rewrite (triton): pre fwd+bwd speed-up over Liger"] == (1.3, True)  # 3.0 / 1.5 = 2
    assert met["mhc_rewrite (triton): post fwd+bwd speed-up over Liger"] == (1.3, False)  # 1.0 / 0.9 = 1.11
    assert met["mhc_rewrite split pre: pre fwd+bwd speed-up over Liger"] == (1.3, True)  # 1.5
    # at the reference bandwidth the same pre forward misses (0.5 > 0.40)
    met = _met(mhc_bench.summary([_kernels(mhc_bench.BENCHMARK_SHAPE, mhc_bench.REFERENCE_GBPS)]))
    assert met["mhc_rewrite (triton): pre fwd ms"] == (pytest.approx(0.40), False)


def test_another_shape_or_a_missing_stage_judges_nothing():
    tiny = dict(mhc_bench.BENCHMARK_SHAPE, tokens=32)
    summary = mhc_bench.summary([_kernels(tiny, 20.0)])
    assert summary["kernel_targets_apply"] is False
    assert all(met is None for _, met in _met(summary).values())  # and no end-to-end stage came back
    e2e = {"e2e": {"config": {}, "batch": 8, "step_overhead": 0.1,
                   "baseline": {"step_ms": 100.0}, "mhc": {"step_ms": 110.0, "graph_breaks": 2,
                                                         "graph_breaks_after_warm_up": 0,
                                                         "recompiles_after_warm_up": 1}}}
    met = _met(mhc_bench.summary([_kernels(tiny, 20.0), e2e]))
    assert met["e2e step overhead (fraction)"] == (0.15, True)
    assert met["e2e recompiles after warm-up"] == (0, False)
    assert met["e2e graph breaks after warm-up"] == (0, True)  # the 2 of the warm-up (region traced) are not judged
