"""Pictures of a rewrite, in one namespace: block drawings (:mod:`.blocks`) and diagnostics plots (:mod:`.plots`).

Drawn with networkx and matplotlib (no system package needed). The file type follows the extension
(``.png``, ``.svg``, ``.pdf``). Figures have a fixed size in inches and are saved at ``dpi`` without
cropping, so a PNG is exactly ``figsize * dpi`` pixels.
"""

from .blocks import block_figures, block_graph, block_names, draw_block_pages, draw_graph
from .plots import gains_figure, h_res_figure, plot_gains, plot_h_res

__all__ = ["block_figures", "block_graph", "block_names", "draw_block_pages", "draw_graph", "gains_figure",
           "h_res_figure", "plot_gains", "plot_h_res"]
