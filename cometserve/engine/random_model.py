"""`--random-weights`: a model of real shape with random weights, built directly on the device.

For measuring speed with no download: Llama-2-7B, Llama-3-8B, Llama-2-13B, Llama-3-70B, Qwen2-7B
and Mistral-7B (v0.3) configs ship in `cometserve/configs/` (Hugging Face config.json contents); any
config.json path of the LLaMA family works too. Quantized modes are built without calibration, straight into the checkpoint's storage
layout: identity permutations (none stored), random INT4 weight codes with plausible float16
scales, the scheme's Hadamard rotation of INT4 activation blocks, and a fixed activation block map: every block INT8 (`w4a8kv4`) or the first 16% of blocks
INT8 (`w4axkv4`: FMPQ gathers outlier channels into as few blocks as possible; 16% is the
fraction this project plans for). The numbers are meaningless; shapes, bytes and kernels are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cometserve.model.layers.linear import QuantLinear
from cometserve.model.loader import LoadedModel, build_model, default_device
from cometserve.scheme import PRESETS, num_blocks

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODEL_NAMES = ("llama-2-7b", "llama-3-8b", "llama-2-13b", "llama-3-70b", "qwen2-7b", "mistral-7b")
MODES = {"bf16": "fp16", "w4a8kv4": "w4a8kv4", "w4axkv4": "fmpq_w4axkv4"}
INT8_FRACTION = 0.16


def config_path(name_or_path: str | Path) -> Path:
    """A shipped config name (`llama-3-8b`) or a path to a config.json (or a directory holding one)."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"unknown model config {name_or_path!r}: use one of {MODEL_NAMES} or a config.json path")


def load_config(name_or_path: str | Path):
    """The transformers config of the file's model_type (LlamaConfig, Qwen2Config, MistralConfig)."""
    from transformers import AutoConfig

    fields = json.loads(config_path(name_or_path).read_text())
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)


def block_map(in_features: int, a_mode: str, int8_fraction: float = INT8_FRACTION) -> torch.Tensor:
    """uint8 [num_blocks]: all 8 (int8), all 4 (int4), or the first round(fraction * n) blocks 8 (fmpq)."""
    nb = num_blocks(in_features)
    bits = torch.full((nb,), 4, dtype=torch.uint8)
    n8 = {"int8": nb, "int4": 0}.get(a_mode, round(int8_fraction * nb))
    bits[:n8] = 8
    return bits


def _random_quant_factory(scheme, int8_fraction: float, rotate: bool):
    def make(name: str, in_features: int, out_features: int, bias: bool):
        # FMPQ checkpoints permute every layer's input channels except down_proj's (folded into
        # gate_up's rows): the random model pays the same gather
        has_perm = scheme.a_mode == "fmpq" and not name.endswith("down_proj")
        layer = QuantLinear(in_features, out_features, bias, scheme.w_bits, scheme.w_group_size, True, has_perm, rotate)
        with torch.no_grad():
            if has_perm:
                layer.perm.copy_(torch.randperm(in_features, device=layer.perm.device).to(torch.int32))
            layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8,
                                              device=layer.qweight.device).to(layer.qweight.dtype))
            # weights of std ~0.5/sqrt(K): INT4 scale ~ 2.5 std / 7, jittered +-50%
            base = 2.5 * 0.5 / in_features**0.5 / 7
            layer.w_scales.uniform_(0.5 * base, 1.5 * base)
            layer.block_bits.copy_(block_map(in_features, scheme.a_mode, int8_fraction))
        return layer

    return make


@torch.no_grad()
def build_random_model(name_or_path: str | Path, mode: str = "w4axkv4", device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       int8_fraction: float = INT8_FRACTION, rotate: bool | None = None, tp=None) -> LoadedModel:
    """A ready model of the named shape in `mode` (bf16 | w4a8kv4 | w4axkv4), built on `device`.
    `rotate` None: Hadamard-rotated INT4 activation blocks iff the scheme says so (as served).
    `tp` (a distributed.ParallelContext): build only this rank's shard (its own random numbers)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    device = torch.device(device) if device is not None else default_device()
    scheme = PRESETS[MODES[mode]]
    hf_config = load_config(name_or_path)
    torch.manual_seed(seed if tp is None else seed * 1000 + tp.rank)
    rotate = scheme.a_rotation == "hadamard" if rotate is None else rotate
    make = None if mode == "bf16" else _random_quant_factory(scheme, int8_fraction, rotate)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in their dtype, on the device: no host copy
    try:
        with torch.device(device):
            if tp is not None:
                from cometserve.distributed.model import build_tp_model, plain_builder

                model = build_tp_model(hf_config, tp, make and plain_builder(make), blocks=make is not None)
            else:
                model = build_model(hf_config) if make is None else build_model(hf_config, make)
    finally:
        torch.set_default_dtype(prev)
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed_tokens" not in name:
            p.normal_(0.0, 0.5 / p.shape[1] ** 0.5)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare(dtype)
            if module._qweight is not None and module._qweight.data_ptr() != module.qweight.data_ptr():
                module._buffers["qweight"] = None  # the kernel layout is a copy: drop the storage layout
    return LoadedModel(model.eval(), hf_config, scheme, config_path(name_or_path), None)


def build_hf_model(name_or_path: str | Path, device: str | torch.device = "cuda"):
    """Hugging Face transformers' model of the same config (LlamaForCausalLM, ...), random bf16
    weights (the benchmarks' peer)."""
    from transformers import AutoModelForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(load_config(name_or_path)).eval()
    finally:
        torch.set_default_dtype(prev)
