"""Model Explorer graphs of a rewrite: node counts, mHC nodes in their layers' namespaces, site data on them.

Building and writing the graphs needs no extra package; the check that Model Explorer's own graph classes
read our files runs only where the optional ``ai-edge-model-explorer`` is installed (it is not in CI: with
its C++ adapter it is about 480 MB).
"""

import importlib.util
import json

import pytest
import torch

import mhc_rewrite
from mhc_rewrite.cli import main
from mhc_rewrite.inspect import stream_diagnostics
from mhc_rewrite.inspect.explore import explorer_graph, gain_node_data, mhc_namespace, serve, write_explorer_files
from mhc_rewrite.inspect.text import is_noise
from mhc_rewrite.trace import trace

from models import GPT, GPTConfig
from tolerances import assert_close

HAS_EXPLORER = importlib.util.find_spec("model_explorer") is not None


def _gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2))
    idx = torch.randint(0, 64, (2, 12))
    converted = mhc_rewrite.convert(model, example_inputs=(idx,))  # the graph it runs for idx is drawn
    return trace(model, (idx,)), mhc_rewrite.converted_graph(converted, idx), stream_diagnostics(converted, idx)


def _attrs(node):
    return {a["key"]: a["value"] for a in node["attrs"]}


def test_graphs_have_every_node_and_edge_and_mark_the_mhc_nodes():
    original, converted, diag = _gpt()
    before = explorer_graph(original, "original")
    after = explorer_graph(converted, "converted", diag)
    for gm, graph in ((original, before), (converted, after)):
        kept = [n for n in gm.graph.nodes if not is_noise(n)]
        assert [node["id"] for node in graph["nodes"]] == [n.name for n in kept]
        ids = {node["id"] for node in graph["nodes"]}
        edges = sum(len([s for s in n.all_input_nodes if s.name in ids]) for n in kept)
        assert sum(len(node["incomingEdges"]) for node in graph["nodes"]) == edges
        assert all(e["sourceNodeId"] in ids for node in graph["nodes"] for e in node["incomingEdges"])
    assert not any("mhc_site" in _attrs(node) for node in before["nodes"])
    marked = [node for node in after["nodes"] if "mhc_site" in _attrs(node)]
    assert len(marked) == sum("mhc" in n.meta for n in converted.graph.nodes) > 0
    assert all(node["style"]["backgroundColor"] for node in marked)
    kept_ids = {node["id"] for node in after["nodes"]} - {node["id"] for node in marked}
    removed = {node["id"] for node in before["nodes"]} - kept_ids
    assert kept_ids <= {node["id"] for node in before["nodes"]}  # no original op renamed or duplicated
    assert {"add_1", "add_2", "add_3", "add_4"} <= removed  # the 4 residual adds became post_res_mix ops


def test_mhc_nodes_sit_in_their_layers_namespace_and_carry_the_site_diagnostics():
    _, converted, diag = _gpt()
    after = explorer_graph(converted, "converted", diag)
    sites = {s.index: s for s in diag.sites}
    namespaces = {node["namespace"] for node in after["nodes"]}
    assert {"h.0/attn", "h.0/mlp", "h.1/attn", "h.1/mlp"} <= namespaces  # the module tree: collapsed by module
    for node in after["nodes"]:
        attrs = _attrs(node)
        if "mhc_site" not in attrs:
            continue
        site = sites[int(attrs["mhc_site"])]
        layer = site.module_path.split(".")[1]
        assert node["namespace"] == f"h.{layer}/mhc {site.module_path.rsplit('.', 1)[1]}"
        depth = [s.index for s in diag.sites].index(site.index)
        for way in ("forward", "backward"):
            printed = float(attrs[f"amax_gain_{way}_composite"])
            assert_close(printed, diag.gains[0][way][depth], "printed_6_decimals")
        first_row = attrs["h_res_token_mean"].splitlines()[0]
        assert first_row == "[" + ", ".join(f"{v:.4f}" for v in site.h_res[0].tolist()) + "]"
    data = gain_node_data(after)["converted"]
    assert set(data["results"]) == {n["id"] for n in after["nodes"] if "mhc_site" in _attrs(n)}
    for r in data["results"].values():  # identity init
        assert_close(r["value"], 1.0, "composite_gain")


@pytest.mark.parametrize("path,namespace", [("model.layers.3.self_attn", "model/layers.3/mhc self_attn"),
                                            ("blocks.1", "blocks.1/mhc"), ("", "mhc root")])
def test_mhc_namespace(path, namespace):
    assert mhc_namespace(path) == namespace


def test_hugging_face_llama_mhc_ops_land_in_their_decoder_layers():
    transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    converted = mhc_rewrite.convert(model, example_inputs=(ids,))
    graph = explorer_graph(converted, "converted", stream_diagnostics(converted, ids))
    ops = [n for n in graph["nodes"] if "mhc_site" in _attrs(n) and _attrs(n)["op"] == "call_function"]
    roles = sorted(_attrs(n)["mhc_role"] for n in ops)
    per_site = ["coefficients", "h_post", "h_pre", "h_res", "post_res_mix", "pre_mix"]
    assert roles == sorted(per_site * 4 + ["expand", "reduce"])  # 4 sites; streams made at the head, reduced at the end
    for node in ops:
        layer = _attrs(node)["mhc_module_path"].split(".")[2]
        assert node["namespace"].startswith(f"model/layers.{layer}/mhc ")
        assert "amax_gain_forward_composite" in _attrs(node)


def test_explore_out_writes_the_collection_and_node_data(tmp_path, capsys):
    code = main(["inspect", "tests/support/small_factories.py:gpt_two_layers", "--n", "2",
                 "--explore-out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    collection = json.loads((tmp_path / "graphs.json").read_text())
    assert [g["id"] for g in collection["graphs"]] == ["original", "converted (mHC)"]
    after = collection["graphs"][1]
    node_data = json.loads((tmp_path / "amax_gain_node_data.json").read_text())
    assert set(node_data["converted (mHC)"]["results"]) == {
        n["id"] for n in after["nodes"] if "mhc_site" in _attrs(n)}
    assert "Model Explorer files:" in capsys.readouterr().out


def test_serve_without_model_explorer_says_what_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "model_explorer", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'mhc_rewrite\[explore\]'"):
        serve([tmp_path / "graphs.json"])


@pytest.mark.skipif(not HAS_EXPLORER, reason="ai-edge-model-explorer (optional extra 'explore', ~480 MB with its "
                                             "adapter) is not installed; CI does not install it")
def test_model_explorer_reads_our_graphs(tmp_path):
    import dacite
    from model_explorer import graph_builder, node_data_builder

    original, converted, diag = _gpt()
    files = write_explorer_files(original, converted, tmp_path, diag)
    collection = json.loads(files[0].read_text())
    parsed = dacite.from_dict(graph_builder.GraphCollection, collection, config=dacite.Config(strict=True))
    assert [len(g.nodes) for g in parsed.graphs] == [len(g["nodes"]) for g in collection["graphs"]]
    mhc_node = next(n for n in parsed.graphs[1].nodes if n.namespace.endswith("/mhc attn"))
    assert isinstance(mhc_node.style, graph_builder.GraphNodeStyle)
    for graph_id, data in json.loads(files[1].read_text()).items():
        parsed_data = dacite.from_dict(node_data_builder.GraphNodeData, data, config=dacite.Config(strict=True))
        assert len(parsed_data.results) == len(data["results"]) > 0


def test_help_names_the_explore_flags():
    from mhc_rewrite.cli import make_parser

    inspect = make_parser()._subparsers._group_actions[0].choices["inspect"]
    text = inspect.format_help()
    assert "--explore " in text and "--explore-out DIR" in text and "mhc_rewrite[explore]" in text


def test_a_factory_file_with_dataclasses_loads(capsys):
    # tests/support/models.py defines dataclasses: its module must be registered while it runs (a bug found trying
    # --explore)
    assert main(["inspect", "tests/support/models.py:ResidualMLP"]) == 0, capsys.readouterr().err
    assert "ResidualMLP: 4 residual site(s) found; rewrote 4" in capsys.readouterr().out
