"""Deterministic calibration tokens: `n_samples` windows of `seq_len` tokens drawn from a text with a
seeded generator, so the same (source, seed) always gives the same checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CalibSpec:
    source: str  # e.g. "austen:emma+sensesensibility+mansfieldpark", "pydoc", a file path
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_tokens(tokenizer, text: str, spec: CalibSpec) -> torch.Tensor:
    """[n_samples, seq_len] int64 token windows from `text` (non-overlapping where the text allows)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if ids.numel() < spec.seq_len + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={spec.seq_len}")
    n_windows = ids.numel() // spec.seq_len
    g = torch.Generator().manual_seed(spec.seed)
    if n_windows >= spec.n_samples:
        starts = torch.randperm(n_windows, generator=g)[: spec.n_samples] * spec.seq_len
    else:
        starts = torch.randint(0, ids.numel() - spec.seq_len, (spec.n_samples,), generator=g)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])
