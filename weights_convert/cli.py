"""``anyflow-convert SRC OUT``: convert a checkpoint into our layout or back to diffusers."""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from anyflow.model.parameters import DTYPE_NAMES, FLOAT8_NAME

from .names import FORMATS


def build_parser(prog: str = "anyflow-convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert an AnyFlow (bidirectional or FAR) or Wan2.1 checkpoint (Hub diffusers snapshot, "
        "transformer folder, single or sharded safetensors, authors' .pt, Wan2.1 base) into the anyflow layout, or back to "
        "diffusers. Streams one tensor at a time, verifies what it wrote, and never touches SRC.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file or folder")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist unless --force; the folder it goes "
                        "in must exist)")
    parser.add_argument("--from", dest="from_format", choices=FORMATS, help="force the source naming (default: detected)")
    parser.add_argument("--to", choices=("anyflow", "diffusers"), default="anyflow", help="output layout (default anyflow)")
    parser.add_argument("--dtype", choices=("keep",) + DTYPE_NAMES + (FLOAT8_NAME,), default="keep",
                        help="output dtype; fp32 islands stay float32 in half precision (default keep). float8_e4m3fn: "
                        "the blocks' linear weights as float8 with a float32 scale per row (<weight>_scale), the rest "
                        "bfloat16 (anyflow layout only; docs/FP8.md)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard the output above this size (default 5GB)")
    parser.add_argument("--config", dest="config_path", metavar="FILE",
                        help="config JSON overriding the found or inferred config (diffusers' or the authors' keys; "
                        "unknown keys are refused as typos); needed for weights without a config.json whose width "
                        "is no released model's (the heads are inferred as D / 128 for 1536 and 5120 only)")
    parser.add_argument("--far", action="store_true",
                        help="warm-start an AnyFlow FAR model from a bidirectional AnyFlow or Wan2.1 SRC: the compressed "
                        "patch embedding resampled from the full one (FAR settings as released unless --config gives them)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="bake a LoRA adapter into the output, scaled by SCALE (default 1); repeatable. Formats: "
                        "diffusers / PEFT, Wan2.1 original / ComfyUI (with .diff / .diff_b), musubi-tuner")
    parser.add_argument("--lora-skip-unknown", action="store_true",
                        help="leave out adapter modules the model does not have (for example the image "
                        "cross-attention k_img / v_img of an image-to-video LoRA) instead of refusing the adapter")
    parser.add_argument("--force", action="store_true", help="replace OUT (only after the new one is complete)")
    return parser


def main(argv: Optional[List[str]] = None, prog: str = "anyflow-convert") -> int:
    """``anyflow-convert`` (also ``anyflow convert``, with ``prog`` "anyflow convert"): its exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.lora_skip_unknown and not args.lora:
        parser.error("--lora-skip-unknown: no --lora given")
    from anyflow.runtime.interrupts import Interrupted, exit_now, reader_gone, run_interruptibly, signals_raise_interrupted

    from .configs import describe_keys
    from .conversion import convert
    from .lora import parse_lora_argument
    from .partials import remove_registered
    from .writer import OutputExistsError

    start = time.perf_counter()
    try:
        adapters = [parse_lora_argument(text) for text in args.lora]
        with signals_raise_interrupted():
            report = run_interruptibly(lambda: convert(
                args.src, args.out, from_format=args.from_format, to=args.to, dtype=args.dtype,
                max_shard_size=args.max_shard_size, config_path=args.config_path, force=args.force, progress=sys.stderr,
                far=args.far, lora=adapters, lora_skip_unknown=args.lora_skip_unknown), cleanup=remove_registered)
    except BrokenPipeError:  # the reader of the progress went away: end quietly, as Unix tools do
        return reader_gone()
    except OutputExistsError as exc:
        print(f"{prog}: error: {exc.out}: already exists; pass --force to replace it (it is replaced only "
              "after success)", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # CheckpointError and KeyMismatchError are ValueErrors
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(f"{prog}: interrupted ({stop}); nothing was written and {args.out} is as it was",
              file=sys.stderr)
        if stop.abandoned:
            exit_now(stop.exit_code)
        return stop.exit_code
    seconds = time.perf_counter() - start
    source = report.source
    print(f"detected: {source.description}")
    print(f"config: {source.config.to_dict()} ({source.config_source})")
    for path, scale in adapters:
        print(f"merged LoRA: {path} x {scale:g}")
    if source.config_set_aside:
        print(f"config keys set aside (they do not change this model): {describe_keys(source.config_set_aside)}")
    print(f"wrote {args.to} layout to {report.out}: {summarize(report.files)} "
          f"({report.nbytes_written / 1e9:.3f} GB in {seconds:.1f} s, every tensor verified)")
    return 0


def summarize(names: List[str], ends: int = 2) -> str:
    """File names for one line: all of a short list; of a long one the count, the first and the last few
    (``62 files: config.json, model-00001-of-00060.safetensors ... model-00060-of-00060.safetensors,
    model.safetensors.index.json``)."""
    names = sorted(names)
    if len(names) <= 2 * ends + 1:
        return ", ".join(names)
    return f"{len(names)} files: {', '.join(names[:ends])} ... {', '.join(names[-ends:])}"


if __name__ == "__main__":
    sys.exit(main())
