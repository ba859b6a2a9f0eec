"""Writing and reading a whole compressed model as one packed safetensors file.

A packed model folder holds ``config.json`` (the model's configuration, written by
:func:`save_packed`) and ``model.packed.safetensors``:

* every target layer as the tensors of :func:`autocomp.deploy.pack.pack_layer`, named
  ``<module>.weight.<key>`` (``model.layers.0.mlp.down_proj.weight.codes``); weights are ``[out, in]``
  (a GPT-2 ``Conv1D`` weight is transposed back on load);
* every other parameter under its state-dict name, in the storage dtype (bfloat16 by default);
  persistent buffers keep their own dtype. A tensor shared by several names (tied embedding and LM
  head) is stored once and re-tied on load;
* the safetensors header metadata (strings): ``format`` = ``"autocomp-packed"``, ``format_version``
  (this module writes and reads :data:`FORMAT_VERSION`), ``digest`` (SHA-256 over every tensor's name,
  dtype, shape and bytes, checked on load) and ``layout``, a JSON object::

      {"storage_dtype": "bfloat16",
       "layers": [{"name": "model.layers.0.mlp.down_proj", "kind": "linear", "tied_with": [],
                   "plan": {"method": "rtn", "bits": 4, "group_size": 128, ...},
                   "format": {"out_features": 64, "in_features": 128, "bits": 4, "group_size": 128,
                              "symmetric": false, "sparse": "none", "storage_dtype": "bfloat16"}}, ...],
       "others": {"model.norm.weight": [], "model.embed_tokens.weight": ["lm_head.weight"], ...}}

  (``others`` maps each stored non-target tensor to the other names that share it).

Its size on disk is :func:`autocomp.evaluators.size.model_size` plus the safetensors header and at
most a byte per tensor of rounding (and persistent buffers, which size accounting ignores).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from autocomp.pipeline.layer import CompressedWeight
from autocomp.deploy.pack import (
    LayerFormat,
    PackedFormatError,
    dtype_name,
    pack_layer,
    tensors_nbytes,
    unpack_layer,
)
from autocomp.cachefile import public_file
from autocomp.errors import PlanError
from autocomp.config.plan import DENSE, LayerPlan
from autocomp.inputs.targets import Target, find_targets, get_module, read_weight, write_weight

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PACKED_FILE", "PackedFormatError", "PackedInfo", "load_packed",
           "save_packed"]

PACKED_FILE = "model.packed.safetensors"
FORMAT_NAME = "autocomp-packed"
FORMAT_VERSION = 1
_LAYER_SEP = ".weight."   # "<module>.weight.<key>": never a state-dict name (a parameter has no children)


@dataclass(frozen=True)
class PackedInfo:
    """What :func:`save_packed` wrote."""

    path: Path                      # the weight file
    bytes_on_disk: int              # its size: header + data
    header_bytes: int               # safetensors header (8-byte length + JSON, with the metadata)
    accounted_bytes: int            # model_size(...).total_bytes of the same model, targets and plans
    layer_bytes: dict[str, int]     # packed bytes of each target layer (its tensors' data)
    layer_accounted: dict[str, int]  # layer_size(...).bytes of each target layer
    other_bytes: int                # data bytes of every non-target tensor

    @property
    def overhead(self) -> float:
        """Relative excess of the file over the accounted size (``0.004`` = 0.4%)."""
        return self.bytes_on_disk / self.accounted_bytes - 1.0


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().reshape(-1)
        digest.update(f"{name}|{str(t.dtype)}|{tuple(tensors[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def _other_tensors(model: nn.Module, targets: list[Target], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every state-dict tensor that is not a target weight, each shared tensor once (with its aliases)."""
    target_weights = {id(get_module(model, t.name).weight) for t in targets}
    first_name: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        key = id(value)
        if key in target_weights:
            continue
        if key in first_name:
            aliases[first_name[key]].append(name)
            continue
        first_name[key] = name
        aliases[name] = []
        data = value.detach()
        stored = data.to(dtype, copy=True) if isinstance(value, nn.Parameter) and data.is_floating_point() else data.clone()
        tensors[name] = stored.contiguous()
    return tensors, aliases


def save_packed(out_dir: str | Path, model: nn.Module, targets: list[Target],
                compressed: Mapping[str, CompressedWeight], plans: Mapping[str, LayerPlan],
                dtype: torch.dtype = torch.bfloat16) -> PackedInfo:
    """Write ``model`` with each target packed under its plan (missing: dense) into ``out_dir``
    (``config.json`` and :data:`PACKED_FILE`, replaced atomically). ``compressed`` holds the simulated
    compressed weight of every non-dense target (a dense target's weight is read from the model when
    absent); the model's own target weights are not read otherwise. Non-target parameters are stored
    in ``dtype``. Raises PlanError for a plan naming a non-target or a missing / mismatched
    compressed weight."""
    from safetensors.torch import save_file

    from autocomp.evaluators.size import model_size

    by_name = {t.name: t for t in targets}
    unknown = sorted(set(plans) - set(by_name))
    if unknown:
        raise PlanError(f"plans name layers that are not targets of this model: {unknown[:5]}")
    storage = dtype_name(dtype)
    tensors, aliases = _other_tensors(model, targets, dtype)
    other_bytes = tensors_nbytes(tensors)
    layers: list[dict[str, Any]] = []
    layer_bytes: dict[str, int] = {}
    for t in targets:
        plan = plans.get(t.name, DENSE)
        cw = compressed.get(t.name)
        if cw is None:
            if not plan.is_dense:
                raise PlanError(f"layer {t.name} has plan {plan.method!r} but no compressed weight was given; "
                                "pass the CompressedWeight of every non-dense layer")
            cw = CompressedWeight(read_weight(get_module(model, t.name)), None, None)
        if tuple(cw.weight.shape) != (t.out_features, t.in_features):
            raise PlanError(f"layer {t.name}: compressed weight is {tuple(cw.weight.shape)}, "
                            f"the layer is [{t.out_features}, {t.in_features}]")
        try:
            packed = pack_layer(cw, plan, dtype)
        except PlanError as exc:
            raise PlanError(f"layer {t.name}: {exc}") from None
        for key, value in packed.items():
            full = f"{t.name}{_LAYER_SEP}{key}"
            if full in tensors:
                raise PackedFormatError(f"tensor name {full!r} is used twice in this model; it cannot be packed")
            tensors[full] = value
        layer_bytes[t.name] = tensors_nbytes(packed)
        layers.append({"name": t.name, "kind": t.kind, "tied_with": list(t.tied_with), "plan": plan.to_dict(),
                       "format": LayerFormat.from_plan(plan, t.out_features, t.in_features, dtype).to_dict()})
    layout = {"storage_dtype": storage, "layers": layers, "others": aliases}
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "digest": _tensor_digest(tensors),
                "layout": json.dumps(layout, separators=(",", ":"))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    path = out / PACKED_FILE
    fd, tmp = tempfile.mkstemp(prefix=".packed.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        public_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    report = model_size(model, targets, plans)
    return PackedInfo(path, size, header, report.total_bytes, layer_bytes, dict(report.per_layer), other_bytes)


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise PackedFormatError(f"{path} does not exist; write a packed model with save_packed "
                                "(or point at the folder that holds model.packed.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise PackedFormatError(f"{path} is not an autocomp packed model (no '{FORMAT_NAME}' metadata); "
                                    "write it with save_packed")
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise PackedFormatError(f"{path} has packed format version {version!r}; this autocomp reads version "
                                    f"{FORMAT_VERSION}: export the model again with this autocomp, or upgrade autocomp")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackedFormatError(f"{path} cannot be read as safetensors ({exc}); the file is truncated or corrupt: "
                                "export the model again") from None
    if _tensor_digest(tensors) != metadata.get("digest"):
        raise PackedFormatError(f"{path} is corrupt (its tensors do not match the digest in its header); "
                                "export the model again")
    return metadata, tensors


def _share(model: nn.Module, name: str, source: torch.Tensor) -> None:
    """Make the state-dict entry ``name`` (a parameter or buffer) be the very tensor ``source``."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        if module._parameters[attr] is not source:
            setattr(module, attr, source)
    elif attr in module._buffers and module._buffers[attr] is not source:
        module._buffers[attr] = source


def load_packed(directory: str | Path, dtype: torch.dtype = torch.float32
                ) -> tuple[nn.Module, dict[str, CompressedWeight], dict[str, LayerPlan]]:
    """Build the model saved by :func:`save_packed` in ``directory`` (in ``dtype``, CPU, eval mode),
    with every packed layer dequantized exactly as the simulation did and tied weights re-tied.
    Returns ``(model, compressed, plans)``, keyed by layer name (dense layers included). Raises
    PackedFormatError for a missing, corrupt or foreign file, or an unknown format version."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(directory)
    metadata, tensors = _read_file(folder / PACKED_FILE)
    try:
        layout = json.loads(metadata["layout"])
        layers = [(entry["name"], entry["kind"], list(entry["tied_with"]), LayerPlan.from_dict(entry["plan"]),
                   LayerFormat.from_dict(entry["format"])) for entry in layout["layers"]]
        others: dict[str, list[str]] = {str(k): list(v) for k, v in layout["others"].items()}
    except (KeyError, TypeError, ValueError, AttributeError, PlanError) as exc:
        raise PackedFormatError(f"{folder / PACKED_FILE} has a malformed layout ({exc}); export the model again") from None
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise PackedFormatError(f"{folder} has no readable config.json ({exc}); save_packed writes it next to "
                                f"{PACKED_FILE}: export the model again") from None
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    targets = {t.name: t for t in find_targets(model)}
    compressed: dict[str, CompressedWeight] = {}
    plans: dict[str, LayerPlan] = {}
    covered: set[str] = set()
    for name, kind, tied_with, plan, fmt in layers:
        t = targets.get(name)
        if t is None or t.kind != kind or (t.out_features, t.in_features) != (fmt.out_features, fmt.in_features):
            raise PackedFormatError(f"packed layer {name} ({kind}, [{fmt.out_features}, {fmt.in_features}]) does not "
                                    f"match the model built from {folder / 'config.json'}; export the model again")
        prefix = f"{name}{_LAYER_SEP}"
        layer_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            cw = unpack_layer(layer_tensors, fmt, dtype)
        except PackedFormatError as exc:
            raise PackedFormatError(f"layer {name}: {exc}") from None
        write_weight(get_module(model, name), cw.weight)
        compressed[name], plans[name] = cw, plan
        covered.update(f"{n}.weight" for n in [name, *tied_with])
    state = {}
    for name, alias_names in others.items():
        if name not in tensors:
            raise PackedFormatError(f"{folder / PACKED_FILE} lacks tensor {name!r} named in its layout; export the model again")
        state.update({n: tensors[name] for n in [name, *alias_names]})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - covered)
    if missing or unexpected:
        raise PackedFormatError(f"{folder / PACKED_FILE} does not match the model built from its config.json "
                                f"(missing {missing[:5]}, unexpected {sorted(unexpected)[:5]}); export the model again")
    params = model.state_dict(keep_vars=True)
    for name, _, tied_with, _, _ in layers:
        for tied in tied_with:
            _share(model, f"{tied}.weight", get_module(model, name).weight)
    for name, alias_names in others.items():
        for alias in alias_names:
            _share(model, alias, params[name])
    model.eval()
    return model, compressed, plans
