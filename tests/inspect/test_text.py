"""Text views: the sites table and one block's code before and after."""

import torch
from torch import fx

import mhc_rewrite
from mhc_rewrite.inspect import block_code, sites_table

from models import ResidualMLP


def test_sites_table_lists_every_site():
    table = sites_table(mhc_rewrite.find_residuals(ResidualMLP(depth=3)))
    lines = table.splitlines()
    assert lines[0].split() == ["#", "module", "path", "chain", "ops", "branches", "C", "axis", "status"]
    assert [line.split()[1] for line in lines[2:]] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(line.endswith("rewritten") for line in lines[2:])


def test_block_code_before_and_after():
    model = ResidualMLP(depth=2)
    before = block_code(fx.symbolic_trace(model), "blocks.1")
    converted = mhc_rewrite.convert(model)
    converted(torch.randn(4, 6))  # block_code reads the graph of the latest call
    after = block_code(converted, "blocks.1")
    assert [line.split(" = ")[0] for line in before.splitlines()] == [
        "blocks_1_norm", "blocks_1_fc1", "gelu_1", "blocks_1_fc2", "add_1"]
    assert "add_1" not in after and "torch.ops.mhc.post_res_mix" in after
    assert "self.mhc.blocks_1.phi" in after and "blocks.0" not in after
