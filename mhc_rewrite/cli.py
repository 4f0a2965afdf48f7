"""Command line: ``python -m mhc_rewrite inspect MODULE:FACTORY [--n 4] [--out DIR]``.

``FACTORY`` is a function (in an importable module, or a ``path/to/file.py``) that returns a model, or a pair
``(model, example_inputs)``. The command converts the model, prints the report, and with ``--out`` writes
``report.json``, drawings of one block before and after (``block_before.png``, ``block_after.png``), and, when
example inputs are given, ``h_res.png`` (heat maps) and ``gains.png`` (Amax gain against depth).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from . import convert
from .config import MHCConfig, option_names
from .convert import trace_unconverted
from .inspect import explain, stream_diagnostics
from .trace import split_example_inputs


class CLIError(Exception):
    """A problem with what was asked on the command line; printed without a traceback."""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one command-line flag per option of :class:`MHCConfig` (``--sinkhorn-iters``, ``--static``, ...)."""
    for f in fields(MHCConfig):
        meta = f.metadata
        if isinstance(f.default, bool):
            flag = meta.get("flag", "--no-" + f.name.replace("_", "-") if f.default else "--" + f.name)
            parser.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                                help=meta.get("flag_help", meta["help"]))
            continue
        bounds = f", {meta['low']} to {meta['high']}" if "high" in meta else ""
        parser.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), dest=f.name, type=type(f.default),
                            default=f.default, choices=meta.get("choices"),
                            help=f"{meta['help']} (default {f.default}{bounds})")


def config_from_args(args: argparse.Namespace) -> MHCConfig:
    """The :class:`MHCConfig` of parsed command-line flags (see :func:`add_config_arguments`)."""
    return MHCConfig(**{name: getattr(args, name) for name in option_names()})


def load_factory(spec: str):
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    if ":" not in spec:
        raise CLIError(f"expected MODULE:FACTORY (e.g. mypkg.models:build), got {spec!r}")
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise CLIError(f"no such file: {module_name}")
        loader_spec = importlib.util.spec_from_file_location(f"_mhc_factory_{path.stem}", path)  # no clash
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        sys.modules[loader_spec.name] = module  # dataclasses in the file look their module up there
        loader_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise CLIError(f"cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise CLIError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise CLIError(f"{spec} is not callable (a {type(factory).__name__})")
    return factory


def build(factory):
    """Call the factory; return ``(model, example_inputs or None)``."""
    try:
        made = factory()
    except Exception as exc:
        raise CLIError(f"the factory raised {type(exc).__name__}: {exc}") from exc
    if isinstance(made, nn.Module):
        return made, None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        return made
    raise CLIError(f"the factory must return an nn.Module or (model, example_inputs), got {type(made).__name__}")


def _first_block(sites) -> str:
    path = sites[0].module_path
    parent = path.rsplit(".", 1)[0] if "." in path else path
    return parent if any(s.module_path.startswith(parent + ".") for s in sites[1:]) else path


def inspect_command(args) -> int:
    from .inspect import draw_block_pages, plot_gains, plot_h_res

    model, example_inputs = build(load_factory(args.factory))
    options = config_from_args(args).to_dict()
    converted = convert(model, example_inputs=example_inputs, **options)
    if converted is model:
        print(explain(model, example_inputs, **options))
        return 0
    original = after = None
    if args.block or args.out or args.explore or args.explore_out:  # the graphs before and after, to draw
        original = trace_unconverted(model, example_inputs)
        after = convert(original, example_inputs=example_inputs, **options)  # the same rewrite, as one graph
    if args.block:
        _check_block(after, args.block)
    report = explain(converted)
    diagnostics = None
    if example_inputs is not None:
        call_args, call_kwargs = split_example_inputs(example_inputs)
        diagnostics = stream_diagnostics(converted, *call_args, **call_kwargs)
        report.diagnostics = diagnostics.to_dict()
    print(report)
    if diagnostics is not None:
        forward, backward = diagnostics.max_gain()
        print(f"\nAmax gain of the composite residual map: forward {forward:.4f}, backward {backward:.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        block = args.block or _first_block(converted.mhc_sites)
        written = [*draw_block_pages(original, out / "block_before.png", block, title=f"{block}: before"),
                   *draw_block_pages(after, out / "block_after.png", block, title=f"{block}: after")]
        if diagnostics is not None:
            written += [plot_h_res(diagnostics, out / "h_res.png"), plot_gains(diagnostics, out / "gains.png")]
        (out / "report.json").write_text(report.to_json())
        written.append(out / "report.json")
        print("\nwrote " + ", ".join(str(p) for p in written))
    if args.explore or args.explore_out:
        from .inspect.explore import serve, write_explorer_files

        folder = args.explore_out or tempfile.mkdtemp(prefix="mhc_explore_")
        files = write_explorer_files(original, after, folder, diagnostics, label=report.model)
        print("\nModel Explorer files: " + ", ".join(str(p) for p in files))
        if args.explore:
            serve(files)
    return 0


def _check_block(converted, block: str) -> None:
    from .inspect.blocks import block_names
    from .inspect.text import in_module

    if not any(in_module(node, block) for node in converted.graph.nodes):
        blocks, sites = _split_names(block_names(converted), converted.mhc_sites)
        raise CLIError(f"--block {block}: no such block in the model; valid blocks: {', '.join(blocks)}"
                       + (f" (or one residual site: {', '.join(sites)})" if sites else ""))


def _split_names(names: list[str], sites) -> tuple[list[str], list[str]]:
    site_paths = {s.module_path for s in sites}
    return [n for n in names if n not in site_paths] or names, [n for n in names if n in site_paths]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mhc_rewrite",
                                     description="mHC (Manifold-Constrained Hyper-Connections) for any PyTorch model.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="convert a model and show what was rewritten",
        description="Convert a model to mHC, print the report of its residual sites, and write pictures and "
                    "report.json. The model comes from a factory function.")
    inspect.add_argument("factory", metavar="MODULE:FACTORY",
                         help="a function returning a model or (model, example_inputs): "
                              "'package.module:function' (importable from here) or 'path/to/file.py:function'")
    add_config_arguments(inspect)  # one flag per MHCConfig option
    inspect.add_argument("--block", help="module path of the block to draw (default: the block of the first site)")
    inspect.add_argument("--out", metavar="DIR", help="write report.json and the pictures into DIR")
    inspect.add_argument("--explore", action="store_true",
                         help="open the original and converted graphs in Model Explorer (pip install "
                              "'mhc_rewrite[explore]'), folded by module, mHC nodes marked with their diagnostics")
    inspect.add_argument("--explore-out", metavar="DIR",
                         help="write the Model Explorer files (graphs.json, amax_gain_node_data.json) into DIR "
                              "instead of serving them; no extra package needed")
    inspect.set_defaults(run=inspect_command)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    torch.manual_seed(0)
    try:
        return args.run(args)
    except (CLIError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
