"""Pictures: each file written is decoded and has the size asked for, and shows what it should: the figure
holds the plotted values themselves (every site's H_res, every gain), labels and a legend, and is not blank."""

import xml.etree.ElementTree as ET

import matplotlib.image as mpimg
import torch
from matplotlib.figure import Figure
from torch import fx

import mhc_rewrite
from mhc_rewrite.inspect import block_graph, draw_graph, plot_gains, plot_h_res, stream_diagnostics

from models import ResidualMLP, perturb_mhc


def _png_size(path):
    image = mpimg.imread(path)
    return image.shape[1], image.shape[0]  # (width, height)


def test_graph_drawing_png_and_svg(tmp_path):
    gm = mhc_rewrite.converted_graph(mhc_rewrite.convert(ResidualMLP(depth=3)), torch.randn(4, 6))
    graph = block_graph(gm, "blocks.1")
    mhc_nodes = {name for name, is_mhc in graph.nodes(data="mhc") if is_mhc}
    assert {"mhc_blocks_1_coefficients", "mhc_blocks_1_pre_mix", "mhc_blocks_1_post_res_mix"} <= mhc_nodes
    assert "blocks_1_fc1" in graph.nodes and "blocks_1_fc1" not in mhc_nodes
    assert not any(name.endswith(("_phi", "_bias")) for name in graph.nodes)  # weights are left out

    png = draw_graph(gm, tmp_path / "after.png", "blocks.1", dpi=50)
    width, height = _png_size(png)
    assert 200 <= width <= 750 and 200 <= height <= 475  # sized to the block, at most 15 x 9.5 inches
    svg = draw_graph(fx.symbolic_trace(ResidualMLP()), tmp_path / "before.svg", "blocks.0")
    root = ET.parse(svg).getroot()
    assert float(root.get("width").removesuffix("pt")) <= 15 * 72  # 72 pt per inch


def _saved_figures(monkeypatch):
    """Keep every figure the library saves, so that its content can be read back."""
    figures, savefig = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _not_blank(path):
    rgb = mpimg.imread(path)[..., :3]
    return rgb.std() > 0.05 and (rgb.min(-1) < 0.9).mean() > 0.01  # varied, with ink on over 1% of the page


def test_heat_maps_and_gain_plot(tmp_path, monkeypatch):
    torch.manual_seed(0)
    gm = perturb_mhc(mhc_rewrite.convert(ResidualMLP(depth=8)), scale=0.5)  # H_res differ from site to site
    diag = stream_diagnostics(gm, torch.randn(4, 6))
    # 2 rows of 6 panels of 1.7 in, with the colour scale and title: (6 x 1.7 + 1.1) x (2 x 1.7 + 0.6) inches
    assert _png_size(plot_h_res(diag, tmp_path / "h_res.png", dpi=50, columns=6)) == (565, 200)
    assert _png_size(plot_gains(diag, tmp_path / "gains.png", dpi=100)) == (750, 420)
