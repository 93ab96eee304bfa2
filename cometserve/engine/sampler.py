"""Token sampling: greedy, temperature, top-k, top-p, min-p, with a per-request seeded generator;
logit bias and presence / frequency penalties."""

from __future__ import annotations

import torch

from cometserve.sampling_params import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           counts: torch.Tensor | None = None) -> tuple[int, float]:
    """logits float32 [vocab] -> (token id, its log-probability under the unmodified distribution)."""
    token, logprob = sample_tensor(logits, params, generator, counts)
    return int(token), float(logprob)


def new_counts(params: SamplingParams, vocab: int, device) -> torch.Tensor | None:
    """A request's generated-token counts (float32 [vocab]) where its penalties need them."""
    return torch.zeros(vocab, dtype=torch.float32, device=device) if params.penalized else None


def sample_tensor(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                  counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` without leaving the device: (token int64 [], its log-probability float32 []).
    logit_bias and the penalties move the logits the token is picked from, not the reported
    log-probability. `counts` (new_counts(); required when penalized) is read for the penalties and
    then counts the picked token, on the device."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.penalized:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits = logits.index_add(0, torch.tensor(ids, device=logits.device),
                                  torch.tensor(bias, dtype=logits.dtype, device=logits.device))
    if params.greedy:
        token = torch.argmax(logits)
        return _counted(token, counts), logprobs[token]
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
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    token = torch.multinomial(probs, 1, generator=generator)[0]
    return _counted(token, counts), logprobs[token]


def _counted(token: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    if counts is not None:
        counts.index_put_((token,), torch.ones((), dtype=counts.dtype, device=counts.device), accumulate=True)
    return token
