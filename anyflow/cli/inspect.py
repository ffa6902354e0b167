"""``anyflow inspect``: a checkpoint, a LoRA adapter or a pipeline snapshot described from its headers."""

from __future__ import annotations

import argparse
import json
import os
from typing import List

from weights_convert.names import FORMATS

from .common import format_count


def add_command(commands) -> None:
    """The ``inspect`` subcommand."""
    inspect = commands.add_parser("inspect", help="describe a checkpoint or a LoRA adapter from its headers",
                                  description="Describe a checkpoint from its headers: format, files, config "
                                  "(and config keys set aside), parameters, dtypes; or a LoRA adapter: format, "
                                  "rank, alpha, which modules, for which model width and depth. No weights are read "
                                  "(a .pt file is loaded whole, with weights_only).")
    inspect.add_argument("path", metavar="PATH", help="checkpoint file or folder, or a LoRA adapter file")
    inspect.add_argument("--from", dest="from_format", choices=FORMATS,
                         help="read the checkpoint's names as this layout instead of detecting it")
    inspect.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    """Describe a checkpoint or a LoRA adapter from its headers.

    Paths: PATH as given, made absolute, is printed once (``path:``, or ``adapter:`` for an adapter);
    the files read (``files:``, the config file) are printed relative to PATH when it is a folder, else
    relative to the folder PATH is in. An adapter that loading would refuse whatever the model (half a
    pair of factors, ranks that differ) raises ValueError, as ``sample --lora`` would. A checkpoint of
    ``anyflow train`` (``checkpoints/step_N``) is described in one line, with the run's weights to use instead.
    """
    from collections import Counter

    from weights_convert.cli import summarize
    from weights_convert.configs import describe_keys
    from weights_convert.lora import AdapterFileError, describe, open_adapter
    from weights_convert.pt_files import TrainerCheckpointError
    from weights_convert.safetensors_io import DTYPES
    from weights_convert.sources import open_checkpoint

    try:
        checkpoint = open_checkpoint(args.path, args.from_format)
    except AdapterFileError:
        print("\n".join(describe(open_adapter(args.path))))
        return 0
    except TrainerCheckpointError as exc:
        print(exc)
        return 0
    dtypes = Counter()
    for lazy in checkpoint.tensors.values():
        dtypes[DTYPES[lazy.dtype][1]] += lazy.nbytes
    folder = checkpoint.path if os.path.isdir(checkpoint.path) else os.path.dirname(checkpoint.path)

    def relative(path: str) -> str:
        return os.path.relpath(os.path.abspath(path), folder)

    config_source = relative(checkpoint.config_file) if checkpoint.config_file else checkpoint.config_source
    print(f"path: {checkpoint.path}")
    print(f"format: {checkpoint.description}")
    print(f"files: {summarize([relative(f) for f in checkpoint.files])}")
    print(f"config: {checkpoint.config.to_dict()} ({config_source})")
    if checkpoint.config_set_aside:
        print(f"config keys set aside (they do not change this model): {describe_keys(checkpoint.config_set_aside)}")
    print(f"parameters: {checkpoint.num_parameters:,} ({format_count(checkpoint.num_parameters)}) in {len(checkpoint.tensors)} tensors")
    print(f"dtypes: {', '.join(f'{d} {n / 1e6:.1f} MB' for d, n in sorted(dtypes.items()))}")
    print(f"bytes: {checkpoint.nbytes:,}")
    if os.path.isfile(os.path.join(args.path, "model_index.json")):
        components = describe_components(args.path)
        print(f"components: {len(components)} folder(s)")
        for line in components:
            print(f"  {line}")
    return 0


def describe_components(root: str) -> List[str]:
    """One line per component folder of a pipeline snapshot: its class, files, bytes and dtypes (headers only)."""
    from collections import Counter

    from weights_convert.safetensors_io import DTYPES, read_header

    lines = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder) or name.startswith("."):
            continue
        files = sorted(os.listdir(folder))
        config = next((os.path.join(folder, f) for f in ("config.json", "scheduler_config.json", "tokenizer_config.json")
                       if f in files), None)
        kind = ""
        if config:
            with open(config) as f:
                data = json.load(f)
            kind = data.get("_class_name") or (data.get("architectures") or [data.get("tokenizer_class", "")])[0]
        dtypes = Counter()
        for file in files:
            if file.endswith(".safetensors"):
                for record in read_header(os.path.join(folder, file))[0].values():
                    dtypes[DTYPES[record.dtype][1]] += record.nbytes
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files if os.path.isfile(os.path.join(folder, f)))
        weights = f"; {', '.join(f'{d} {n / 1e6:,.1f} MB' for d, n in sorted(dtypes.items()))}" if dtypes else ""
        lines.append(f"{name + '/':<14} {kind or '-'}: {len(files)} file(s), {size / 1e6:,.1f} MB{weights}")
    return lines
