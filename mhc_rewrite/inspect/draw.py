"""Pictures of a rewrite, in one namespace: block drawings (:mod:`.blocks`) and diagnostics plots (:mod:`.plots`).

Drawn with networkx and matplotlib (no system package needed). The file type follows the extension
(``.png``, ``.svg``, ``.pdf``). Figures have a fixed size in inches and are saved at ``dpi`` without
cropping, so a PNG is exactly ``figsize * dpi`` pixels.
"""

from .blocks import block_graph, block_names, draw_block_pages, draw_graph
from .plots import plot_gains, plot_h_res

__all__ = ["block_graph", "block_names", "draw_block_pages", "draw_graph", "plot_gains", "plot_h_res"]
