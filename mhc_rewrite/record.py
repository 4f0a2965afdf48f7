"""The record a converted model saves of its conversion: plain data, written and read back as user input.

``config.json`` of a converted Hugging Face model holds, under ``"mhc_rewrite"``, the options (``n``, ``dynamic``,
``sinkhorn_iters``, ``mode``, ``init``, ...), the region's module path and the shapes and dtypes of the example
inputs. :func:`conversion_record` writes it (``convert`` calls it); :func:`options_from_record` and
:func:`inputs_from_spec` read it back and validate every field (``mhc_rewrite.from_pretrained``): nothing in the
file is run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .config import MHCConfig
from .errors import MHCRewriteError

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


def inputs_from_spec(spec: dict) -> Any:
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


def conversion_record(config: MHCConfig, region: str, example_inputs: Any) -> dict:
    """The ``"mhc_rewrite"`` record of a conversion: options, region path, example-input shapes (plain data)."""
    return {**config.to_dict(), "region": region, "example_inputs": example_input_spec(example_inputs)}
