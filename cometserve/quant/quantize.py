"""The offline pipeline: 16-bit model -> calibration -> FMPQ block maps -> rounded, packed weights ->
checkpoint (see checkpoint.py for the format)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import cometserve
from cometserve import checkpoint
from cometserve.model.loader import load_model, resolve_model_path
from cometserve.model.llama import LlamaForCausalLM
from cometserve.quant.calib_data import CalibSpec, calibration_tokens
from cometserve.quant.calibrate import channel_absmax
from cometserve.quant.fmpq import block_map, int8_fraction
from cometserve.quant.pack import pack_int4
from cometserve.quant.rounding.rtn import round_weight
from cometserve.scheme import QuantScheme, get_scheme, padded_k

SAVE_DTYPE = torch.bfloat16  # embeddings, norms, biases and the LM head stay 16-bit


def quantize(
    model: str | Path,
    out_dir: str | Path,
    scheme: str | QuantScheme = "fmpq_w4axkv4",
    calib: CalibSpec | None = None,
    calib_tokens: torch.Tensor | None = None,
    device: str | None = None,
) -> Path:
    """Quantize a Hugging Face directory or GGUF file into a cometserve checkpoint at `out_dir`.

    `calib` names the calibration source (default: Austen novels that evaluation never uses, or
    Python's docs if Austen is not installed) and how much of it to use; `calib_tokens`
    [n_samples, seq_len] bypasses the text (tests use it)."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if not scheme.quantizes_weights:
        raise ValueError(f"scheme {scheme.name!r} keeps 16-bit weights: serve the source model directly")
    src = resolve_model_path(model)
    loaded = load_model(src, device=device, dtype=torch.float32)
    stats, calib_info = {}, None
    if scheme.a_mode == "fmpq":
        if calib_tokens is None:
            from transformers import AutoTokenizer

            calib, text = _calibration_text(calib)
            tokens = calibration_tokens(AutoTokenizer.from_pretrained(str(src)), text, calib)
        else:
            calib = calib or CalibSpec(source="tokens given", n_samples=len(calib_tokens), seq_len=calib_tokens.shape[1])
            tokens = calib_tokens
        t0 = time.time()
        stats = channel_absmax(loaded.model, tokens)
        calib_info = {**calib.to_dict(), "tokens": tokens.numel(), "seconds": round(time.time() - t0, 1)}
    tensors, layers = quantize_model(loaded.model, scheme, stats)
    qcfg = {
        "scheme": scheme.to_dict(),
        "dtype": str(SAVE_DTYPE).removeprefix("torch."),
        "int8_block_fraction": int8_fraction(layers),
        "layers": layers,
        "provenance": {
            "source_model": str(model),
            "calibration": calib_info,
            "cometserve_version": cometserve.__version__,
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    return checkpoint.save(out_dir, tensors, qcfg, src)


def _calibration_text(calib: CalibSpec | None) -> tuple[CalibSpec, str]:
    from cometserve import assets

    if calib is None:
        source, text = assets.default_calibration_text()
        return CalibSpec(source=source), text
    return calib, assets.load_corpus(calib.source)


@torch.no_grad()
def quantize_model(model: LlamaForCausalLM, scheme: QuantScheme, stats: dict) -> tuple[dict, dict]:
    """-> (tensors for model.safetensors, quant_config "layers" entries). Mutates nothing it returns
    by reference: the model's gate/up rows are permuted in a copy."""
    tensors = {k: v.to(SAVE_DTYPE) for k, v in model.state_dict().items() if not _is_linear_weight(model, k)}
    layers: dict[str, dict] = {}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        down_perm, down_bits = _map(stats, f"{p}.mlp.down_proj", scheme, mlp.down_proj.in_features)
        gate_up_w = mlp.gate_up_proj.weight.float()
        if down_perm is not None:  # fold down_proj's permutation into the rows of gate and up
            gate, up = gate_up_w.split(mlp.intermediate)
            gate_up_w = torch.cat((gate[down_perm], up[down_perm]))
        for name, lin, weight in (
            (f"{p}.self_attn.qkv_proj", attn.qkv_proj, None),
            (f"{p}.self_attn.o_proj", attn.o_proj, None),
            (f"{p}.mlp.gate_up_proj", mlp.gate_up_proj, gate_up_w),
        ):
            perm, bits = _map(stats, name, scheme, lin.in_features)
            layers[name] = _quantize_linear(tensors, name, lin, weight, perm, bits, scheme, folded=False)
        layers[f"{p}.mlp.down_proj"] = _quantize_linear(
            tensors, f"{p}.mlp.down_proj", mlp.down_proj, None, down_perm, down_bits, scheme, folded=True
        )
    return tensors, layers


def _is_linear_weight(model: LlamaForCausalLM, key: str) -> bool:
    return key.endswith("_proj.weight")


def _map(stats: dict, name: str, scheme: QuantScheme, k: int):
    if not scheme.quantizes_activations:
        return None, None
    return block_map(stats.get(name), scheme, k)


def _quantize_linear(tensors, name, lin, weight, perm, bits, scheme: QuantScheme, folded: bool) -> dict:
    w = (lin.weight if weight is None else weight).float()
    if perm is not None:
        w = w[:, perm]
    w = torch.nn.functional.pad(w, (0, padded_k(lin.in_features) - lin.in_features))
    codes, scales = round_weight(w, scheme.w_bits, scheme.w_group_size)
    tensors[f"{name}.qweight"] = pack_int4(codes) if scheme.w_bits == 4 else codes
    tensors[f"{name}.w_scales"] = scales
    return {
        "in_features": lin.in_features,
        "out_features": lin.out_features,
        "w_bits": scheme.w_bits,
        "w_group_size": scheme.w_group_size,
        "block_bits": bits,
        "perm": perm.tolist() if perm is not None else None,
        "perm_folded": folded and perm is not None,
    }
