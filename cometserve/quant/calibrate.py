"""Calibration, one decoder layer at a time: run every calibration sequence through layer i, record
for the input of each of its linear layers the per-channel absmax (FMPQ's outlier statistic, COMET
section 3.2) and, for GPTQ, the Hessian X^T X; let the caller quantize layer i; then feed the
outputs of the quantized layer i to layer i + 1, so later layers calibrate on what they will see."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cometserve.model.layers.linear import Linear
from cometserve.model.llama import DecoderLayer, LlamaForCausalLM
from cometserve.model.plain_cache import LayerCache


@dataclass
class InputStats:
    absmax: torch.Tensor  # float32 [K]
    hessian: torch.Tensor | None  # float32 [K, K], mean of x x^T over tokens (GPTQ)
    tokens: int = 0


def _observer(stats: dict[str, InputStats], names: dict[Linear, str], hessian: bool):
    def observe(layer: Linear, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        amax = x2.abs().amax(0)
        name = names[layer]
        st = stats.get(name)
        if st is None:
            k = x2.shape[1]
            st = stats[name] = InputStats(amax, torch.zeros(k, k, device=x2.device) if hessian else None)
        else:
            st.absmax = torch.maximum(st.absmax, amax)
        if hessian:  # running mean keeps the scale independent of the token count
            n = x2.shape[0]
            st.hessian.mul_(st.tokens / (st.tokens + n)).addmm_(x2.T, x2, alpha=1.0 / (st.tokens + n))
        st.tokens += x2.shape[0]

    return observe


@torch.no_grad()
def calibrate_layerwise(
    model: LlamaForCausalLM,
    tokens: torch.Tensor,
    quantize_layer: Callable[[int, DecoderLayer, dict[str, InputStats]], None],
    hessian: bool,
) -> None:
    """tokens [n_samples, seq_len]. `quantize_layer(i, layer, stats)` must leave layer i computing
    its quantized function (weights replaced by their dequantized values) before it returns."""
    cfg = model.config
    device = model.model.embed_tokens.weight.device
    positions = torch.arange(tokens.shape[1], device=device)
    hidden = [model.model.embed_tokens(t.to(device)) for t in tokens]

    def run(layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        cache = LayerCache(cfg.num_kv_heads, cfg.head_dim, x.dtype, device, kv_bits=16, group=64)
        delta, residual = layer(x, positions, cache)
        return delta + residual

    for i, layer in enumerate(tqdm(model.model.layers, desc="calibrating + quantizing", unit="layer")):
        prefix = f"model.layers.{i}."
        names = {m: prefix + n for n, m in layer.named_modules() if isinstance(m, Linear)}
        stats: dict[str, InputStats] = {}
        for lin in names:
            lin.observer = _observer(stats, names, hessian)
        try:
            for x in hidden:
                run(layer, x)
        finally:
            for lin in names:
                lin.observer = None
        quantize_layer(i, layer, stats)
        hidden = [run(layer, x) for x in hidden]
