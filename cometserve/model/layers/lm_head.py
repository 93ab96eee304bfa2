"""The weight-only INT8 LM head (`EngineConfig.lm_head = "int8"`, `--lm-head int8`): an option past
COMET, whose LM head stays 16-bit (section 3.6). At load the 16-bit head (or, for tied embeddings,
a copy of the embedding) is quantized per row, round to nearest: half the bytes a decode step reads
for it. The activations stay 16-bit. On CUDA kernels/lm_head.py computes the logits, elsewhere the
reference (ref.w8a16_logits)."""

from __future__ import annotations

import torch
from torch import nn

from cometserve.kernels import ref

QUANT_ROWS = 8192  # rows quantized at once: float32 temporaries of a few hundred MB, not of the whole head


class Int8LMHead(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        n = weight.shape[0]
        self.register_buffer("codes", torch.empty(weight.shape, dtype=torch.int8, device=weight.device))
        self.register_buffer("scales", torch.empty(n, dtype=torch.float32, device=weight.device))
        for r0 in range(0, n, QUANT_ROWS):  # per row, so chunking changes nothing
            self.codes[r0:r0 + QUANT_ROWS], self.scales[r0:r0 + QUANT_ROWS] = ref.quantize_rows_int8(
                weight[r0:r0 + QUANT_ROWS])
        self.kernel = None
        if weight.device.type == "cuda":
            from cometserve.kernels import lm_head

            self.kernel = lm_head.w8a16_logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> float32 logits [T, rows]."""
        if self.kernel is not None and hidden.dtype in (torch.bfloat16, torch.float16):
            return self.kernel(hidden.contiguous(), self.codes, self.scales)
        return ref.w8a16_logits(hidden, self.codes, self.scales)


LM_HEADS = ("16bit", "int8")


def use_lm_head(model: nn.Module, kind: str) -> None:
    """Give `model` (a LlamaForCausalLM, or one rank's shard of it) the `kind` LM head. "int8"
    replaces the 16-bit head (freeing it; a tied head keeps the embedding) by Int8LMHead over the
    same rows; idempotent. "16bit" leaves the model as loaded."""
    if kind not in LM_HEADS:
        raise ValueError(f"lm_head must be one of {LM_HEADS}, got {kind!r}")
    if kind == "16bit" or model.int8_head is not None:
        return
    head = model.lm_head if model.lm_head is not None else model.model.embed_tokens
    with torch.no_grad():
        model.int8_head = Int8LMHead(head.weight.detach())
    model.lm_head = None
    if head.weight.device.type == "cuda":
        torch.cuda.empty_cache()
