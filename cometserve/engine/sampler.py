"""Token sampling: greedy, temperature, top-k, top-p, min-p, with a per-request seeded generator;
logit bias and presence / frequency / repetition penalties."""

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
           counts: torch.Tensor | None = None, suppress: tuple[int, ...] | None = None,
           allowed: torch.Tensor | None = None) -> tuple[int, float]:
    """logits float32 [vocab] -> (token id, its log-probability under the unmodified distribution)."""
    token, logprob = sample_tensor(logits, params, generator, counts, suppress, allowed)
    return int(token), float(logprob)


def new_counts(params: SamplingParams, vocab: int, device) -> torch.Tensor | None:
    """A request's token counts where its penalties need them: float32 [2, vocab], row 0 the
    generated tokens' counts, row 1 set to 1 for the prompt's tokens (mark_prompt)."""
    return torch.zeros(2, vocab, dtype=torch.float32, device=device) if params.penalized else None


def mark_prompt(counts: torch.Tensor, token_ids) -> None:
    """Record prompt tokens (any order, repeats allowed) for the repetition penalty, on the device."""
    counts[1].index_fill_(0, torch.as_tensor(token_ids, device=counts.device), 1.0)


def sample_tensor(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                  counts: torch.Tensor | None = None, suppress: tuple[int, ...] | None = None,
                  allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` without leaving the device: (token int64 [], its log-probability float32 []).
    logit_bias, the penalties, `suppress` (token ids that must not be picked: a request's stop
    tokens before min_tokens) and `allowed` (bool [vocab]: the only tokens that may be, a structured
    output's grammar) move the logits the token is picked from, not the reported log-probability. `counts` (new_counts(); required when penalized) is read for the penalties and
    then counts the picked token, on the device."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.penalized:
        out = counts[0]
        if params.repetition_penalty != 1.0:
            p, seen = params.repetition_penalty, (counts > 0).any(dim=0)
            logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
        logits = logits - params.frequency_penalty * out - params.presence_penalty * (out > 0).float()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits = logits.index_add(0, torch.tensor(ids, device=logits.device),
                                  torch.tensor(bias, dtype=logits.dtype, device=logits.device))
    if suppress:
        logits = logits.index_fill(0, torch.tensor(suppress, device=logits.device), float("-inf"))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.greedy:
        token = torch.argmax(logits)
        return _counted(token, counts), logprobs[token]
    token = draw(sampling_probs(logits[None], [params]), [generator])[0]
    return _counted(token, counts), logprobs[token]


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs [R, vocab]: argmax(p / q) with q ~ Exp(1) drawn from the row's
    generator, an exact draw from p (the exponential race) that batches: a row's draw depends on its
    generator only, so a seeded request gets the same tokens alone or in any batch. Rows sharing
    one generator (None entries: torch's default) draw their noise in one call."""
    noise = torch.empty_like(probs)
    shared = [r for r, g in enumerate(generators) if g is None]
    if len(shared) == len(generators):
        noise.exponential_()
    else:
        for r, g in enumerate(generators):
            if g is not None:
                noise[r].exponential_(generator=g)
        if shared:
            idx = torch.tensor(shared, device=probs.device)
            noise.index_copy_(0, idx, torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_())
    return (probs / noise).argmax(dim=-1)


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Rows of logits float32 [R, vocab] (bias, penalties and masks applied) -> the probabilities
    each row samples from: its temperature, then its top-k, top-p (the token that crosses p is
    kept) and min-p, where set."""
    dev, inf = logits.device, float("-inf")
    scores = logits / torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)[:, None]
    ks = [min(p.top_k, scores.shape[-1]) for p in params]
    if any(ks):
        top = torch.topk(scores, max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor([max(k - 1, 0) for k in ks], device=dev)[:, None])
        kth = kth.masked_fill(torch.tensor([not k for k in ks], device=dev)[:, None], inf)
        scores = scores.masked_fill(scores < kth, inf)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)[:, None]
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        drop = (sorted_probs.cumsum(-1) - sorted_probs >= top_p) & (top_p < 1.0)
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, inf))
    probs = torch.softmax(scores, dim=-1)
    if any(p.min_p for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _counted(token: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    if counts is not None:
        counts[0].index_put_((token,), torch.ones((), dtype=counts.dtype, device=counts.device), accumulate=True)
    return token


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], banned: list[tuple[int, ...]],
                allowed: torch.Tensor | None, generators: list[torch.Generator | None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of rows without bias or penalties (SamplingParams.batchable): logits float32 [R, vocab];
    `banned[r]`: token ids row r must not pick (its stop tokens before min_tokens); `allowed`: bool
    [R, vocab] or None (structured outputs); `generators[r]`: a sampled row's (None: torch's default,
    for unseeded rows). -> (tokens int64 [R], their log-probabilities under the unmodified rows
    float32 [R]), the tokens sample_tensor gives row by row with the same generators."""
    dev = logits.device
    scores = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
    rows = [r for r, ids in enumerate(banned) for _ in ids]
    if rows:
        cols = [t for ids in banned for t in ids]
        scores = scores.index_put((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                                  torch.tensor(float("-inf"), device=dev))
    tokens = scores.argmax(dim=-1)  # the greedy rows' picks
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=dev)
        probs = sampling_probs(scores.index_select(0, idx), [params[r] for r in sampled])
        tokens = tokens.index_copy(0, idx, draw(probs, [generators[r] for r in sampled]))
    return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
