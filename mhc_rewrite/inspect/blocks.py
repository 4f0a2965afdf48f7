"""Drawings of one block's dataflow graph, before or after the rewrite, readable at 100 % zoom.

Layout (no Graphviz needed): each op sits on the row of its longest path from the block's inputs, so every edge
points down. The block's own ops fill the left lane of a row, the new mHC ops the right lane, so what was added
stands beside what was there. Text keeps one size (9 pt op names): a block taller than a screen is cut into
panels of ``rows_per_panel`` rows laid side by side, and panels that do not fit one page go to further files
(``block_after.png``, ``block_after-2.png``, ...). An edge between panels is drawn as a tag ``from 12`` above
its target, naming the number printed in the corner of its source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402
from torch import fx  # noqa: E402

from ..region import converted_graph  # noqa: E402
from .text import in_module, is_noise  # noqa: E402

#: Fill colours by kind of node; the legend of every drawing names them.
COLORS = {"op": "#d9e2ec", "io": "#a8d5a2", "mhc": "#f28e2b", "mhc_param": "#fcd9b0"}
KIND_NAMES = {"op": "op of the original block", "io": "input to the block (computed before it)",
              "mhc": "new mHC op", "mhc_param": "new mHC coefficient (h_pre, h_post, h_res)"}
FONT_SIZE = 9  # points: 12.5 px at 100 dpi, the size of a laptop screen's body text
BOX_W, BOX_H, COL_PITCH, ROW_PITCH = 1.6, 0.42, 1.8, 0.7  # inches
MAX_PAGE = (15.0, 9.5)  # inches: 1500 x 950 px at 100 dpi, inside a laptop screen


def _is_mhc(node: fx.Node) -> bool:
    return "mhc" in node.meta or str(node.target).startswith("mhc.") or "mhc." in str(node.target)


def _kind(node: fx.Node, module_path: Optional[str]) -> str:
    if _is_mhc(node):
        role = node.meta.get("mhc", {}).get("role", "")
        return "mhc_param" if role in ("h_pre", "h_post", "h_res") else "mhc"
    if node.op in ("placeholder", "output") or (module_path is not None and not in_module(node, module_path)):
        return "io"
    return "op"


def _owner_module(node: fx.Node) -> str:
    """Last part of the innermost module the node runs in (``q_proj``), or ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.rsplit(".", 1)[-1]


def _op_name(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return node.target.rsplit(".", 1)[-1]
    if node.op in ("placeholder", "output", "call_method"):
        return str(node.target)
    target = node.target
    return getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)


def node_text(node: fx.Node) -> tuple[str, str]:
    """``(op, detail)`` printed in a node's box: the full op name, and where it runs or what it is."""
    info = node.meta.get("mhc")
    if info:
        return info["role"], f"site {info['site']}"
    op = _op_name(node)
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        return op, type(module).__name__ if module is not None else ""
    owner = _owner_module(node)
    return op, "" if owner == op or owner.isdigit() else owner


def _drawn_input(node: fx.Node) -> bool:
    """Inputs of a block worth drawing: tensors coming in, not weights or sizes."""
    val = node.meta.get("val")
    return node.op != "get_attr" and not is_noise(node) and (val is None or isinstance(val, torch.Tensor))


def block_graph(gm: fx.GraphModule, module_path: Optional[str] = None) -> nx.DiGraph:
    """The dataflow graph of ``gm`` (or of the nodes inside ``module_path`` and their direct inputs).

    Args:
        gm: a traced or converted graph module.
        module_path: keep only this module's nodes (e.g. ``"model.layers.0"``) and the tensors flowing in.
    Returns:
        A ``networkx.DiGraph`` keyed by node name; node data: ``label`` (op name), ``detail``, ``kind``
        (a key of :data:`COLORS`), ``mhc`` (bool), ``op`` (fx opcode), ``order`` (position in the graph).
    Raises:
        ValueError: ``module_path`` matches no node; the message lists the modules that do.
    """
    if not isinstance(gm, fx.GraphModule):  # a converted model: the graph of its latest call
        gm = converted_graph(gm)
    keep = [n for n in gm.graph.nodes
            if n.op != "get_attr" and not is_noise(n) and (module_path is None or in_module(n, module_path))]
    if module_path is not None and not keep:
        raise ValueError(f"no node of the graph runs in {module_path!r}; blocks with residual sites: "
                         + ", ".join(block_names(gm)))
    if module_path is not None:  # the tensors flowing into the block, so its inputs are visible
        keep = list(dict.fromkeys([src for n in keep for src in n.all_input_nodes if _drawn_input(src)] + keep))
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    graph = nx.DiGraph()
    for node in keep:
        label, detail = node_text(node)
        kind = _kind(node, module_path)
        graph.add_node(node.name, label=label, detail=detail, kind=kind, mhc=kind.startswith("mhc"), op=node.op,
                       order=order[node])
    for node in keep:
        for src in node.all_input_nodes:
            if src.name in graph:
                graph.add_edge(src.name, node.name)
    return graph


def block_names(gm: fx.GraphModule) -> list[str]:
    """Module paths that hold residual sites' blocks (``model.layers.0``, ...), in graph order."""
    sites = getattr(gm, "mhc_sites", None) or [s.info() for s in gm.meta.get("mhc_sites", [])]
    paths = [s.module_path for s in sites]
    blocks = [p.rsplit(".", 1)[0] if "." in p else p for p in paths]
    return list(dict.fromkeys(blocks + paths)) if paths else sorted(
        {path for n in gm.graph.nodes for path, _ in (n.meta.get("nn_module_stack") or {}).values() if path})


@dataclass
class _Layout:
    rank: dict[str, int]  # longest-path depth: every edge goes to a higher rank
    row: dict[str, int]  # drawn row: a rank wider than a lane allows takes several rows
    column: dict[str, int]  # within its panel: original lane first, then the mHC lane
    panel: dict[str, int]
    panel_columns: list[int]
    rows_per_panel: int


LANE_CAPACITY = (5, 3)  # boxes per row: original lane, mHC lane (8 x 1.8 in fits a 15 in page)


def _layout(graph: nx.DiGraph, rows_per_panel: int) -> _Layout:
    rank = {}
    for depth, layer in enumerate(nx.topological_generations(graph)):
        for name in layer:
            rank[name] = depth
    for name in reversed(list(nx.topological_sort(graph))):  # ops sink next to their first user; inputs stay on top
        if graph.succ[name] and graph.nodes[name]["kind"] != "io":
            rank[name] = min(rank[s] for s in graph.succ[name]) - 1
    by_rank: dict[int, list[str]] = {}
    for name in sorted(graph, key=lambda k: graph.nodes[k]["order"]):
        by_rank.setdefault(rank[name], []).append(name)
    row, slot, next_row = {}, {}, 0
    for r, names in sorted(by_rank.items()):
        used = 1
        for lane in (0, 1):
            members = [k for k in names if graph.nodes[k]["mhc"] == bool(lane)]
            # keep each node near its inputs (the mean slot of its predecessors), in graph order for ties
            members.sort(key=lambda k: (sum(slot.get(p, 0) for p in graph.pred[k]) / max(1, len(graph.pred[k])),
                                        graph.nodes[k]["order"]))
            for i, name in enumerate(members):
                slot[name], row[name] = i % LANE_CAPACITY[lane], next_row + i // LANE_CAPACITY[lane]
            used = max(used, -(-len(members) // LANE_CAPACITY[lane]))
        next_row += used
    panel = {name: r // rows_per_panel for name, r in row.items()}
    lane_width = [[0, 0] for _ in range(max(panel.values(), default=0) + 1)]
    for name, i in slot.items():
        lane = int(graph.nodes[name]["mhc"])
        lane_width[panel[name]][lane] = max(lane_width[panel[name]][lane], i + 1)
    column = {name: i + (lane_width[panel[name]][0] if graph.nodes[name]["mhc"] else 0) for name, i in slot.items()}
    return _Layout(rank, row, column, panel, [max(1, a + b) for a, b in lane_width], rows_per_panel)


def _pages(panel_columns: list[int], max_width: float) -> list[list[int]]:
    pages, current, width = [], [], 0.0
    for p, cols in enumerate(panel_columns):
        w = cols * COL_PITCH + 0.5
        if current and width + w > max_width:
            pages.append(current)
            current, width = [], 0.0
        current.append(p)
        width += w
    return pages + [current] if current else pages


def _wrap(text: str, width: int = 19) -> str:
    """Wrap an op name at its underscores (``scaled_dot_product_`` / ``attention``), never cutting it off."""
    parts = [p + "_" for p in text.split("_")[:-1]] + [text.split("_")[-1]]
    lines = [""]
    for part in parts:
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(line for line in lines if line)


def draw_block_pages(gm: fx.GraphModule, path: str | Path, module_path: Optional[str] = None, dpi: int = 100,
                     title: Optional[str] = None, rows_per_panel: int = 12) -> list[Path]:
    """Draw one block of ``gm`` (or all of it) to ``path``, and to ``path-2``, ... when it needs more pages.

    Args:
        gm: a traced or converted graph module.
        path: output file; its extension picks the format (``.png``, ``.svg``, ``.pdf``).
        module_path: draw only this module's nodes (e.g. ``"model.layers.0"``), with their inputs.
        dpi: pixels per inch; the text stays 9 pt whatever the size of the block.
        title: printed above the drawing.
        rows_per_panel: rows of ops per panel before the drawing continues in the next panel.
    Returns:
        The files written, first page first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for index, fig in enumerate(block_figures(gm, module_path, dpi, title, rows_per_panel)):
        target = path if index == 0 else path.with_name(f"{path.stem}-{index + 1}{path.suffix}")
        fig.savefig(target, dpi=dpi)
        plt.close(fig)
        written.append(target)
    return written


def block_figures(gm: fx.GraphModule, module_path: Optional[str] = None, dpi: int = 100,
                  title: Optional[str] = None, rows_per_panel: int = 12) -> list[Figure]:
    """The pages of :func:`draw_block_pages` as matplotlib figures (each at most :data:`MAX_PAGE` inches)."""
    graph = block_graph(gm, module_path)
    layout = _layout(graph, rows_per_panel)
    number = {name: i for i, name in enumerate(sorted(graph, key=lambda k: (layout.row[k], layout.column[k])))}
    pages = _pages(layout.panel_columns, MAX_PAGE[0])
    figures = []
    for page_index, panels in enumerate(pages):
        suffix = f" (page {page_index + 1} of {len(pages)})" if len(pages) > 1 else ""
        figures.append(_page_figure(graph, layout, number, panels, dpi, (title or "") + suffix))
    return figures


def _page_figure(graph, layout: _Layout, number, panels: list[int], dpi: int, title: str) -> Figure:
    rows = max(layout.row.values(), default=0) + 1
    per_panel = layout.rows_per_panel
    rows_here = min(rows - panels[0] * per_panel, per_panel)
    origin, x = {}, 0.25
    for p in panels:
        origin[p] = x
        x += layout.panel_columns[p] * COL_PITCH + 0.5
    width = max(x, 7.0)
    legend_columns = 4 if width >= 13 else 2
    header = 1.0 if legend_columns == 4 else 1.3
    height = min(MAX_PAGE[1], header + rows_here * ROW_PITCH + 0.3)
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # y grows downwards, in inches
    ax.set_axis_off()

    def centre(name):
        p = layout.panel[name]
        return (origin[p] + layout.column[name] * COL_PITCH + BOX_W / 2,
                header + (layout.row[name] - p * per_panel) * ROW_PITCH + BOX_H / 2)

    shown = {name for name in graph if layout.panel[name] in origin}
    for src, dst in graph.edges:
        if dst not in shown:
            continue
        if src in shown and layout.panel[src] == layout.panel[dst]:
            (x0, y0), (x1, y1) = centre(src), centre(dst)
            bend = 0.0 if layout.row[dst] - layout.row[src] == 1 else -0.25
            ax.add_patch(FancyArrowPatch((x0, y0 + BOX_H / 2), (x1, y1 - BOX_H / 2), arrowstyle="-|>",
                                         mutation_scale=10, color="#555555", linewidth=1.0,
                                         connectionstyle=f"arc3,rad={bend}", zorder=1))
    tags: dict[str, list[int]] = {}
    for src, dst in graph.edges:
        if dst in shown and layout.panel[src] != layout.panel[dst]:
            tags.setdefault(dst, []).append(number[src])
    for name in shown:
        data = graph.nodes[name]
        cx, cy = centre(name)
        ax.add_patch(FancyBboxPatch((cx - BOX_W / 2, cy - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0,rounding_size=0.06", facecolor=COLORS[data["kind"]],
                                    edgecolor="#333333", linewidth=0.8, zorder=2))
        label = _wrap(data["label"])
        two_lines = "\n" in label
        ax.text(cx, cy - (0 if two_lines or not data["detail"] else 0.07), label, ha="center", va="center",
                fontsize=FONT_SIZE if not two_lines else FONT_SIZE - 1, zorder=3)
        if data["detail"] and not two_lines:
            detail = data["detail"] if len(data["detail"]) <= 24 else data["detail"][:23] + "…"
            ax.text(cx, cy + 0.11, detail, ha="center", va="center", fontsize=FONT_SIZE - 1,
                    color="#444444", style="italic", zorder=3)
        ax.text(cx - BOX_W / 2 + 0.03, cy - BOX_H / 2 - 0.02, str(number[name]), ha="left", va="bottom",
                fontsize=FONT_SIZE - 1, color="#777777", zorder=3)
        if name in tags:
            ax.text(cx + BOX_W / 2 - 0.03, cy - BOX_H / 2 - 0.02, "from " + ", ".join(map(str, sorted(tags[name]))),
                    ha="right", va="bottom", fontsize=FONT_SIZE - 1, color="#b03000", zorder=3)
    for p in panels[1:]:
        ax.axvline(origin[p] - 0.3, ymin=0.03, ymax=1 - header / height, color="#bbbbbb", linewidth=0.8)
    handles = [Patch(facecolor=c, edgecolor="#333333", label=KIND_NAMES[k])
               for k, c in COLORS.items() if any(graph.nodes[n]["kind"] == k for n in graph)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.25 / width, 1 - 0.38 / height), ncols=legend_columns,
              fontsize=FONT_SIZE, frameon=False, handlelength=1.2, borderaxespad=0)
    ax.text(0.25, 0.25, title, ha="left", va="center", fontsize=FONT_SIZE + 2, weight="bold")
    ax.text(width - 0.25, 0.25, "read down each panel, panels left to right;\n'from k': its input k is drawn in "
            "another panel", ha="right", va="center", fontsize=FONT_SIZE - 1, color="#555555")
    return fig


def draw_graph(gm: fx.GraphModule, path: str | Path, module_path: Optional[str] = None, dpi: int = 100,
               title: Optional[str] = None, rows_per_panel: int = 12) -> Path:
    """Draw ``gm`` (or one block of it) to ``path``; see :func:`draw_block_pages`. Returns the first page."""
    return draw_block_pages(gm, path, module_path, dpi, title, rows_per_panel)[0]
