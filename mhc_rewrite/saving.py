"""Saving and loading converted models without running anything a file says.

A converted Hugging Face model saves with its own ``save_pretrained``: the weights file holds the mHC parameters
beside the model's (``<region>.mhc.<site>.*``) and ``config.json`` holds the conversion options under
``"mhc_rewrite"`` (plain data, ``mhc_rewrite/record.py``: the options, the region's module path and the shapes of
the example inputs). :func:`from_pretrained` loads it back like ``PeftModel.from_pretrained``:
the base model through its class's ``from_pretrained``, the options validated as user input, the conversion
re-done, then the mHC tensors read with safetensors (never pickle).

Any converted model (Hugging Face or not) also round-trips through ``state_dict``: convert the same architecture
with the same options, then ``load_state_dict`` (``torch.load(..., weights_only=True)`` reads a saved state dict).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import convert
from .errors import MHCRewriteError
from .record import inputs_from_spec, options_from_record
from .region import region_state


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
        example_inputs = inputs_from_spec(record["example_inputs"])
    converted = convert(base, example_inputs=example_inputs, **options)
    found = region_state(converted).path
    if region != found:
        raise MHCRewriteError(f"the saved model was converted at region {region!r}, this conversion found {found!r}")
    saved = _read_mhc_tensors(directory)
    expected = [name for name, _ in converted.named_parameters() if name.startswith("mhc.") or ".mhc." in name]
    keys = {name: _saved_key(converted, name, saved) for name in expected}
    if set(keys.values()) != set(saved):
        missing = sorted(name for name, key in keys.items() if key not in saved)[:5]
        unexpected = sorted(set(saved) - set(keys.values()))[:5]
        raise MHCRewriteError(f"the saved mHC parameters do not match this conversion: missing {missing}, "
                              f"unexpected {unexpected}")
    converted.load_state_dict({name: saved[key] for name, key in keys.items()}, strict=False)
    return converted


def _saved_key(model: nn.Module, name: str, saved: dict[str, torch.Tensor]) -> str:
    """The key ``save_pretrained`` wrote for parameter ``name``.

    Transformers renames keys on saving by regular expressions written for the model's own modules (Mixtral:
    ``.mlp.`` -> ``.block_sparse_moe.``), and they also match mHC names (``layers_0_mlp.phi``); the renaming is
    not undone on loading as it was done. The same renaming, applied here to the name, finds the saved key.
    """
    if name in saved:
        return name
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers before 5 renames nothing on saving
        return name
    (renamed,) = revert_weight_conversion(model, {name: torch.empty(0)})
    return renamed
