"""Prompt log-probabilities (SamplingParams.prompt_logprobs): for each prompt position p >= 1, the
log-probability of the prompt's token p given tokens [0, p), and the k most likely tokens there.

The row of position p - 1 predicts token p. Inside a prefill chunk that token is the chunk's next
one; the chunk's last row predicts the first token of the request's next chunk, so its
log-softmax row is kept on the device until that chunk runs (a chunk that reaches the end of the
prompt predicts the first output token instead: dropped). Rows go through the LM head in blocks,
so a long chunk never holds [T, vocab] float32 logits at once.
"""

from __future__ import annotations

import torch

ROWS_PER_BLOCK = 256


class PromptLogprobs:
    def __init__(self, model) -> None:
        self.model = model
        self.pending: dict[str, torch.Tensor] = {}  # request -> log-softmax [vocab] of its last computed row

    def release(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def compute(self, hidden: torch.Tensor, chunks) -> list[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """chunks: (request_id, first row in hidden, start position, token ids, k, reaches the end of
        the known tokens). -> per chunk (request_id, first position, logprobs [P], alternatives'
        token ids [P, k], their logprobs [P, k]) on the device, for positions first .. first + P - 1."""
        return [self._chunk(hidden, *c) for c in chunks]

    def _chunk(self, hidden, rid: str, row0: int, start: int, ids, k: int, final: bool):
        prev = self.pending.pop(rid, None) if start > 0 else None  # a recompute starts over
        ids_t = torch.tensor(ids, device=hidden.device)
        lps, top_ids, top_lps = [], [], []

        def take(rows: torch.Tensor, targets: torch.Tensor) -> None:  # log-softmax rows, the tokens they predict
            lps.append(rows.gather(1, targets[:, None])[:, 0])
            v, i = rows.topk(k, dim=-1)
            top_lps.append(v)
            top_ids.append(i)

        if prev is not None:
            take(prev[None], ids_t[:1])
        n = len(ids)
        for b in range(0, n, ROWS_PER_BLOCK):
            e = min(n, b + ROWS_PER_BLOCK)
            rows = torch.log_softmax(self.model.compute_logits(hidden[row0 + b: row0 + e]), dim=-1)
            if e == n:  # the last row predicts the token after this chunk
                if not final:
                    self.pending[rid] = rows[-1].clone()
                rows = rows[:-1]
            take(rows, ids_t[b + 1: e + 1])
        first = start if prev is not None else start + 1
        return rid, first, torch.cat(lps), torch.cat(top_ids), torch.cat(top_lps)
