"""A few rows of benchmarks/arch_sweep.py in the test suite: each family converted as loaded, compared with a deep
copy of the original in eval, trained one call with labels (the original's loss, mHC gradients), switched back to
eval, saved and reloaded. The whole sweep (docs/support.md) runs outside the suite."""

import os
import sys

import pytest

pytest.importorskip("transformers", reason="the dev extra installs transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import arch_sweep  # noqa: E402

FAST = ["qwen2", "vit", "distilbert"]  # a decoder with GQA, a vision transformer, an encoder: ~15 s together


@pytest.mark.parametrize("name", FAST)
def test_family_passes_every_column(name):
    family = next(f for f in arch_sweep.FAMILIES if f.name == name)
    row = arch_sweep.run_family(family)
    assert row.passed, row.cells
    assert set(row.cells) == set(arch_sweep.COLUMNS)


def test_convert_then_lora_trains():
    pytest.importorskip("peft", reason="the dev extra installs peft")
    row = arch_sweep._wrapped_row("convert, then peft LoRA", arch_sweep.WRAPPED["convert, then peft LoRA"])
    assert row.passed, row.cells


def test_a_failing_step_fails_its_cell_with_the_reason():
    """The sweep's own bookkeeping: a family whose build raises gets a one-line reason, later cells not reached."""
    def broken():
        raise ValueError("no such config\nsecond line")

    row = arch_sweep.run_family(arch_sweep.Family("broken", "decoder", broken, "lm"))
    assert not row.passed
    assert row.cells["convert"] == "FAIL: ValueError: no such config"
    assert all(row.cells[c] == "FAIL: not reached" for c in arch_sweep.COLUMNS[1:])
    assert "| broken | decoder |" in arch_sweep.markdown([row], "test")


@pytest.mark.parametrize("name", ["wav2vec2", "hubert"])
def test_speech_encoder_with_the_documented_workaround_passes_every_column(name):
    """The Known-limitations workaround of docs/support.md, checked: converted in eval mode (as from_pretrained loads)
    with LayerDrop off, the region is the encoder, SpecAugment runs outside it (numpy masks, drawn alike for both
    models) and the row passes every column against the original, the train step included."""
    family = next(f for f in arch_sweep.FAMILIES if f.name == name)

    def build():
        model = family.build()
        model.config.layerdrop = 0.0
        return model.eval()

    row = arch_sweep.run_family(arch_sweep.Family(name, family.group, build, family.inputs))
    assert row.passed, row.cells
