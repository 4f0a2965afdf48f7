"""Pipeline parallelism: cut a converted model's graph into stages for ``torch.distributed.pipelining``.

The decision (README, "Distributed"): stages are cut from the converted region's rewritten graph, not traced again
by ``torch.distributed.pipelining.pipeline()``. A converted model's forward runs a graph in which the transformer
blocks are no longer called as modules (their leaf modules and the mHC ops are), so module-level split points have
nothing to hook; the graph itself, though, knows which module every node came from (``nn_module_stack`` and
``node.meta["mhc"]``). :func:`split_stages` walks it in order and starts stage ``k + 1`` at the first node inside
the ``k``-th boundary module, so:

- what crosses a boundary is whatever the graph computes before it and reads after it: the n-stream tensor
  ``[B, T, n, C]`` as one tensor (the first stage expands, the last one reduces), plus any value the blocks share
  (rotary tables, masks), in graph order;
- each stage is a ``GraphModule`` over the same modules and parameters as the converted model, under the same
  names: its ``state_dict`` keys are the unsplit model's (each key in exactly one stage), its sites' mHC
  parameters included;
- each stage is wrapped as is by ``torch.distributed.pipelining.PipelineStage``; a schedule (``ScheduleGPipe``,
  ``Schedule1F1B``) splits the batch into micro-batches.

A stage runs the graph of one specialisation (the mode and the kind of call of ``example_inputs``): called in
the other mode it raises; split again after ``model.eval()`` for evaluation.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import fx, nn

from .errors import MHCRewriteError
from .region import region_call, region_of, region_state
from .trace import split_example_inputs

log = logging.getLogger(__name__)


def _node_path(node: fx.Node) -> str | None:
    """The deepest module path a node was traced in (None for nodes of the region's own forward)."""
    if "mhc" in node.meta and node.meta["mhc"].get("role") != "parameter":
        return node.meta["mhc"]["module_path"]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    if node.op == "call_module":
        return node.target
    return None


def _inside(path: str | None, boundary: str) -> bool:
    return path is not None and (path == boundary or path.startswith(boundary + "."))


def _assign(gm: fx.GraphModule, boundaries: Sequence[str]) -> dict[fx.Node, int]:
    """Stage of every computing node: a running counter over graph order, moved on at each boundary's first node."""
    stage, owner = 0, {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        while stage < len(boundaries) and _inside(_node_path(node), boundaries[stage]):
            stage += 1
        owner[node] = stage
    reached = max(owner.values(), default=0)
    if reached < len(boundaries):
        after = f" after {boundaries[reached - 1]!r}" if reached else ""
        paths = sorted({p for p in map(_node_path, gm.graph.nodes) if p})
        raise MHCRewriteError(
            f"split_stages: no node of the converted graph lies inside {boundaries[reached]!r}{after} (boundaries "
            f"are module paths in graph order; the graph's modules include {paths[:12]})")
    return owner


def _placement(gm: fx.GraphModule, owner: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """Stage of every ``get_attr`` node: its first user's (a buffer read by several stages is read by each; a
    parameter shared by two stages is refused by :func:`_check_unshared`)."""
    return {node: min((owner[u] for u in node.users if u in owner), default=0)
            for node in gm.graph.nodes if node.op == "get_attr"}


def _check_unshared(stages: list[fx.GraphModule]) -> None:
    """Each parameter in one stage only: tied weights (an embedding and the output head) or a block applied in two
    stages would be held by each with nothing to sum their gradients."""
    seen: dict[int, tuple[int, str]] = {}
    for index, stage in enumerate(stages):
        for name, param in stage.named_parameters(remove_duplicate=False):
            first = seen.setdefault(id(param), (index, name))
            if first[0] != index:
                raise MHCRewriteError(
                    f"split_stages: one parameter is {first[1]!r} in stage {first[0]} and {name!r} in stage {index} "
                    "(tied weights, or a module used on both sides of a boundary): each stage would hold its own copy "
                    "and nothing would sum their gradients; untie it, or move the boundary so that one stage holds "
                    "all its uses")


def _crossings(gm: fx.GraphModule, owner: dict[fx.Node, int], count: int) -> list[list[fx.Node]]:
    """``inputs[s]``: the values stage ``s`` receives, in graph order: made before it (placeholders by stage 0),
    read by it or by a later stage (a later stage's values travel through the stages between)."""
    stage_of = {**owner, **{n: 0 for n in gm.graph.nodes if n.op == "placeholder"}}
    last_use: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node in owner or node.op == "output":
            user_stage = owner.get(node, count - 1)
            for arg in node.all_input_nodes:
                if arg.op != "get_attr":
                    last_use[arg] = max(last_use.get(arg, 0), user_stage)
    inputs = [[] for _ in range(count)]
    for node in gm.graph.nodes:
        if node in stage_of and node in last_use:
            for s in range(stage_of[node] + 1, last_use[node] + 1):
                inputs[s].append(node)
    return inputs


def _check_tensor(node: fx.Node, stage: int) -> None:
    value = node.meta.get("val")
    if value is not None and not isinstance(value, torch.Tensor):
        raise MHCRewriteError(
            f"split_stages: {node.name} ({type(value).__name__}) would cross into stage {stage}, but pipeline "
            "stages send tensors only; move the boundary so that only tensors cross it")


def _stage_graph(gm: fx.GraphModule, stage: int, count: int, owner, placed, inputs) -> fx.Graph:
    graph, env = fx.Graph(), {}
    if stage == 0:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node, env.__getitem__)
    else:
        for node in inputs[stage]:
            _check_tensor(node, stage)
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
    for node in gm.graph.nodes:
        mine = owner.get(node) == stage or placed.get(node) == stage
        if node.op == "get_attr" and not mine and any(owner.get(u) == stage for u in node.users):
            mine = True  # read by several stages: each reads it (a parameter is refused later, _check_unshared)
        if mine:
            env[node] = graph.node_copy(node, env.__getitem__)
        elif node.op == "output" and stage == count - 1:
            graph.node_copy(node, env.__getitem__)
    if stage < count - 1:
        sent = inputs[stage + 1]
        graph.output(tuple(env[n] for n in sent) if len(sent) > 1 else env[sent[0]])
    graph.lint()
    return graph


def _keep_buffer_persistence(stage: fx.GraphModule, region: nn.Module) -> None:
    """``GraphModule`` registers every copied buffer as persistent: restore the region's non-persistent ones (e.g.
    rotary ``inv_freq``), so that the stage's ``state_dict`` keys stay the unsplit model's."""
    for name, module in region.named_modules():
        for buffer in getattr(module, "_non_persistent_buffers_set", ()):
            path = f"{name}.{buffer}" if name else buffer
            *parents, field = path.split(".")
            holder = stage
            try:
                for part in parents:
                    holder = getattr(holder, part)
            except AttributeError:
                continue
            if field in holder._buffers:
                holder._non_persistent_buffers_set.add(field)


def _check_mode(stage: nn.Module, args, kwargs=None):
    traced = stage.meta["mhc_stage"]["training"]
    if stage.training != traced:
        raise MHCRewriteError(
            f"pipeline stage {stage.meta['mhc_stage']['index']} was cut from the graph of a "
            f"{'train' if traced else 'eval'}-mode call and is called in {'train' if stage.training else 'eval'} "
            "mode: a converted graph holds one mode (dropout, batch norm); call split_stages again with the model "
            "in this mode")


def split_stages(model: nn.Module, example_inputs: Any, boundaries: Sequence[str]) -> list[fx.GraphModule]:
    """Cut a converted model into pipeline stages, one ``GraphModule`` per stage, for ``PipelineStage``.

    Args:
        model: a model returned by :func:`mhc_rewrite.convert` whose converted region is the model itself (the
            stages must reach the output: for a Hugging Face ``*ForCausalLM`` the region is ``model.model`` and the
            head and loss are outside it, see README "Distributed").
        example_inputs: the inputs of one micro-batch, as for ``model(...)`` (a tensor, a tuple, a dict); the
            stages run the graph of this call in the model's current mode (train mode for training).
        boundaries: module paths (``["h.2"]`` for two stages) in graph order; stage ``k + 1`` starts at the first
            node traced inside ``boundaries[k]``.
    Returns:
        ``len(boundaries) + 1`` stage modules. Stage 0 takes the model's inputs; every other stage takes what the
        previous one returns (the n-stream tensor, and any other value computed before the boundary and read after
        it); the last returns the model's output. They share the converted model's modules and parameters, under
        its names.
    Raises:
        MHCRewriteError: the region is not the model, a boundary is not found, a parameter would be shared by two
            stages, or a non-tensor value would cross a boundary.

    Example:
        >>> stage = PipelineStage(split_stages(model, x[:2], ["h.1"])[rank], rank, 2, torch.device("cpu"))
    """
    region = region_of(model)
    path = region_state(region).path
    if path:
        raise MHCRewriteError(
            f"split_stages: the converted region of {type(model).__name__} is {path!r}, not the model: what runs "
            f"after it (a head, a loss) is the user's code, outside the graph the stages are cut from. Split a model "
            "whose residuals reach its output (convert a module that holds the head), or shard it with FSDP2")
    if not boundaries:
        raise MHCRewriteError("split_stages: give at least one boundary (a module path) for two stages")
    args, kwargs = split_example_inputs(example_inputs)
    _, gm, _ = region_call(model, args, kwargs)
    if gm.meta.get("mhc_call") != "positional":
        raise MHCRewriteError(
            "split_stages: the converted region was traced by torch.export for this call; stages are cut from "
            "symbolically traced graphs only (an export graph's inputs and outputs are pytree-flattened)")
    owner = _assign(gm, list(boundaries))
    placed = _placement(gm, owner)
    count = len(boundaries) + 1
    inputs = _crossings(gm, owner, count)
    stages = []
    for index in range(count):
        stage = fx.GraphModule(gm, _stage_graph(gm, index, count, owner, placed, inputs), f"MHCStage{index}")
        _keep_buffer_persistence(stage, region)
        stage.meta["mhc_stage"] = {"index": index, "training": model.training, "boundaries": list(boundaries),
                                   "receives": [n.name for n in inputs[index]]}
        stage.train(model.training)
        stage.register_forward_pre_hook(_check_mode)
        stages.append(stage)
        log.info("stage %d of %d: receives %s; %d parameters", index, count,
                 stage.meta["mhc_stage"]["receives"] or "the model's inputs", len(list(stage.parameters())))
    _check_unshared(stages)
    return stages
