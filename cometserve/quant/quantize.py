"""The offline pipeline: 16-bit model -> calibration -> FMPQ block maps -> rounded, packed weights ->
checkpoint (see checkpoint.py for the format)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import cometserve
from cometserve import checkpoint
from cometserve.kernels.ref import hadamard
from cometserve.model.llama import DecoderLayer, LlamaForCausalLM
from cometserve.model.loader import load_model, resolve_model_path
from cometserve.quant.calib_data import CalibSpec, calibration_tokens
from cometserve.quant.calibrate import InputStats, calibrate_layerwise
from cometserve.quant.fmpq import block_map, int8_fraction
from cometserve.quant.pack import pack_int4
from cometserve.quant.primitives import dequantize_weight
from cometserve.quant.rounding import gptq, rtn
from cometserve.scheme import BLOCK_SIZE, QuantScheme, get_scheme, padded_k

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
    tokens, calib_info = None, None
    if needs_calibration(scheme):
        if calib_tokens is None:
            from transformers import AutoTokenizer

            calib, text = _calibration_text(calib)
            tokens = calibration_tokens(AutoTokenizer.from_pretrained(str(src)), text, calib)
        else:
            calib = calib or CalibSpec(source="tokens given", n_samples=len(calib_tokens), seq_len=calib_tokens.shape[1])
            tokens = calib_tokens
        calib_info = {**calib.to_dict(), "tokens": tokens.numel()}
    t0 = time.time()
    tensors, layers = quantize_model(loaded.model, scheme, tokens)
    qcfg = {
        "scheme": scheme.to_dict(),
        "dtype": str(SAVE_DTYPE).removeprefix("torch."),
        "int8_block_fraction": int8_fraction(layers),
        "layers": layers,
        "provenance": {
            "source_model": str(model),
            "seconds": round(time.time() - t0, 1),
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
def quantize_model(model: LlamaForCausalLM, scheme: QuantScheme, tokens: torch.Tensor | None) -> tuple[dict, dict]:
    """-> (tensors for model.safetensors, quant_config "layers" entries). Layer by layer: calibrate
    on what the already quantized layers produce, choose the block maps, round the weights. The
    model is left computing with the dequantized weights (fake quantization)."""
    tensors = {k: v.to(SAVE_DTYPE) for k, v in model.state_dict().items() if not k.endswith("_proj.weight")}
    layers: dict[str, dict] = {}

    def quantize_layer(i: int, layer: DecoderLayer, stats: dict[str, InputStats]) -> None:
        layers.update(_quantize_decoder_layer(f"model.layers.{i}", layer, stats, scheme, tensors))

    if tokens is None:  # nothing depends on activations: no calibration pass
        for i, layer in enumerate(model.model.layers):
            quantize_layer(i, layer, {})
    else:
        calibrate_layerwise(model, tokens, quantize_layer, hessian=scheme.weight_rounding == "gptq")
    return tensors, layers


def needs_calibration(scheme: QuantScheme) -> bool:
    return scheme.a_mode == "fmpq" or scheme.weight_rounding == "gptq"


def _quantize_decoder_layer(p: str, layer: DecoderLayer, stats: dict, scheme: QuantScheme, tensors: dict) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    down_perm, down_bits = _map(stats, f"{p}.mlp.down_proj", scheme, mlp.down_proj.in_features)
    # down_proj's permutation is folded into the output rows of gate and up: its input arrives permuted
    rows = None if down_perm is None else torch.cat((down_perm, down_perm + mlp.intermediate))
    out = {}
    for name, lin, row_perm in (
        (f"{p}.self_attn.qkv_proj", attn.qkv_proj, None),
        (f"{p}.self_attn.o_proj", attn.o_proj, None),
        (f"{p}.mlp.gate_up_proj", mlp.gate_up_proj, rows),
    ):
        perm, bits = _map(stats, name, scheme, lin.in_features)
        out[name] = _quantize_linear(tensors, name, lin, stats.get(name), perm, bits, scheme, row_perm)
    name = f"{p}.mlp.down_proj"
    out[name] = _quantize_linear(tensors, name, mlp.down_proj, stats.get(name), down_perm, down_bits, scheme, None)
    out[name]["perm_folded"] = down_perm is not None
    return out


def _map(stats: dict, name: str, scheme: QuantScheme, k: int):
    if not scheme.quantizes_activations:
        return None, None
    st = stats.get(name)
    return block_map(st.absmax.cpu() if st is not None else None, scheme, k)


def _rotation(bits: list[int] | None, scheme: QuantScheme, device) -> torch.Tensor | None:
    if bits is None or scheme.a_rotation != "hadamard" or 4 not in bits:
        return None
    h, eye = hadamard(BLOCK_SIZE, device), torch.eye(BLOCK_SIZE, device=device)
    return torch.block_diag(*[h if b == 4 else eye for b in bits])


def _quantize_linear(tensors, name, lin, st: InputStats | None, perm, bits, scheme: QuantScheme, row_perm) -> dict:
    """Round lin's weight (rows reordered by row_perm, K columns by perm, K zero padded), store the
    codes and scales, and write the dequantized weight back into lin in its original order."""
    k, k_pad = lin.in_features, padded_k(lin.in_features)
    w = lin.weight.float()
    if row_perm is not None:
        w = w[row_perm]
    if perm is not None:
        w = w[:, perm]
    w = torch.nn.functional.pad(w, (0, k_pad - k))
    rot = _rotation(bits, scheme, w.device)  # block-diagonal: Hadamard on INT4 blocks, identity elsewhere
    if rot is not None:
        w = w @ rot  # (X R)(W R)^T = X W^T: the kernel sees rotated activations and rotated weights
    if scheme.weight_rounding == "gptq":
        h = st.hessian if perm is None else st.hessian[perm][:, perm]
        h = torch.nn.functional.pad(h, (0, k_pad - k, 0, k_pad - k))
        if rot is not None:
            h = rot.T @ h @ rot
        codes, scales = gptq.round_weight(w, scheme.w_bits, scheme.w_group_size, h)
    else:
        codes, scales = rtn.round_weight(w, scheme.w_bits, scheme.w_group_size)
    tensors[f"{name}.qweight"] = (pack_int4(codes) if scheme.w_bits == 4 else codes).cpu()
    tensors[f"{name}.w_scales"] = scales.cpu()
    deq = dequantize_weight(codes, scales)
    deq = (deq @ rot.T if rot is not None else deq)[:, :k]
    if perm is not None:
        deq = deq[:, torch.argsort(perm.to(deq.device))]
    if row_perm is not None:
        deq = deq[torch.argsort(row_perm.to(deq.device))]
    lin.weight.copy_(deq)
    return {
        "in_features": k,
        "out_features": lin.out_features,
        "w_bits": scheme.w_bits,
        "w_group_size": scheme.w_group_size,
        "block_bits": bits,
        "perm": perm.tolist() if perm is not None else None,
        "perm_folded": False,
    }
