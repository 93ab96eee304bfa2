"""Accuracy measurement: sliding-window perplexity through the serving numerics (quantized
activations and the INT4 KV cache included, exactly as generation sees them)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from cometserve.model.llama import LlamaForCausalLM
from cometserve.scheme import QuantScheme


@torch.no_grad()
def perplexity(
    model: LlamaForCausalLM,
    scheme: QuantScheme,
    token_ids: torch.Tensor,
    ctx: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """exp(mean NLL) over `token_ids` [N], windows of `ctx` tokens moved by `stride` (default ctx/2);
    each window scores only the tokens no earlier window scored, each with >= ctx - stride of context."""
    stride = stride or ctx // 2
    device = model.model.embed_tokens.weight.device
    ids = token_ids.to(device)
    starts = list(range(0, max(1, ids.numel() - ctx) + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    nll, count, scored_to = 0.0, 0, 0
    for start in tqdm(starts, desc="perplexity", disable=not progress, unit="win"):
        window = ids[start : start + ctx]
        hidden = model(window, torch.arange(window.numel(), device=device), model.new_cache(scheme.kv_bits, scheme.kv_group_size))
        first = max(scored_to - start, 1)  # window index of the first target no window scored yet
        logits = model.compute_logits(hidden[first - 1 : -1])
        targets = window[first:]
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += targets.numel()
        scored_to = start + window.numel()
    return math.exp(nll / count)
