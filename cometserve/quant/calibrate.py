"""Calibration: run real text through the 16-bit model and record, for the input of every linear
layer, the absolute maximum of each channel (FMPQ's outlier statistic, COMET section 3.2)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from cometserve.model.layers.linear import Linear
from cometserve.model.llama import LlamaForCausalLM


@torch.no_grad()
def channel_absmax(model: LlamaForCausalLM, tokens: torch.Tensor, desc: str = "calibrating") -> dict[str, torch.Tensor]:
    """tokens [n_samples, seq_len] -> {linear name: float32 [in_features]} absmax over every token."""
    stats: dict[str, torch.Tensor] = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, Linear)}

    def observe(layer: Linear, x: torch.Tensor) -> None:
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
        name = names[layer]
        stats[name] = torch.maximum(stats[name], amax) if name in stats else amax

    for layer in names:
        layer.observer = observe
    try:
        device = model.model.embed_tokens.weight.device
        positions = torch.arange(tokens.shape[1], device=device)
        for sample in tqdm(tokens, desc=desc, unit="seq"):
            model(sample.to(device), positions, model.new_cache(16, 64))
    finally:
        for layer in names:
            layer.observer = None
    return stats
