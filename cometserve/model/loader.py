"""Checkpoint -> model. Reads a Hugging Face directory (16-bit, sharded safetensors), a GGUF file
(converted once to such a directory), or a cometserve quantized checkpoint, and builds the one model
class around the right linear layers. Each quantized layer converts storage layout to kernel
layout once, here (`prepare`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from cometserve import checkpoint
from cometserve.checkpoint import CheckpointError, expect_tensor
from cometserve.config import ModelConfig
from cometserve.model.layers.linear import QuantLinear
from cometserve.model.layers.rotary import RotaryEmbedding, rope_inv_freq
from cometserve.model.llama import LlamaForCausalLM, dense_factory
from cometserve.scheme import PRESETS, QuantScheme

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    hf_config: object
    scheme: QuantScheme
    path: Path
    quant_config: dict | None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; float32 on CPUs, where bf16 matmuls are slow and buy nothing."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_model_path(path: str | Path) -> Path:
    """A directory as is; a .gguf file converted once into a cached Hugging Face directory."""
    p = Path(path)
    if p.suffix == ".gguf":
        from cometserve import assets
        from cometserve.config import cache_dir

        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return assets.gguf_to_hf_dir(p, cache_dir() / "gguf" / p.stem)
    if not p.is_dir():
        raise FileNotFoundError(f"model not found: {p} (expected a directory or a .gguf file)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json; not a Hugging Face model directory")
    return p


def hf_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a (possibly sharded) model directory."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    if not files:
        files = sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickle .bin files are never loaded)")
    return [path / name for name in files]


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors model directory."""
    tensors: dict[str, torch.Tensor] = {}
    for f in hf_weight_files(path):
        tensors.update(load_file(str(f)))
    return tensors


def fuse_hf_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names -> ours: q/k/v into qkv_proj and gate/up into gate_up_proj (concatenated)."""
    out = dict(tensors)
    for fused, parts in FUSED.items():
        for key in [k for k in tensors if f".{parts[0]}." in k]:
            names = [key.replace(f".{parts[0]}.", f".{p}.") for p in parts]
            if all(n in tensors for n in names):
                out[key.replace(f".{parts[0]}.", f".{fused}.")] = torch.cat([tensors[n] for n in names])
                for n in names:
                    del out[n]
    return out


def load_hf_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def build_model(hf_config, make=dense_factory) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf(hf_config)
    inv_freq, scaling = rope_inv_freq(hf_config, cfg.head_dim)
    return LlamaForCausalLM(cfg, RotaryEmbedding(inv_freq, scaling, cfg.max_model_len), make)


def quant_factory(layers: dict, scheme: QuantScheme):
    def make(name: str, in_features: int, out_features: int, bias: bool):
        spec = layers.get(name)
        if spec is None:
            return dense_factory(name, in_features, out_features, bias)
        if (spec["in_features"], spec["out_features"]) != (in_features, out_features):
            raise CheckpointError(
                f"quant_config.json: layers.{name} is {spec['in_features']}x{spec['out_features']}, "
                f"the model config says {in_features}x{out_features}"
            )
        has_perm = spec["perm"] is not None and not spec["perm_folded"]
        return QuantLinear(in_features, out_features, bias, spec["w_bits"], spec["w_group_size"],
                           spec["block_bits"] is not None, has_perm, scheme.a_rotation == "hadamard")

    return make


def assign_tensors(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Copy every parameter and buffer from `tensors`, checking names, shapes and (for integer and
    scale tensors) dtypes; leftovers are an error too. Float tensors are cast to `dtype`."""
    expected = model.state_dict()
    json_fed = {k for k in expected if k.endswith((".perm", ".block_bits"))}
    for name, target in expected.items():
        if name in json_fed:
            continue
        exact = target.dtype in (torch.uint8, torch.int8, torch.float16) and not name.endswith(".bias")
        src = expect_tensor(tensors, name, tuple(target.shape), target.dtype if exact else None)
        target.copy_(src if exact else src.to(dtype))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{checkpoint.WEIGHTS}: unexpected tensor(s) {extra[:5]}")


def _set_block_maps(model: LlamaForCausalLM, layers: dict) -> None:
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            spec = layers[name]
            if module.block_bits is not None:
                module.block_bits.copy_(torch.tensor(spec["block_bits"], dtype=torch.uint8))
            if module.perm is not None:
                module.perm.copy_(torch.tensor(spec["perm"], dtype=torch.int32))


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Any supported model path -> a ready model on `device` (default: the GPU if there is one)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    quantized = checkpoint.is_checkpoint(path)
    path = Path(path) if quantized else resolve_model_path(path)
    hf_config = load_hf_config(path)
    if quantized:
        qcfg, scheme = checkpoint.load_quant_config(path)
        tensors = checkpoint.load_tensors(path, qcfg)
        model = build_model(hf_config, quant_factory(qcfg["layers"], scheme))
    else:
        qcfg, scheme = None, PRESETS["fp16"]
        tensors = fuse_hf_names(read_hf_tensors(path))
        if hf_config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        model = build_model(hf_config)
    with torch.no_grad():
        assign_tensors(model, tensors, torch.float32)
        if qcfg is not None:
            _set_block_maps(model, qcfg["layers"])
    _to_device(model, device, dtype)
    return LoadedModel(model.eval(), hf_config, scheme, path, qcfg)


def _to_device(model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype) -> None:
    """Floats to `dtype` (scales keep float16, codes their integer type), then prepare the kernels."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            p.data = p.data.to(device=device, dtype=dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is None:
                continue
            keep = b.dtype in (torch.uint8, torch.int8, torch.int32, torch.float16) or name == "inv_freq"
            setattr(module, name, b.to(device=device, dtype=b.dtype if keep else dtype))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.prepare(dtype)
