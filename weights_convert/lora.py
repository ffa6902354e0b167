"""LoRA adapters in the layouts Wan2.1 users and the AnyFlow authors hold, read as changes of our parameters.

Adapter layouts, recognised from their keys (:data:`ADAPTER_FORMATS`):

- ``peft``: diffusers / PEFT, ``[transformer. | base_model.model.]<diffusers module>.lora_A.weight`` and
  ``.lora_B.weight`` (``.lora_B.bias``: a bias delta); alpha from ``<module>.alpha``, else from the
  ``lora_adapter_metadata`` diffusers writes into the file or an ``adapter_config.json`` beside it
  (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else alpha = rank.
- ``wan``: Wan2.1 original / ComfyUI, ``[diffusion_model.]<Wan module>.lora_down.weight`` and
  ``.lora_up.weight`` (or ``lora_A`` / ``lora_B``), ``.alpha``, ``.diff`` (a weight delta) and
  ``.diff_b`` (a bias delta): the blocks' attention, FFN and norms, ``time_embedding``,
  ``time_projection``, ``text_embedding``, ``head.head``, the modulation tables (``.diff`` only).
- ``musubi``: musubi-tuner, ``lora_unet_<Wan module, dots as underscores>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``.

The authors' training checkpoints are no adapters but whole models wrapped by PEFT
(``base_model.model.<module>.base_layer.weight`` beside ``<module>.lora_A.<adapter>.weight``):
:func:`fold_wrapped_checkpoint` folds their factors in when such a checkpoint is opened.

Merge rule, per module: ``W <- W + scale * (alpha / rank) * B @ A + scale * diff`` and
``b <- b + scale * diff_b`` (PEFT's ``lora_B.bias`` is scaled by alpha / rank as well, as PEFT applies
it), computed in float32 and rounded once to the weight's dtype, so the fp32 islands stay float32.
Every name, shape and value of an adapter is checked before a single weight changes.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .names import WAN_ORIGINAL_PER_BLOCK, WAN_ORIGINAL_TOP
from .pt_files import load_pt
from .safetensors_io import CheckpointError, itemsize, read_header, read_json_object
from .state_dict import rename_key

if TYPE_CHECKING:
    import torch

ADAPTER_FORMATS = {"peft": "diffusers / PEFT", "wan": "Wan2.1 original / ComfyUI", "musubi": "musubi-tuner"}
# where a module's name starts in each format's keys (the first that matches is removed)
PREFIXES = {"peft": ("transformer.", "base_model.model."), "wan": ("diffusion_model.",), "musubi": ("lora_unet_",)}
# the parts of an adapter module: key suffix -> role
PARTS = {
    ".lora_A.weight": "down", ".lora_down.weight": "down",
    ".lora_B.weight": "up", ".lora_up.weight": "up",
    ".lora_B.bias": "bias_delta", ".diff_b": "bias_delta",
    ".diff": "diff",
    ".alpha": "alpha",
}
_WRAPPED = "base_model.model."
_WRAPPED_FACTOR = re.compile(r"(.+)\.lora_([AB])\.([^.]+)\.weight")
_WAN_ONLY_NAMES = re.compile(r"(^|\.)(self_attn|cross_attn|ffn\.[02]|time_embedding|time_projection|text_embedding|head\.head)(\.|$)")
LoraArgument = Union[str, "os.PathLike[str]", Tuple[Union[str, "os.PathLike[str]"], float]]
LoraArguments = Union[LoraArgument, Sequence[LoraArgument]]  # one adapter, or a list of them
# the canonical name of each role, for a module whose file does not say (and the order parts are listed in)
ROLE_NAMES = {"down": "lora_down", "up": "lora_up", "diff": "diff", "bias_delta": "bias delta"}
PARTNERS = {"lora_A": "lora_B", "lora_B": "lora_A", "lora_down": "lora_up", "lora_up": "lora_down"}


class AdapterFileError(CheckpointError):
    """A LoRA adapter was given where a model checkpoint is expected."""


@dataclass
class ModuleDelta:
    """What an adapter changes in one module (or one bare parameter) of ours.

    ``weight`` and ``bias`` are our parameter names (None where the module has no such parameter);
    the parts are lazy tensors (``.read()``, ``.shape``).
    """

    source: str  # the module's name in the adapter, for messages
    weight: Optional[str]
    bias: Optional[str]
    down: Optional[object] = None  # A (rank, fan_in, ...)
    up: Optional[object] = None  # B (fan_out, rank, ...)
    alpha: Optional[float] = None
    diff: Optional[object] = None  # a delta of the weight
    bias_delta: Optional[object] = None
    bias_follows_alpha: bool = False  # PEFT's lora_B.bias: scaled by alpha / rank, like B @ A
    rslora: bool = False  # PEFT's use_rslora: alpha / sqrt(rank)
    names: Dict[str, str] = field(default_factory=dict)  # role -> the part's name in the file ("lora_A", "diff_b")

    @property
    def rank(self) -> Optional[int]:
        return self.down.shape[0] if self.down is not None else None

    @property
    def module(self) -> str:
        """Our name of the module (or parameter) it changes."""
        name = self.weight or self.bias
        return name[: -len(".weight")] if name.endswith(".weight") else name[: -len(".bias")] if name.endswith(".bias") else name

    def name(self, role: str) -> str:
        """The name of a part (``"down"``, ``"up"``, ``"diff"``, ``"bias_delta"``) as the file spells it
        (``lora_A`` or ``lora_down``, ...); for a part the file lacks, its partner's spelling."""
        if role in self.names:
            return self.names[role]
        partner = self.names.get({"down": "up", "up": "down"}.get(role))
        return PARTNERS.get(partner, ROLE_NAMES[role])

    def parts(self) -> List[Tuple[str, object]]:
        """(name as in the file, lazy tensor) of each part present, in the order A / down, B / up, diff, bias."""
        return [(self.name(role), getattr(self, role)) for role in ROLE_NAMES if getattr(self, role) is not None]

    def scaling(self) -> float:
        """alpha / rank (alpha / sqrt(rank) for rsLoRA); alpha = rank when the adapter gives none."""
        rank = self.rank
        alpha = float(rank) if self.alpha is None else self.alpha
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def targets(self) -> List[Tuple[str, str]]:
        """(our parameter name, "weight" or "bias") for each parameter this delta changes."""
        found = []
        if self.down is not None or self.diff is not None:
            found.append((self.weight, "weight"))
        if self.bias_delta is not None:
            found.append((self.bias, "bias"))
        return found

    def change(self, part: str, shape: Tuple[int, ...], scale: float,
               rows: Optional[Tuple[int, int]] = None, device: Union[str, "torch.device"] = "cpu") -> "torch.Tensor":
        """The float32 change of our ``part`` ("weight" or "bias") of ``shape``, times ``scale``, made on
        ``device``; only rows ``start .. stop - 1`` (dim 0) with ``rows``."""
        start, stop = rows if rows is not None else (0, shape[0] if shape else 1)

        def factor_on_device(lazy) -> "torch.Tensor":
            return lazy.read().to(device).float()

        if part == "bias":
            factor = scale * (self.scaling() if self.bias_follows_alpha and self.down is not None else 1.0)
            return factor_on_device(self.bias_delta).reshape(shape)[start:stop] * factor
        change = None
        if self.down is not None:
            rank = self.rank
            down = factor_on_device(self.down).reshape(rank, -1)
            up = factor_on_device(self.up).reshape(-1, rank)[start:stop]
            change = (up @ down).reshape(stop - start, *shape[1:]) * (scale * self.scaling())
        if self.diff is not None:
            diff = factor_on_device(self.diff).reshape(shape)[start:stop] * scale
            change = diff if change is None else change.add_(diff)
        return change


@dataclass
class Adapter:
    """A LoRA adapter read from ``path``: one :class:`ModuleDelta` per module of ours it changes."""

    path: str
    format: str  # a key of ADAPTER_FORMATS
    deltas: List[ModuleDelta]
    unknown: List[str] = field(default_factory=list)  # adapter modules that are no module of any AnyFlow model

    def usable(self, shapes: Mapping[str, Tuple[int, ...]]) -> List[ModuleDelta]:
        """The deltas whose parameters this model (parameter ``shapes``) has."""
        return [d for d in self.deltas if any(name in shapes for name in (d.weight, d.bias) if name)]

    def check(self, shapes: Mapping[str, Tuple[int, ...]], skip_unknown: bool = False) -> None:
        """Every delta against the model's parameter ``shapes``, and every value finite, before any merge.

        Raises :class:`CheckpointError` naming the adapter file, the module and the shapes.
        """
        usable = self.usable(shapes)
        problems = [problem for delta in usable for problem in _shape_problems(delta, shapes)]
        if problems:
            width = " (an adapter for another model width?)" if any("does not fit" in p for p in problems) else ""
            raise CheckpointError(_problems_message(self.path, problems) + width)
        missing = self.unknown + [d.source for d in self.deltas if d not in usable]
        if missing and not skip_unknown:
            raise CheckpointError(f"{self.path}: the adapter changes modules this model does not have: "
                                  f"{_listing(missing)}{_hint(missing, shapes)}; pass --lora-skip-unknown "
                                  "(skip_unknown=True) to merge the rest without them")
        if not usable:
            raise CheckpointError(f"{self.path}: none of the adapter's modules is in this model")
        import torch

        for delta in usable:  # values, one tensor at a time
            for part, lazy in delta.parts():
                if not torch.isfinite(lazy.read()).all():
                    raise CheckpointError(f"{self.path}: {delta.source} {part} has NaN or infinite values")

    def check_structure(self) -> None:
        """What any model would refuse in this adapter, checked without one: half a pair of factors,
        factors of different ranks. Raises :class:`CheckpointError` with the words of :meth:`check`."""
        problems = [problem for delta in self.deltas for problem in _structure_problems(delta)]
        if problems:
            raise CheckpointError(_problems_message(self.path, problems))

    def targets(self, shapes: Mapping[str, Tuple[int, ...]]) -> Iterator[Tuple[str, ModuleDelta, str]]:
        """(our parameter name, its delta, "weight" or "bias") for every parameter the adapter changes."""
        for delta in self.usable(shapes):
            for name, part in delta.targets():
                yield name, delta, part


def _structure_problems(delta: ModuleDelta) -> List[str]:
    """What is wrong with a delta whatever the model: half a pair of factors, factors of different ranks."""
    down, up = delta.name("down"), delta.name("up")
    if (delta.down is None) != (delta.up is None):
        have, lack = (down, up) if delta.up is None else (up, down)
        return [f"{delta.source}: has {have} without its partner {lack}"]
    if delta.down is not None:
        a, b = tuple(delta.down.shape), tuple(delta.up.shape)
        if len(a) < 2 or len(b) < 2 or b[1] != a[0] or math.prod(b[2:]) != 1:
            return [f"{delta.source}: ranks differ: {down} {a} has rank {a[0] if a else '?'}, "
                    f"{up} {b} has {b[1] if len(b) > 1 else '?'}"]
    return []


def _shape_problems(delta: ModuleDelta, shapes: Mapping[str, Tuple[int, ...]]) -> List[str]:
    weight = shapes.get(delta.weight) if delta.weight else None
    bias = shapes.get(delta.bias) if delta.bias else None
    problems = _structure_problems(delta)
    if not problems and delta.down is not None:
        down, up = tuple(delta.down.shape), tuple(delta.up.shape)
        if weight is None or up[0] != weight[0] or math.prod(down[1:]) != math.prod(weight[1:]):
            problems.append(f"{delta.source}: {delta.name('up')} {up} @ {delta.name('down')} {down} does not fit "
                            f"the model's {delta.weight} {weight}")
    if delta.diff is not None and tuple(delta.diff.shape) != weight:
        problems.append(f"{delta.source}: {delta.name('diff')} {tuple(delta.diff.shape)} does not fit the model's "
                        f"{delta.weight} {weight}")
    if delta.bias_delta is not None and tuple(delta.bias_delta.shape) != bias:
        problems.append(f"{delta.source}: {delta.name('bias_delta')} {tuple(delta.bias_delta.shape)} does not fit "
                        "the model's " + (f"{delta.bias} {bias}" if bias else "module, which has no bias"))
    return problems


def _problems_message(path: str, problems: Sequence[str]) -> str:
    """``path: problem; problem; problem; and N more``."""
    return f"{path}: " + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def _listing(names: Sequence[str]) -> str:
    return str(list(names[:10])) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _hint(missing: Sequence[str], shapes: Optional[Mapping[str, Tuple[int, ...]]] = None) -> str:
    """Why an adapter's modules may be missing: image-to-video keys, or (given the model's ``shapes``) another depth."""
    hints = []
    if any(re.search(r"(^|[._])(k_img|v_img|img_emb)([._]|$)", name) for name in missing):
        hints.append("k_img / v_img / img_emb are Wan2.1 image-to-video modules, which AnyFlow (text-to-video) has not")
    depth = 1 + max((int(k.split(".")[1]) for k in shapes or () if k.startswith("blocks.")), default=-1)
    indices = [int(m.group(1)) for name in missing for m in [re.search(r"blocks[._](\d+)[._]", name)] if m]
    if shapes is not None and indices and max(indices) >= depth:
        hints.append(f"the adapter has blocks up to {max(indices)}, this model {depth} blocks (an adapter for another model?)")
    return f" ({'; '.join(hints)})" if hints else ""


def normalize_lora(lora: Optional[LoraArguments]) -> List[Tuple[str, float]]:
    """``file``, ``(file, scale)`` or a list of them -> ``[(file, scale), ...]``, scales checked finite.

    A file is a str or an ``os.PathLike``; a pair is a file and a real number.
    """
    if lora is None:
        return []
    if isinstance(lora, (str, os.PathLike)) or _is_pair(lora):
        lora = [lora]
    pairs = []
    for item in lora:
        path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else tuple(item)
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"lora: the scale of {os.fspath(path)} must be a number, got {scale!r}") from None
        if not math.isfinite(scale):
            raise ValueError(f"lora: the scale of {os.fspath(path)} must be finite, got {scale}")
        pairs.append((os.fspath(path), scale))
    return pairs


def _is_pair(item: object) -> bool:
    """Whether ``item`` is one (file, scale) pair rather than a list of adapters."""
    return (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike))
            and isinstance(item[1], numbers.Real))


def parse_lora_argument(text: str) -> Tuple[str, float]:
    """``FILE[:SCALE]`` of ``--lora`` -> (file, scale).

    An existing file is taken whole, even with a colon in its name; otherwise the text after the
    last colon is the scale. Raises ValueError naming the argument for a scale that is no number
    or not finite.
    """
    path, sep, scale = text.rpartition(":")
    if not sep or not path or os.path.exists(text):
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        missing = "" if os.path.exists(path) else f", and there is no file {text}"
        raise ValueError(f"--lora {text}: the scale {scale!r} is not a number{missing}") from None
    if not math.isfinite(value):
        raise ValueError(f"--lora {text}: the scale must be a finite number, got {scale!r}")
    return path, value


def looks_like_adapter(keys: Sequence[str]) -> bool:
    """Whether these keys are a LoRA adapter's rather than a model's."""
    return bool(keys) and all(k.endswith(tuple(PARTS)) for k in keys)


def looks_like_wrapped_checkpoint(keys: Sequence[str]) -> bool:
    """Whether these keys are a PEFT-wrapped model's (the authors' training checkpoints)."""
    return any(".base_layer." in k for k in keys) and any(_WRAPPED_FACTOR.fullmatch(k) for k in keys)


def open_adapter(path: str) -> Adapter:
    """Read the adapter at ``path`` (a .safetensors, or a .pt loaded with ``weights_only=True``):
    headers only, tensors are read when merged. A checkpoint of ``anyflow train`` is refused whole
    (:func:`.pt_files.load_pt`), naming the adapters its run wrote."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such adapter file")
    if path.endswith(".safetensors"):
        tensors, metadata = read_header(path)
    else:
        tensors, metadata = load_pt(path), {}
    keys = list(tensors)
    if looks_like_wrapped_checkpoint(keys):
        raise CheckpointError(f"{path}: a whole model wrapped by PEFT (base_layer weights with their LoRA factors, as the "
                              "authors' training checkpoints are), not an adapter: load or convert it as the checkpoint, "
                              "and its factors are merged in")
    if not looks_like_adapter(keys):
        odd = [k for k in keys if not k.endswith(tuple(PARTS))]
        dora = [k for k in odd if "dora_scale" in k or "lora_magnitude_vector" in k]
        raise CheckpointError(f"{path}: " + (f"a DoRA adapter ({dora[0]}); only LoRA is supported" if dora else
                                             f"not a LoRA adapter: keys such as {odd[:5]} are no lora_A / lora_B / "
                                             "lora_down / lora_up / alpha / diff / diff_b"))
    fmt = _detect_format(keys)
    config = _adapter_config(path, metadata) if fmt == "peft" else {}
    deltas: Dict[str, ModuleDelta] = {}
    unknown: List[str] = []
    for key, lazy in tensors.items():
        suffix = next(s for s in PARTS if key.endswith(s))
        module = _strip_prefix(fmt, key[: -len(suffix)])
        if module not in deltas:
            names = _our_parameters(fmt, module)
            if names is None:
                if module not in unknown:
                    unknown.append(module)
                continue
            deltas[module] = ModuleDelta(module, *names, bias_follows_alpha=fmt == "peft",
                                         rslora=bool(config.get("use_rslora")))
        delta = deltas[module]
        role = PARTS[suffix]
        if role == "alpha":
            delta.alpha = float(lazy.read().reshape(-1)[0])
        else:
            setattr(delta, role, lazy)
            delta.names[role] = suffix[1:].removesuffix(".weight")
    for delta in deltas.values():
        if delta.alpha is None:
            delta.alpha = _configured_alpha(config, delta.source)
    return Adapter(os.path.abspath(path), fmt, list(deltas.values()), unknown)


def _detect_format(keys: Sequence[str]) -> str:
    if any(k.startswith(PREFIXES["musubi"]) for k in keys):
        return "musubi"
    if any(k.startswith(PREFIXES["wan"]) or k.endswith((".lora_down.weight", ".diff", ".diff_b")) for k in keys):
        return "wan"
    modules = (_strip_prefix("peft", k[: k.rindex(".lora_")] if ".lora_" in k else k) for k in keys)
    return "wan" if any(_WAN_ONLY_NAMES.search(m) for m in modules) else "peft"


def _strip_prefix(fmt: str, name: str) -> str:
    prefix = next((p for p in PREFIXES[fmt] if name.startswith(p)), "")
    return name[len(prefix):]


def _our_parameters(fmt: str, module: str) -> Optional[Tuple[Optional[str], Optional[str]]]:
    """(our weight name, our bias name) of an adapter's module, or None where it is no module of ours.

    A bare parameter (a modulation table) is its own "weight", without a bias.
    """
    if fmt == "musubi":
        module = _MUSUBI_NAMES.get(module)
        if module is None:
            return None

    def ours(name: str) -> Optional[str]:
        if fmt != "peft":
            name = rename_key(name, "wan_original_to_diffusers")
            if name is None:
                return None
        return rename_key(name, "to_anyflow")

    weight, bias = ours(f"{module}.weight"), ours(f"{module}.bias")
    if weight is None and bias is None:
        parameter = ours(module)
        return None if parameter is None else (parameter, None)
    return weight, bias


class _MusubiNames(dict):
    """musubi-tuner's underscore names -> Wan2.1 original module names, block indices filled in on lookup."""

    def __init__(self):
        names = {k.rsplit(".", 1)[0] for group in WAN_ORIGINAL_TOP.values() for k in group}
        names |= {f"blocks.#.{k.rsplit('.', 1)[0]}" for group in WAN_ORIGINAL_PER_BLOCK.values() for k in group}
        super().__init__({name.replace(".", "_"): name for name in names})

    def get(self, key, default=None):
        match = re.fullmatch(r"blocks_(\d+)_(.+)", key)
        if match:
            found = super().get(f"blocks_#_{match.group(2)}")
            return default if found is None else found.replace("#", match.group(1))
        return super().get(key, default)


_MUSUBI_NAMES = _MusubiNames()


def _adapter_config(path: str, metadata: Mapping[str, str]) -> Dict[str, object]:
    """The PEFT LoraConfig values of an adapter: diffusers' ``lora_adapter_metadata`` in the file
    (keys under ``transformer.``), else ``adapter_config.json`` beside it; {} without either."""
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: corrupt lora_adapter_metadata ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: corrupt lora_adapter_metadata (not a JSON object)")
        ours = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
        return ours or config
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    return read_json_object(beside, "adapter_config.json") if os.path.isfile(beside) else {}


def _configured_alpha(config: Mapping[str, object], module: str) -> Optional[float]:
    """A module's alpha under a PEFT config: ``alpha_pattern`` (PEFT's suffix / regex match), else ``lora_alpha``."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(value)
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def describe(adapter: Adapter) -> List[str]:
    """Lines for ``anyflow inspect``: format (with the parts as the file names them), ranks, alphas,
    which modules, for which width and depth.

    Raises :class:`CheckpointError` for an adapter that no model would take (half a pair of factors,
    ranks that differ; :meth:`Adapter.check_structure`), with the words loading it would use.
    """
    adapter.check_structure()
    ranks = sorted({d.rank for d in adapter.deltas if d.rank is not None})
    alphas = sorted({d.alpha for d in adapter.deltas if d.alpha is not None})
    kinds: Dict[str, int] = {}
    blocks = set()
    width = None
    for delta in adapter.deltas:
        match = re.match(r"blocks\.(\d+)\.", delta.module)
        if match:
            blocks.add(int(match.group(1)))
        kind = re.sub(r"^blocks\.\d+\.", "blocks.*.", delta.module)
        kinds[kind] = kinds.get(kind, 0) + 1
        for lazy in (delta.up, delta.diff):
            if width is None and lazy is not None and delta.module.endswith("self_attn.q"):
                width = lazy.shape[0]
    parts = list(dict.fromkeys(part for role in ROLE_NAMES for d in adapter.deltas
                               if getattr(d, role) is not None for part in [d.name(role)]))
    lines = [f"adapter: {adapter.path}",
             f"format: {ADAPTER_FORMATS[adapter.format]} LoRA ({', '.join(parts)})",
             f"rank: {', '.join(map(str, ranks)) or 'none (full deltas only)'}; alpha: "
             + (", ".join(f"{a:g}" for a in alphas) or "not given (alpha = rank)"),
             f"changes {len(adapter.deltas)} modules: " + ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(kinds.items()))]
    if blocks:
        lines.append(f"for a model of at least {max(blocks) + 1} blocks" + (f", width {width}" if width else ""))
    if adapter.unknown:
        lines.append(f"modules no AnyFlow model has: {_listing(adapter.unknown)}{_hint(adapter.unknown)}")
    return lines


@dataclass(frozen=True)
class MergedTensor:
    """A lazy tensor: a base tensor with adapter changes added when read.

    ``read`` gives float32 (the sum made in float32); whoever stores it rounds once to its dtype.
    """

    name: str
    base: object
    changes: Tuple[Tuple[ModuleDelta, str, float], ...]  # (delta, "weight" or "bias", scale)

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    def read(self, device: Union[str, "torch.device"] = "cpu") -> "torch.Tensor":
        return self.read_rows(0, self.shape[0] if self.shape else 1, device)

    def read_rows(self, start: int, stop: int, device: Union[str, "torch.device"] = "cpu") -> "torch.Tensor":
        """Rows ``start .. stop - 1`` merged, in float32 on ``device`` (where the products ``B @ A`` run)."""
        import torch

        merged = self.base.read_rows(start, stop).to(device).to(torch.float32, copy=True)
        for delta, part, scale in self.changes:
            merged += delta.change(part, self.shape, scale, rows=(start, stop), device=device)
        return merged


def apply_adapters(tensors: Mapping[str, object], lora: Optional[LoraArguments],
                   skip_unknown: bool = False) -> Dict[str, object]:
    """Our-named lazy tensors with every adapter of ``lora`` (a file, a (file, scale) pair, or a list of
    them) merged in when read. All adapters are opened and checked first."""
    pairs = normalize_lora(lora)
    if not pairs:
        return dict(tensors)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    adapters = [(open_adapter(path), scale) for path, scale in pairs]
    for adapter, _ in adapters:
        adapter.check(shapes, skip_unknown)
    changes: Dict[str, List[Tuple[ModuleDelta, str, float]]] = {}
    for adapter, scale in adapters:
        for name, delta, part in adapter.targets(shapes):
            changes.setdefault(name, []).append((delta, part, scale))
    return {k: MergedTensor(k, v, tuple(changes[k])) if k in changes else v for k, v in tensors.items()}


def fold_wrapped_checkpoint(tensors: Mapping[str, object], where: str) -> Tuple[Dict[str, object], int]:
    """A PEFT-wrapped state dict (the authors' training checkpoints) as a plain one with its factors
    folded in: (tensors, number of modules folded).

    ``base_model.model.<m>.base_layer.weight`` with ``<m>.lora_A.<adapter>.weight`` and
    ``<m>.lora_B.<adapter>.weight`` becomes ``<m>.weight = W + (alpha / rank) B @ A``, made when read,
    with alpha = rank: the authors train with ``lora_alpha`` equal to the rank (256 / 256) and
    their own merge script fixes that ratio, as the checkpoint records neither.
    """
    plain: Dict[str, object] = {}
    factors: Dict[str, Dict[str, object]] = {}
    adapters = set()
    for key, lazy in tensors.items():
        name = key[len(_WRAPPED):] if key.startswith(_WRAPPED) else key
        if "lora_magnitude_vector" in name:
            raise CheckpointError(f"{where}: {key}: a DoRA-wrapped checkpoint; only LoRA is supported")
        match = _WRAPPED_FACTOR.fullmatch(name)
        if match:
            module, which, adapter = match.groups()
            factors.setdefault(module, {})[which] = lazy
            adapters.add(adapter)
        else:
            plain[name.replace(".base_layer.", ".")] = lazy
    if len(adapters) > 1:
        raise CheckpointError(f"{where}: a PEFT-wrapped checkpoint with several adapters {sorted(adapters)}; "
                              "this loader folds in exactly one")
    for module, pair in factors.items():
        if set(pair) != {"A", "B"} or f"{module}.weight" not in plain:
            raise CheckpointError(f"{where}: {module}: its lora_A, lora_B and base_layer.weight must all be present")
        delta = ModuleDelta(module, f"{module}.weight", None, down=pair["A"], up=pair["B"],
                            names={"down": "lora_A", "up": "lora_B"})
        problems = _shape_problems(delta, {delta.weight: tuple(plain[delta.weight].shape)})
        if problems:
            raise CheckpointError(f"{where}: " + "; ".join(problems))
        plain[delta.weight] = MergedTensor(delta.weight, plain[delta.weight], ((delta, "weight", 1.0),))
    return plain, len(factors)

