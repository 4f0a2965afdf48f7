"""An interactive view of a rewrite in Model Explorer (``pip install mhc_rewrite[explore]``).

A static drawing cannot show a 32-layer model (thousands of nodes); Model Explorer lays out any size of graph
and folds it by namespace. This module writes the original and the converted graph as one Model Explorer
JSON graph collection (its documented graph format, the one its ``graph_builder`` dataclasses serialise to),
so building and writing needs nothing but the standard library; only serving needs the ``model_explorer``
package (PyPI ``ai-edge-model-explorer``).

- Namespaces follow the module tree (``model/layers.0/self_attn``), so the graph opens collapsed by module.
- The mHC ops of a site sit in a group ``mhc <site>`` inside the site's block (``model/layers.0/mhc self_attn``),
  drawn orange, each with attributes ``mhc_site``, ``mhc_role``.
- With diagnostics, every mHC node of a site also carries the site's measurements (Amax gains, token-mean
  H_pre, H_post, H_res), and a node-data file colours the mHC nodes by the forward Amax gain at that depth.

Why our own graphs and not Model Explorer's PyTorch adapter: the adapter takes a ``torch.export``
``ExportedProgram`` (a converted model has to be re-exported first), places nodes by its own reading of the
module stack, and has no way to attach our per-site data; building from the ``GraphModule`` itself works for
symbolically traced and exported models alike and keeps the site records next to their nodes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import fx

from ..region import converted_graph
from .diagnostics import StreamDiagnostics, amax_gain
from .text import is_noise

log = logging.getLogger(__name__)

MHC_BACKGROUND, MHC_BORDER = "#f28e2b", "#b35806"


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return "" if path.startswith("_empty_nn_module_stack") else path  # torch.export's stand-in for none
    if node.op == "call_module":
        return node.target.rsplit(".", 1)[0] if "." in node.target else ""
    return ""


def _namespace(path: str) -> str:
    """``model.layers.0.self_attn`` -> ``model/layers.0/self_attn``: a list index stays with its list."""
    parts: list[str] = []
    for part in path.split(".") if path else []:
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    return "/".join(parts)


def mhc_namespace(module_path: str) -> str:
    """Where a site's mHC ops go: a group in the site's block, ``model/layers.0/mhc self_attn``."""
    block, _, leaf = module_path.rpartition(".")
    if not block:
        return f"mhc {module_path or 'root'}"
    ns = _namespace(block if not leaf.isdigit() else module_path)
    return f"{ns}/mhc {leaf}" if not leaf.isdigit() else f"{ns}/mhc"


def _label(node: fx.Node) -> str:
    if node.op in ("placeholder", "output", "call_module", "get_attr", "call_method"):
        return str(node.target).rsplit(".", 1)[-1]
    target = node.target
    return getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)


def _shape(value: Any) -> Optional[str]:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{','.join(str(d) for d in value.shape)}]"
    return None


def _matrix(t: torch.Tensor) -> str:
    rows = t.reshape(-1, t.shape[-1]).tolist()
    return "\n".join("[" + ", ".join(f"{v:.4f}" for v in row) + "]" for row in rows)


def site_attributes(diagnostics: StreamDiagnostics) -> dict[int, dict[str, str]]:
    """Site index -> the measurements shown on its mHC nodes (text values, as Model Explorer shows them)."""
    out = {}
    depth_in_chain: dict[Any, int] = {}
    for site in diagnostics.sites:
        depth = depth_in_chain.get(site.chain, 0)
        depth_in_chain[site.chain] = depth + 1
        gains = diagnostics.gains.get(site.chain, {})
        forward, backward = amax_gain(site.h_res)
        out[site.index] = {
            "amax_gain_forward_composite": f"{gains['forward'][depth]:.6f}" if gains else "",
            "amax_gain_backward_composite": f"{gains['backward'][depth]:.6f}" if gains else "",
            "amax_gain_this_h_res": f"forward {forward:.6f}, backward {backward:.6f}",
            "h_res_token_mean": _matrix(site.h_res),
            "h_pre_token_mean": _matrix(site.h_pre),
            "h_post_token_mean": _matrix(site.h_post),
            "depth_in_chain": f"{depth + 1} (chain {site.chain})",
        }
    return out


def explorer_graph(gm: fx.GraphModule, graph_id: str,
                   diagnostics: Optional[StreamDiagnostics] = None) -> dict[str, Any]:
    """One Model Explorer graph (a JSON-ready dict) of ``gm``, namespaced by module, mHC nodes marked.

    Args:
        gm: a traced model, or one returned by :func:`mhc_rewrite.convert` (the graph of its latest call).
        graph_id: the graph's name in Model Explorer's graph selector.
        diagnostics: :func:`mhc_rewrite.stream_diagnostics` of ``gm``; its per-site values become node attributes.
    Returns:
        ``{"id", "nodes": [...], "groupNodeConfigs": [...]}`` in Model Explorer's graph format. Reads of the
        model's own weights are left out (Model Explorer would draw each as a node); mHC parameters are kept.
    """
    if not isinstance(gm, fx.GraphModule):
        gm = converted_graph(gm)
    per_site = site_attributes(diagnostics) if diagnostics is not None else {}
    kept = [n for n in gm.graph.nodes if not is_noise(n)]
    names = {n.name for n in kept}
    nodes = []
    for node in kept:
        info = node.meta.get("mhc")
        attrs = {"op": node.op, "target": str(node.target)}
        entry: dict[str, Any] = {"id": node.name, "label": _label(node)}
        if info:
            entry["label"] = node.target.rsplit(".", 1)[-1] if node.op == "get_attr" else info["role"]
            entry["namespace"] = mhc_namespace(info["module_path"])
            attrs.update(mhc_site=str(info["site"]), mhc_role=info["role"], mhc_module_path=info["module_path"])
            attrs.update(per_site.get(info["site"], {}))
            entry["style"] = {"backgroundColor": MHC_BACKGROUND, "borderColor": MHC_BORDER}
        else:
            entry["namespace"] = _namespace(_module_path(node))
        entry["attrs"] = [{"key": k, "value": v} for k, v in attrs.items()]
        entry["incomingEdges"] = [{"sourceNodeId": src.name, "sourceNodeOutputId": "0", "targetNodeInputId": str(i)}
                                  for i, src in enumerate(node.all_input_nodes) if src.name in names]
        shape = _shape(node.meta.get("val"))
        if shape:
            entry["outputsMetadata"] = [{"id": "0", "attrs": [{"key": "tensor_shape", "value": shape}]}]
        nodes.append(entry)
    groups = [{"namespaceRegex": r"(.*/)?mhc( .*)?", "backgroundColor": "#fde3c8", "borderColor": MHC_BORDER}]
    return {"id": graph_id, "nodes": nodes, "groupNodeConfigs": groups}


def gain_node_data(graph: dict[str, Any]) -> dict[str, Any]:
    """Model Explorer node data for ``graph``: each mHC node's forward composite Amax gain, coloured."""
    results = {}
    for node in graph["nodes"]:
        attrs = {a["key"]: a["value"] for a in node.get("attrs", [])}
        if attrs.get("amax_gain_forward_composite"):
            results[node["id"]] = {"value": float(attrs["amax_gain_forward_composite"])}
    gradient = [{"stop": 0, "bgColor": "#2c7bb6"}, {"stop": 0.5, "bgColor": "#ffffbf"},
                {"stop": 1, "bgColor": "#d7191c"}]
    return {graph["id"]: {"results": results, "gradient": gradient}}


def write_explorer_files(original: fx.GraphModule, converted: fx.GraphModule, out: str | Path,
                         diagnostics: Optional[StreamDiagnostics] = None, label: str = "mhc_rewrite") -> list[Path]:
    """Write what ``--explore`` serves: ``graphs.json`` (original and converted) and, with diagnostics,
    ``amax_gain_node_data.json``.

    Open them with ``model-explorer graphs.json --node_data_paths=amax_gain_node_data.json``, or drop the files
    onto an open Model Explorer page.

    Args:
        original: the traced model before the rewrite.
        converted: the model returned by :func:`mhc_rewrite.convert`.
        out: a folder, created if missing.
        diagnostics: :func:`mhc_rewrite.stream_diagnostics` of ``converted``.
        label: the collection's name in Model Explorer.
    Returns:
        The files written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    after = explorer_graph(converted, "converted (mHC)", diagnostics)
    collection = {"label": label, "graphs": [explorer_graph(original, "original"), after]}
    written = [out / "graphs.json"]
    written[0].write_text(json.dumps(collection))
    if diagnostics is not None:
        written.append(out / "amax_gain_node_data.json")
        written[1].write_text(json.dumps(gain_node_data(after), indent=1))
    log.info("wrote %s", ", ".join(map(str, written)))
    return written


def serve(files: list[Path], host: str = "localhost", port: int = 8080) -> None:
    """Open the written files in Model Explorer (starts its local server and a browser tab; blocks).

    Raises:
        ImportError: the optional ``model_explorer`` package is missing; the message says what to install.
    """
    try:
        import model_explorer
    except ImportError as exc:
        raise ImportError("--explore needs Model Explorer: pip install 'mhc_rewrite[explore]' "
                          "(or pip install ai-edge-model-explorer); --explore-out DIR writes the files "
                          "without it") from exc
    config = model_explorer.config()
    config.add_model_from_path(str(files[0]))
    for extra in files[1:]:
        config.add_node_data_from_path(str(extra))
    model_explorer.visualize_from_config(config, host=host, port=port)
