"""See what a rewrite did: reports, code of a block before and after, graph drawings, stream diagnostics.

    explain(model)                       Report: a table of sites, and JSON
    sites_table(sites), block_code(gm, path)    text views
    stream_diagnostics(gm, *inputs)      mean H_pre/H_post/H_res per site, Amax gain across depth
    draw_graph, plot_h_res, plot_gains   PNG/SVG pictures (matplotlib, imported on first use)
    draw_block_pages, block_names        one block on as many pages as it needs; the blocks there are
    inspect.explore                      Model Explorer graphs of a rewrite (write_explorer_files, serve)
"""

from .diagnostics import StreamDiagnostics, amax_gain, composite_gains, stream_diagnostics
from .report import Report, explain
from .text import block_code, sites_table

_DRAWING = ("draw_graph", "draw_block_pages", "block_figures", "block_names", "plot_h_res", "plot_gains",
            "h_res_figure", "gains_figure", "block_graph")

__all__ = ["Report", "StreamDiagnostics", "amax_gain", "block_code", "composite_gains", "explain", "sites_table",
           "stream_diagnostics", *_DRAWING]


def __getattr__(name):
    if name in _DRAWING:  # keep matplotlib out of `import mhc_rewrite`
        from . import draw

        return getattr(draw, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
