"""The 16-bit model against transformers' own implementation, on tiny random configs of each family."""

from __future__ import annotations

import pytest
import torch

from cometserve.model.loader import load_model
from tests.tiny_models import FAMILIES, write_tiny_model

# float32 on both sides, same weights: only summation order differs
LOGITS_ATOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_model(family, tmp_path / family)
    hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    ours = load_model(path, device="cpu", dtype=torch.float32).model
    ids = torch.randint(0, 320, (37,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(37), ours.new_cache(16, 64)))
    assert torch.allclose(got, want, atol=LOGITS_ATOL, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("kv_bits, chunks", [(16, (70, 40, 1, 1, 38)), (4, (64, 32, 54))])
def test_chunked_forward_equals_full_forward(kv_bits, chunks, tmp_path):
    """Prefill in chunks then decode: the logits equal one forward over the whole sequence. Attention
    reads the cache after each step's write, so with INT4 K/V a query may see its own group 16-bit or
    quantized depending on where the step ended: chunks on group boundaries (32) give the same result."""
    model = load_model(write_tiny_model("llama", tmp_path / "m"), device="cpu").model
    ids = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.compute_logits(model(ids, torch.arange(150), model.new_cache(kv_bits, 32)))
        cache = model.new_cache(kv_bits, 32)
        parts, start = [], 0
        for size in chunks:
            sl = slice(start, start + size)
            parts.append(model.compute_logits(model(ids[sl], torch.arange(150)[sl], cache)))
            start += size
    assert len(cache) == 150
    assert torch.allclose(torch.cat(parts), full, atol=1e-4)
