"""Pictures a person can read at a glance: what code can check of them.

Each figure is checked for what it plots (against the diagnostics it was given), its labels and legend, its
text size, that every piece of text lies inside the canvas, and that its PNG has the size asked for and is
not blank.
"""

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.patches import FancyArrowPatch

import mhc_rewrite
from mhc_rewrite.cli import main
from mhc_rewrite.inspect import stream_diagnostics
from mhc_rewrite.inspect.blocks import MAX_PAGE, _layout, block_figures, block_graph, draw_block_pages
from mhc_rewrite.inspect.plots import _grid, gains_figure, h_res_figure, plot_gains, plot_h_res

from models import GPT, GPTConfig, ResidualMLP
from tolerances import assert_close

ROOT_FACTORY = "tests/support/small_factories.py:gpt_two_layers"


def _texts(fig):
    """Every drawn, non-empty text of a figure (titles, labels, ticks, legends, annotations)."""
    fig.canvas.draw()
    off_axis = set()  # tick labels matplotlib keeps but does not draw: their tick is outside the axis range
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    off_axis.update((id(tick.label1), id(tick.label2)))
    return [t for t in fig.findobj(plt.Text)
            if t.get_visible() and t.get_text().strip() and id(t) not in off_axis]


def _assert_inside_and_readable(fig, min_points=7.5):
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for text in _texts(fig):
        extent = text.get_window_extent(renderer)
        assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1, f"{text.get_text()!r} leaves the canvas sideways"
        assert extent.y0 >= box.y0 - 1 and extent.y1 <= box.y1 + 1, f"{text.get_text()!r} leaves the canvas"
        assert text.get_fontsize() >= min_points, f"{text.get_text()!r} is {text.get_fontsize()} pt"


def _png(path):
    image = mpimg.imread(path)
    return image.shape[1], image.shape[0], image


def _not_blank(image):
    ink = (image[..., :3] < 0.9).any(axis=-1).mean()
    assert ink > 0.01, f"only {ink:.3%} of the pixels are not white"


def _hc_and_mhc(depth=6):
    model = ResidualMLP(depth=depth)
    x = torch.randn(16, 6)
    hc = mhc_rewrite.convert(model, mode="hc", dynamic=False)
    with torch.no_grad():
        for params in hc.mhc.values():
            params.bias[8:] = (torch.eye(4) + 0.5 * torch.ones(4, 4)).flatten()  # rows sum to 3: gain 3^depth
    mhc = mhc_rewrite.convert(model, dynamic=False)
    return stream_diagnostics(hc, x), stream_diagnostics(mhc, x)


def test_gain_one_within_float_error_is_a_flat_labelled_line(tmp_path):
    diag = stream_diagnostics(mhc_rewrite.convert(ResidualMLP(depth=8)), torch.randn(4, 6))
    fig = gains_figure(diag)
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() and not line.get_label().startswith("_")]
    assert [list(line.get_ydata()) for line in lines] == [diag.gains[0]["forward"], diag.gains[0]["backward"]]
    assert all("1 within float error" in line.get_label() for line in lines)
    assert ax.get_ylim() == (0.5, 1.5)  # float noise (~1e-7) cannot show on this scale
    assert any("flat: gain = 1" in t.get_text() for t in _texts(fig))
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [line.get_label() for line in lines]
    _assert_inside_and_readable(fig)
    plt.close(fig)
    width, height, image = _png(plot_gains(diag, tmp_path / "gains.png", dpi=100))
    assert (width, height) == (750, 420)
    _not_blank(image)


def test_hc_and_mhc_gains_on_one_chart_with_plain_number_ticks():
    diag_hc, diag_mhc = _hc_and_mhc(depth=6)
    fig = gains_figure({"HC": diag_hc, "mHC": diag_mhc})
    ax = fig.axes[0]
    by_label = {line.get_label(): line for line in ax.get_lines()}
    assert list(by_label["HC forward"].get_ydata()) == diag_hc.gains[0]["forward"]
    assert_close(diag_hc.gains[0]["forward"][-1], 3.0 ** 6, "few_roundings")  # HC's 3x gain, six times
    mhc_forward = next(label for label in by_label if label.startswith("mHC forward"))
    assert "1 within float error" in mhc_forward
    assert list(by_label[mhc_forward].get_ydata()) == diag_mhc.gains[0]["forward"]
    assert by_label["HC forward"].get_color() != by_label[mhc_forward].get_color()
    assert ax.get_yscale() == "log"  # 1 to 729: a log axis ...
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert {"1", "10", "100"} <= set(ticks) and not any("^" in t or "times" in t for t in ticks)  # ... plain numbers
    _assert_inside_and_readable(fig)
    plt.close(fig)


def test_moderate_gains_use_a_linear_axis():
    diag_hc, _ = _hc_and_mhc(depth=1)  # one site: gain 3
    fig = gains_figure(diag_hc)
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[1] >= 3.0
    plt.close(fig)


@pytest.mark.parametrize("count,grid", [(2, (1, 2)), (8, (2, 4)), (12, (3, 4)), (7, (1, 7)), (48, (6, 8)),
                                        (13, (2, 8))])
def test_heat_map_grid_has_no_empty_panel_when_a_divisor_allows(count, grid):
    assert _grid(count) == grid


def test_heat_maps_values_colour_scale_and_no_empty_panels(tmp_path):
    diag = stream_diagnostics(mhc_rewrite.convert(ResidualMLP(depth=8)), torch.randn(4, 6))
    fig = h_res_figure(diag)
    panels = [ax for ax in fig.axes if ax.images]
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "H_res entry"]
    assert len(panels) == 8 and len(colorbars) == 1 and len(fig.axes) == 9  # 4 x 2 panels, nothing empty
    for ax, site in zip(panels, diag.sites):
        np.testing.assert_array_equal(ax.images[0].get_array(), site.h_res.numpy())
        cells = [t.get_text() for t in ax.texts]
        assert cells == [f"{v:.2f}" for v in site.h_res.flatten().tolist()]
        assert ax.get_title().startswith(f"{site.index}: ")
    _assert_inside_and_readable(fig)
    plt.close(fig)
    width, height, image = _png(plot_h_res(diag, tmp_path / "h_res.png", dpi=100))
    assert width <= 1500 and height <= 950
    _not_blank(image)


def test_heat_maps_of_a_prime_count_drop_the_empty_places():
    diag = stream_diagnostics(mhc_rewrite.convert(ResidualMLP(depth=11)), torch.randn(4, 6))
    fig = h_res_figure(diag)
    assert len([ax for ax in fig.axes if ax.images]) == 11 and len(fig.axes) == 12  # 8 + 3, 5 places removed
    plt.close(fig)


def _gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2))
    idx = torch.randint(0, 64, (2, 12))
    converted = mhc_rewrite.convert(model, example_inputs=(idx,))
    return model, mhc_rewrite.converted_graph(converted, idx)  # the graph the converted model runs


def test_block_drawing_legend_edges_full_names_and_size():
    _, gm = _gpt()
    graph = block_graph(gm, "h.0")
    figures = block_figures(gm, "h.0", title="h.0: after")
    texts = [t.get_text() for fig in figures for t in _texts(fig)]
    for fig in figures:
        width, height = fig.get_size_inches()
        assert width <= MAX_PAGE[0] and height <= MAX_PAGE[1]
        _assert_inside_and_readable(fig, min_points=8)
        legend = fig.axes[0].get_legend()
        assert {"new mHC op", "op of the original block"} <= {t.get_text() for t in legend.get_texts()}
    # full op names, wrapped at underscores rather than cut
    assert "scaled_dot_product_\nattention" in texts and "post_res_mix" in texts and "coefficients" in texts
    # every edge between nodes of one panel is an arrow with a visible length (boxes do not touch)
    layout = _layout(graph, 12)
    same_panel = [(s, d) for s, d in graph.edges if layout.panel[s] == layout.panel[d]]
    arrows = [p for fig in figures for p in fig.axes[0].patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == len(same_panel)
    for s, d in same_panel:
        assert layout.row[d] > layout.row[s]  # edges point down
    for fig in figures:
        plt.close(fig)


def test_mhc_ops_stand_in_their_own_lane_beside_the_original_ops():
    _, gm = _gpt()
    graph = block_graph(gm, "h.0")
    layout = _layout(graph, 12)
    for panel in set(layout.panel.values()):
        names = [n for n in graph if layout.panel[n] == panel]
        original = [layout.column[n] for n in names if not graph.nodes[n]["mhc"]]
        new = [layout.column[n] for n in names if graph.nodes[n]["mhc"]]
        if original and new:
            assert min(new) > max(original)
    assert {graph.nodes[n]["kind"] for n in graph} == {"op", "io", "mhc", "mhc_param"}


def test_a_long_block_is_split_into_panels_and_pages_not_shrunk(tmp_path):
    model, gm = _gpt()
    paths = draw_block_pages(gm, tmp_path / "after.png", "h.0", rows_per_panel=4)
    graph = block_graph(gm, "h.0")
    layout = _layout(graph, 4)
    assert max(layout.panel.values()) >= 3 and len(paths) >= 2
    assert paths[1].name == "after-2.png"
    for path in paths:
        width, height, image = _png(path)
        assert width <= 1500 and height <= 950
        _not_blank(image)
    figures = block_figures(gm, "h.0", rows_per_panel=4)
    crossing = {d for s, d in graph.edges if layout.panel[s] != layout.panel[d]}
    tags = [t for fig in figures for t in _texts(fig) if t.get_text().startswith("from ")]
    assert len(tags) == len(crossing) and all(t.get_fontsize() >= 8 for t in tags)
    labels = [t for fig in figures for t in _texts(fig) if t.get_text() == "post_res_mix"]
    assert labels and all(t.get_fontsize() == 9 for t in labels)  # same text size as an unsplit drawing
    for fig in figures:
        plt.close(fig)


def test_an_unknown_block_is_an_error_listing_the_blocks():
    _, gm = _gpt()
    with pytest.raises(ValueError, match=r"no node of the graph runs in 'h\.9'.*h\.0, h\.1"):
        block_graph(gm, "h.9")


def test_cli_unknown_block_is_refused_before_anything_is_written(tmp_path, capsys):
    code = main(["inspect", ROOT_FACTORY, "--n", "2", "--block", "h.9", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--block h.9: no such block in the model; valid blocks: h.0, h.1" in err
    assert "h.0.attn" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
