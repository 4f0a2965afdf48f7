"""Saving and loading converted models without running anything a file says.

A converted Hugging Face model saves with its own ``save_pretrained``: the weights file holds the mHC parameters
beside the model's (``<region>.mhc.<site>.*``) and ``config.json`` holds the conversion options under
``"mhc_rewrite"`` (plain data: ``n``, ``dynamic``, ``sinkhorn_iters``, ``mode``, ``init``, the region's module
path and the shapes of the example inputs). :func:`from_pretrained` loads it back like ``PeftModel.from_pretrained``:
the base model through its class's ``from_pretrained``, the options validated as user input, the conversion
re-done, then the mHC tensors read with safetensors (never pickle).

Any converted model (Hugging Face or not) also round-trips through ``state_dict``: convert the same architecture
with the same options, then ``load_state_dict`` (``torch.load(..., weights_only=True)`` reads a saved state dict).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import MHCConfig
from .errors import MHCRewriteError
from .region import region_of

_INPUT_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32, "bool": torch.bool}


def example_input_spec(example_inputs: Any) -> Optional[dict]:
    """Shapes and dtypes of tensor example inputs, as plain data (``None`` if they are not all plain tensors)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    items = example_inputs.items() if isinstance(example_inputs, dict) else enumerate(example_inputs or ())
    spec = {}
    for name, value in items:
        dtype = str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else None
        if dtype not in _INPUT_DTYPES:
            return None
        spec[str(name)] = {"shape": list(value.shape), "dtype": dtype}
    return {"keyword": isinstance(example_inputs, dict), "tensors": spec} if spec else None


def _inputs_from_spec(spec: dict) -> Any:
    """Zero tensors of the recorded shapes (a trace needs shapes, not values)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("tensors"), dict):
        raise MHCRewriteError(f"the saved example-input record is not valid: {spec!r}")
    tensors = {}
    for name, entry in spec["tensors"].items():
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if dtype not in _INPUT_DTYPES or not isinstance(shape, list) or not all(
                isinstance(s, int) and 0 < s <= 1 << 16 for s in shape):
            raise MHCRewriteError(f"the saved example input {name!r} is not valid: {entry!r}")
        tensors[name] = torch.zeros(shape, dtype=_INPUT_DTYPES[dtype])
    return tensors if spec.get("keyword") else tuple(tensors[k] for k in sorted(tensors, key=int))


def options_from_record(record: Any) -> tuple[dict, str]:
    """The conversion options and region path of a saved ``"mhc_rewrite"`` record, validated as user input."""
    if not isinstance(record, dict):
        raise MHCRewriteError(f"the saved mhc_rewrite record must be a dict, got {type(record).__name__}")
    names = {f.name for f in dataclasses.fields(MHCConfig)} - {"filter_fn"}
    unknown = set(record) - names - {"region", "example_inputs"}
    if unknown:
        raise MHCRewriteError(f"the saved mhc_rewrite record has unknown keys {sorted(unknown)}; "
                              f"valid keys: {sorted(names | {'region', 'example_inputs'})}")
    options = {k: record[k] for k in names if k in record}
    try:
        MHCConfig(**options)
    except (TypeError, ValueError) as exc:
        raise MHCRewriteError(f"the saved mhc_rewrite options are not valid: {exc}") from exc
    region = record.get("region", "")
    if not isinstance(region, str):
        raise MHCRewriteError(f"the saved region path must be a string, got {region!r}")
    return options, region


def _read_mhc_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise MHCRewriteError(f"{path} is missing: save the converted model with save_pretrained(...)")
        tensors.update({k: v for k, v in load_file(str(path)).items() if k.startswith("mhc.") or ".mhc." in k})
    return tensors


def from_pretrained(model_or_class: Any, path: str | Path, example_inputs: Any = None, **load_options) -> nn.Module:
    """Load a converted Hugging Face model saved with ``save_pretrained``.

    Args:
        model_or_class: the base model's class (e.g. ``LlamaForCausalLM``; its ``from_pretrained(path)`` loads
            the base weights) or an already loaded base model.
        path: the directory ``save_pretrained`` wrote.
        example_inputs: inputs to trace the base model with; by default zeros of the shapes recorded at saving.
        **load_options: passed to ``model_class.from_pretrained``.
    Returns:
        The converted model, with outputs equal to the saved one's.

    Example:
        >>> model = mhc_rewrite.from_pretrained(LlamaForCausalLM, "out/")
    """
    from .convert import convert

    directory = Path(path)
    if isinstance(model_or_class, type):
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the mHC tensors are "unexpected" to the base class: we load them below
        try:
            base = model_or_class.from_pretrained(directory, **load_options)
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        base = model_or_class
    record = getattr(getattr(base, "config", None), "mhc_rewrite", None)
    if record is None:
        config_file = directory / "config.json"
        record = json.loads(config_file.read_text()).get("mhc_rewrite") if config_file.exists() else None
    if record is None:
        raise MHCRewriteError(f"{directory} holds no mhc_rewrite record: it was not saved from a converted model")
    options, region = options_from_record(record)
    if hasattr(base.config, "mhc_rewrite"):
        del base.config.mhc_rewrite  # the base is not converted; the converted copy gets its own record
    if example_inputs is None:
        if record.get("example_inputs") is None:
            raise MHCRewriteError("no example inputs were recorded: pass example_inputs= to from_pretrained")
        example_inputs = _inputs_from_spec(record["example_inputs"])
    converted = convert(base, example_inputs=example_inputs, **options)
    found = region_of(converted).__dict__["_mhc_state"].path
    if region != found:
        raise MHCRewriteError(f"the saved model was converted at region {region!r}, this conversion found {found!r}")
    tensors = _read_mhc_tensors(directory)
    expected = {name for name, _ in converted.named_parameters() if name.startswith("mhc.") or ".mhc." in name}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors))[:5], sorted(set(tensors) - expected)[:5]
        raise MHCRewriteError(f"the saved mHC parameters do not match this conversion: missing {missing}, "
                              f"unexpected {unexpected}")
    converted.load_state_dict(tensors, strict=False)
    return converted
