"""Pictures of a rewrite: one block's graph with the mHC nodes highlighted, H_res heat maps, gains across depth.

Drawn with networkx and matplotlib (no system package needed). The file type follows the extension
(``.png``, ``.svg``, ``.pdf``). Figures have a fixed size in inches and are saved at ``dpi`` without
cropping, so a PNG is exactly ``figsize * dpi`` pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import torch  # noqa: E402
from torch import fx  # noqa: E402

from ..passes.nodes import is_mhc_node  # noqa: E402
from .diagnostics import StreamDiagnostics  # noqa: E402
from .text import in_module, is_noise  # noqa: E402

MHC_COLOR, PARAM_COLOR, IO_COLOR, OP_COLOR = "#f28e2b", "#fcd9b0", "#59a14f", "#bab0ac"


def _label(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return node.target.rsplit(".", 1)[-1]
    if node.op in ("placeholder", "output", "call_method"):
        return str(node.target)[:14]
    target = node.target
    name = getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)
    return name[:14]


def _drawn_input(node: fx.Node) -> bool:
    """Inputs of a block worth drawing: tensors coming in, not weights or sizes."""
    val = node.meta.get("val")
    return node.op != "get_attr" and not is_noise(node) and (val is None or isinstance(val, torch.Tensor))


def block_graph(gm: fx.GraphModule, module_path: Optional[str] = None) -> nx.DiGraph:
    """The dataflow graph of ``gm`` (or of the nodes inside ``module_path`` and their direct inputs)."""
    keep = [n for n in gm.graph.nodes
            if n.op != "get_attr" and not is_noise(n) and (module_path is None or in_module(n, module_path))]
    if module_path is not None:  # the tensors flowing into the block, so its inputs are visible
        keep = list(dict.fromkeys([src for n in keep for src in n.all_input_nodes if _drawn_input(src)] + keep))
    graph = nx.DiGraph()
    for node in keep:
        graph.add_node(node.name, label=_label(node), mhc=is_mhc_node(node), op=node.op)
    names = set(graph.nodes)
    for node in keep:
        for src in node.all_input_nodes:
            if src.name in names:
                graph.add_edge(src.name, node.name)
    return graph


def draw_graph(gm: fx.GraphModule, path: str | Path, module_path: Optional[str] = None, dpi: int = 100,
               title: Optional[str] = None, figsize: Optional[tuple[float, float]] = None) -> Path:
    """Draw ``gm`` (or one block of it) to ``path``: mHC ops in orange, inputs in green, weights left out.

    Args:
        gm: a traced or converted graph module.
        path: output file; its extension picks the format.
        module_path: draw only this module's nodes (e.g. ``"model.layers.0"``), with their inputs.
        figsize: inches; by default sized to the graph's width and depth.
    Returns:
        The path written.
    """
    graph = block_graph(gm, module_path)
    for depth, layer in enumerate(nx.topological_generations(graph)):
        for name in layer:
            graph.nodes[name]["depth"] = depth
    depth = max((d for _, d in graph.nodes(data="depth")), default=0) + 1
    width = max((sum(1 for _, d in graph.nodes(data="depth") if d == k) for k in range(depth)), default=1)
    pos = nx.multipartite_layout(graph, subset_key="depth", align="horizontal", scale=1.0)
    pos = {k: (x, -y) for k, (x, y) in pos.items()}  # inputs at the top
    fig = plt.figure(figsize=figsize or (max(6.0, 1.3 * width), max(4.0, 0.6 * depth)), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 0.95 if title else 1))
    ax.set_axis_off()
    colors = [MHC_COLOR if d["mhc"] and d["op"] != "get_attr" else PARAM_COLOR if d["mhc"]
              else IO_COLOR if d["op"] in ("placeholder", "output") else OP_COLOR for _, d in graph.nodes(data=True)]
    nx.draw_networkx_edges(graph, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#888888", node_size=1300)
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colors, node_size=1300, node_shape="s")
    nx.draw_networkx_labels(graph, pos, ax=ax, labels=dict(graph.nodes(data="label")), font_size=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def plot_h_res(diagnostics: StreamDiagnostics, path: str | Path, dpi: int = 100, columns: int = 6) -> Path:
    """Heat maps of the token-averaged ``H_res`` of every site, one panel per site, in depth order."""
    sites = diagnostics.sites
    rows = math.ceil(len(sites) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.0 * rows + 0.4), dpi=dpi, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, site in zip(axes.flat, sites):
        h = site.h_res.numpy()
        ax.imshow(h, cmap="viridis", vmin=0.0, vmax=max(1.0, float(h.max())))
        ax.set_title(f"{site.index}: {site.module_path}"[-28:], fontsize=6)
        for i in range(h.shape[0]):
            for j in range(h.shape[1]):
                ax.text(j, i, f"{h[i, j]:.2f}", ha="center", va="center", fontsize=5,
                        color="white" if h[i, j] < 0.5 else "black")
    fig.suptitle("H_res per site (token mean)", fontsize=9)
    return _save(fig, path, dpi)


def plot_gains(diagnostics: StreamDiagnostics, path: str | Path, dpi: int = 100) -> Path:
    """Forward and backward Amax gain of the composite residual map against depth, one line per chain."""
    fig, ax = plt.subplots(figsize=(6.0, 3.5), dpi=dpi)
    for chain, gains in diagnostics.gains.items():
        depth = range(1, len(gains["forward"]) + 1)
        ax.plot(depth, gains["forward"], marker="o", markersize=3, label=f"chain {chain} forward")
        ax.plot(depth, gains["backward"], marker="s", markersize=3, linestyle="--", label=f"chain {chain} backward")
    ax.set_xlabel("layer (site) in the chain")
    ax.set_ylabel("Amax gain")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi)


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
