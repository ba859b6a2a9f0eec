"""``compressed-tensors``: a Hugging Face folder whose quantized layers are compressed-tensors
"pack-quantized" tensors, written from autocomp's integer codes (nothing is quantized again).

``AutoModelForCausalLM.from_pretrained(folder)`` loads it (transformers with the compressed-tensors
package installed), and vLLM serves it (``vllm serve folder``) when it passes the ``vllm`` target
check. Every quantized layer gets its own config group (targets = its exact module name), so a mixed
per-layer configuration keeps its bits on disk:

* symmetric b-bit codes are stored as the signed integers ``code - 2^(b-1)``, asymmetric b-bit codes
  (b < 8) as the symmetric (b+1)-bit integers ``code - zero`` (exact: ``(code - zero) * scale`` is the
  simulated weight, and compressed-tensors >= 0.18 cannot read packed zero points of group layers);
  an asymmetric 8-bit layer would need 9 bits (see below);
* a group size equal to the input size is the ``channel`` strategy, any other must divide the input
  size; scales are stored in the export dtype (the fp16 scales of the simulation are exact in float16
  and float32, and rounded in bfloat16: the rounding is measured and stated);
* pruned layers (N:M or unstructured) are stored as zeros inside their codes (or as a dense weight
  when not quantized) and the sparsity is stated in ``autocomp.json``: no ``sparsity_config`` is
  written, since the engines ignore it (compressed-tensors) or refuse it (vLLM);
* layers left dense and every other tensor are stored as in a plain ``save_pretrained`` folder;
* a quantized layer the format cannot hold exactly is stored dequantized in the export dtype, so the
  folder still loads with plain ``from_pretrained`` and computes the trial's model (exactly in
  float32): an input embedding (neither transformers 5.24 with compressed-tensors 0.20 nor vLLM
  loads a quantized ``nn.Embedding`` from this format), an asymmetric 8-bit layer, a GPT-2
  ``Conv1D`` layer (compressed-tensors quantizes ``nn.Linear`` only) and a group size that does not
  divide the layer's inputs. ``autocomp.json`` lists each with its reason and the bytes it adds
  (``stored_dequantized``); a search with ``deploy_target: vllm`` proposes none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from autocomp.errors import PlanError
from autocomp.config.deploy import DEPLOY_TARGETS
from autocomp.exporters.registry import ExportFormat, ExportOptions, refuse, register_format, sparse_layers

PACK_FORMAT = "pack-quantized"
WEIGHTS_FILE = "model.safetensors"
# bit widths that compressed-tensors 0.17 (vLLM 0.33's pin) packs with padding, unlike 0.18 and later
VERSION_DEPENDENT_BITS = (3, 5, 6, 7)


@dataclass(frozen=True)
class StoredScheme:
    """How one quantized layer is stored: signed ``bits``-bit integers times a scale per group
    (``group_size`` None: one scale per output channel)."""

    bits: int
    group_size: int | None
    from_asymmetric: bool        # an asymmetric (bits - 1)-bit layer written as symmetric ``bits`` bits

    def weights_args(self) -> dict[str, Any]:
        return {"num_bits": self.bits, "type": "int", "symmetric": True, "dynamic": False,
                "strategy": "channel" if self.group_size is None else "group", "group_size": self.group_size}

    def label(self) -> str:
        return f"int{self.bits} " + ("per channel" if self.group_size is None else f"g{self.group_size}")


def stored_scheme(target, plan) -> StoredScheme | str | None:
    """The scheme a quantized layer is stored with, None for a layer that is not quantized, or a string
    saying why compressed-tensors cannot hold it (it is then stored dequantized)."""
    from autocomp.compressors.ggml import GGML_METHODS
    from autocomp.compressors.rtn import resolve_group_size

    if plan.quantizer is None:
        return None
    if plan.quantizer in GGML_METHODS:
        return "llama.cpp's own blocks (method ggml: only --format gguf stores them)"
    if target.kind == "embedding":
        return "an embedding (transformers and vLLM do not load a quantized nn.Embedding from compressed-tensors)"
    if target.kind == "conv1d":
        return "a GPT-2 Conv1D layer (compressed-tensors quantizes nn.Linear only)"
    bits = plan.bits if plan.symmetric else plan.bits + 1
    if bits > 8:
        return "asymmetric 8-bit (it would need 9-bit signed integers)"
    group = resolve_group_size(plan.group_size, target.in_features)
    if group != target.in_features and target.in_features % group:
        return f"group size {group} does not divide its {target.in_features} inputs"
    return StoredScheme(bits, None if group == target.in_features else group, not plan.symmetric)


def _schemes(applied) -> Iterator[tuple[Any, Any, StoredScheme | str | None]]:
    for t in applied.targets:
        plan = applied.per_layer.get(t.name)
        if plan is not None:
            yield t, plan, stored_scheme(t, plan)


def vllm_problems(applied) -> list[str]:
    """What vLLM 0.33 cannot serve in the compressed-tensors export of ``applied``, one line per layer
    or fused group: bit widths whose packing differs between compressed-tensors versions, and fused
    projections (q/k/v, gate/up) whose shards are stored with different schemes."""
    problems = []
    by_block: dict[tuple[int, str], str] = {}     # (block, role) -> what vLLM sees: "int4 g128", "not quantized"
    for t, plan, scheme in _schemes(applied):
        if isinstance(scheme, StoredScheme) and scheme.bits in VERSION_DEPENDENT_BITS:
            was = f" (asymmetric {scheme.bits - 1}-bit)" if scheme.from_asymmetric else ""
            problems.append(f"{t.name} is stored as {scheme.bits}-bit{was}, which vLLM's compressed-tensors 0.17 "
                            "unpacks differently: use symmetric 2, 4 or 8 bits or asymmetric 3 bits")
        if t.block is not None:
            by_block[(t.block, t.role)] = scheme.label() if isinstance(scheme, StoredScheme) else "not quantized"
    for (block, role), scheme in sorted(by_block.items()):
        for fused in DEPLOY_TARGETS["vllm"].fused:   # vLLM loads each as one layer, with the first shard's scheme
            if role != fused[0]:
                continue
            shards = {r: by_block[(block, r)] for r in fused if (block, r) in by_block}
            if len(set(shards.values())) > 1:
                described = ", ".join(f"{r}: {s}" for r, s in shards.items())
                problems.append(f"block {block} fuses {'/'.join(shards)} into one layer but stores them differently "
                                f"({described}): give them one scheme")
    return problems


def check(applied, options: ExportOptions) -> None:
    """PlanError naming every layer the ``vllm`` target cannot serve (without a target every
    configuration can be written: what the format cannot hold is stored dequantized)."""
    if options.target == "vllm":
        refuse(vllm_problems(applied), "vLLM cannot serve this configuration",
                "Change those layers (a search with deploy_target: vllm only proposes what vLLM serves), or export "
                "without --target vllm")


def _signed_codes(cw, scheme: StoredScheme):
    """The stored signed integers (int8 ``[out, in]``) of a quantized layer: ``code - zero``, 0 where pruned."""
    import torch

    from autocomp.deploy.pack import signed_codes

    signed = signed_codes(cw)
    limit = 1 << (scheme.bits - 1)
    if int(signed.min()) < -limit or int(signed.max()) >= limit:
        raise PlanError(f"codes outside the {scheme.bits}-bit range: the compressed weight is corrupt; compress it again")
    return signed.to(torch.int8)


def layer_tensors(name: str, cw, scheme: StoredScheme, dtype) -> dict[str, Any]:
    """The compressed-tensors tensors of one quantized layer: ``weight_packed`` (int32), ``weight_scale``
    (``dtype``, ``[out, groups]``) and ``weight_shape``."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    scales = cw.quant.scales
    if scheme.group_size is None:
        scales = scales[:, :1]
    return {f"{name}.weight_packed": pack_to_int32(_signed_codes(cw, scheme), scheme.bits),
            f"{name}.weight_scale": scales.to(dtype).contiguous(),
            f"{name}.weight_shape": torch.tensor(list(cw.weight.shape), dtype=torch.int64)}


def quantization_config(groups: dict[StoredScheme, list[str]]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: one config group per stored scheme, validated
    by compressed-tensors' own schema."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationConfig

    config_groups = {f"group_{i}": {"targets": sorted(names), "weights": scheme.weights_args(),
                                    "input_activations": None, "output_activations": None, "format": PACK_FORMAT}
                     for i, (scheme, names) in enumerate(sorted(groups.items(), key=lambda kv: sorted(kv[1])[0]))}
    config = QuantizationConfig(config_groups=config_groups, format=PACK_FORMAT, quantization_status="compressed",
                                quant_method="compressed-tensors", ignore=[])
    out = config.model_dump(exclude_none=False)
    out["version"] = ct_version
    return json.loads(json.dumps(out, default=str))


def _write(folder: Path, applied, loaded, options: ExportOptions) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from autocomp.cachefile import public_file
    from autocomp.evaluators.size import layer_size

    dtype = getattr(torch, options.dtype)
    model = applied.model
    compressed = applied.compressed_weights()
    groups: dict[StoredScheme, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    packed_weights: set[int] = set()
    scale_error = 0.0
    dequantized: dict[str, dict[str, Any]] = {}   # quantized layers stored dequantized: why, bytes added
    for t, plan, scheme in _schemes(applied):
        if isinstance(scheme, str):
            dequantized[t.name] = {"reason": scheme, "bytes_added": t.numel * dtype.itemsize
                                   - layer_size(t.out_features, t.in_features, plan).bytes}
        if not isinstance(scheme, StoredScheme):
            continue
        cw = compressed[t.name]
        groups.setdefault(scheme, []).append(t.name)
        tensors.update(layer_tensors(t.name, cw, scheme, dtype))
        exact = cw.quant.scales.to(torch.float32)
        rounded = exact.to(dtype).to(torch.float32)
        scale_error = max(scale_error, float(((rounded - exact).abs() / exact.abs().clamp_min(1e-30)).max()))
        packed_weights.add(id(model.get_submodule(t.name).weight))
    seen: set[int] = set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in packed_weights or id(value) in seen:
            continue   # a quantized weight (stored packed) or a second name of a tied tensor
        seen.add(id(value))
        data = value.detach()
        tensors[name] = (data.to(dtype) if isinstance(value, nn.Parameter) and data.is_floating_point()
                         else data).contiguous().clone()
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(groups)
    config["dtype"] = options.dtype
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    public_file(folder / WEIGHTS_FILE)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    info: dict[str, Any] = {"storage_dtype": options.dtype, "bytes_on_disk": (folder / WEIGHTS_FILE).stat().st_size,
                            "quantized_layers": sum(len(v) for v in groups.values()), "config_groups": len(groups),
                            "sparse_layers_stored_dense": sparse_layers(applied)}
    notes = []
    if dequantized:
        info["stored_dequantized"] = dequantized
        added = sum(d["bytes_added"] for d in dequantized.values()) / 1e6
        reasons = sorted({d["reason"].split(" (")[0] for d in dequantized.values()})
        notes.append(f"{len(dequantized)} quantized layer(s) stored dequantized in {options.dtype}, "
                     f"{added:.1f} MB more than accounted ({'; '.join(reasons)}; see stored_dequantized)")
    if scale_error:
        info["scale_rounding_max_rel"] = scale_error
        notes.append(f"the fp16 scales were rounded to {options.dtype} (largest relative change {scale_error:.2e})")
    if options.target:
        info["target"] = options.target
    if notes:
        info["note"] = "; ".join(notes)
    return info


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


register_format(ExportFormat(
    "compressed-tensors",
    "Hugging Face folder of compressed-tensors pack-quantized layers: from_pretrained and vLLM load it, "
    "the codes stay low-bit on disk",
    _write, _load, check=check, dtypes=("float16", "bfloat16", "float32"), targets=("vllm",)))
