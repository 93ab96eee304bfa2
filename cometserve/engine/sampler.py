"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator."""

from __future__ import annotations

import torch

from cometserve.sampling_params import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """logits float32 [vocab] -> (token id, its log-probability under the unmodified distribution)."""
    token, logprob = sample_tensor(logits, params, generator)
    return int(token), float(logprob)


def sample_tensor(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` without leaving the device: (token int64 [], its log-probability float32 []).
    logit_bias moves the logits the token is picked from, not the reported log-probability."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits = logits.index_add(0, torch.tensor(ids, device=logits.device),
                                  torch.tensor(bias, dtype=logits.dtype, device=logits.device))
    if params.greedy:
        token = torch.argmax(logits)
        return token, logprobs[token]
    scores = logits / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p  # keep the token that crosses
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    token = torch.multinomial(probs, 1, generator=generator)[0]
    return token, logprobs[token]
