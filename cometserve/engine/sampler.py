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
    """`sample` without leaving the device: (token int64 [], its log-probability float32 []); one row
    of sample_rows."""
    tokens, lps = sample_rows(logits[None], [params], [generator], [counts], [suppress or ()],
                              None if allowed is None else allowed[None])
    return tokens[0], lps[0]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                counts: list[torch.Tensor | None], banned: list[tuple[int, ...]], allowed: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's rows in one batch: logits float32 [R, vocab] -> (tokens int64 [R], their log-probabilities
    under the unmodified rows float32 [R]). Each row's penalties (`counts[r]`: new_counts(), read, then
    counting the picked token), logit bias, `banned[r]` (token ids it must not pick: its stop tokens
    before min_tokens) and `allowed` (bool [R, vocab] or None: structured outputs) move the logits its
    token is picked from, greedily or at its temperature / top-k / top-p / min-p with noise from
    `generators[r]` (None: torch's default, one draw for all such rows). Row by row, a batch of
    hundreds of sampled requests (OpenAI's default is temperature 1) would cost hundreds of small
    launches for each of these steps."""
    dev, inf = logits.device, float("-inf")
    scores = _penalized(logits, params, counts)
    bias = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias]
    if bias:
        rows, cols, vals = zip(*bias)
        scores = scores.index_put((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                                  torch.tensor(vals, dtype=scores.dtype, device=dev), accumulate=True)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, inf)
    pairs = [(r, t) for r, ids in enumerate(banned) for t in ids]
    if pairs:
        rows, cols = zip(*pairs)
        scores = scores.index_put((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                                  torch.tensor(inf, device=dev))
    tokens = scores.argmax(dim=-1)  # the greedy rows' picks
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=dev)
        probs = sampling_probs(scores.index_select(0, idx), [params[r] for r in sampled])
        tokens = tokens.index_copy(0, idx, draw(probs, [generators[r] for r in sampled]))
    _count(tokens, counts)
    return tokens, token_logprobs(logits, tokens)


def _penalized(logits: torch.Tensor, params: list[SamplingParams], counts: list[torch.Tensor | None]) -> torch.Tensor:
    """The rows with penalties, penalized as vLLM does: the repetition penalty divides (multiplies,
    where negative) the logits of tokens in the prompt or generated so far; frequency and presence
    penalties subtract from those generated."""
    rows = [r for r, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    dev, idx = logits.device, torch.tensor(rows, device=logits.device)

    def per_row(name: str) -> torch.Tensor:
        return torch.tensor([getattr(params[r], name) for r in rows], dtype=logits.dtype, device=dev)[:, None]

    c = torch.stack([counts[r] for r in rows])  # [P, 2, vocab]
    sub, rep, out = logits.index_select(0, idx), per_row("repetition_penalty"), c[:, 0]
    sub = torch.where((c > 0).any(dim=1), torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - per_row("frequency_penalty") * out - per_row("presence_penalty") * (out > 0).float()
    return logits.index_copy(0, idx, sub)


def _count(tokens: torch.Tensor, counts: list[torch.Tensor | None]) -> None:
    """Each penalized row's picked token counted in its counts (row 0), on the device."""
    rows = [r for r, c in enumerate(counts) if c is not None]
    if not rows:
        return
    mine = [counts[r] for r in rows]
    stacked = torch.stack(mine)  # [P, 2, vocab]; one scatter and one foreach copy for all rows
    idx = torch.tensor(rows, device=tokens.device)
    stacked[torch.arange(len(rows), device=tokens.device), 0, tokens.index_select(0, idx)] += 1
    torch._foreach_copy_(mine, list(stacked.unbind(0)))


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
    # an exact 0 of noise would make a 0-probability (masked) token 0 / 0 = NaN, which argmax picks
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


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


def greedy_logprobs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [S, vocab] -> (argmax tokens int64 [S], their log-probabilities float32 [S])."""
    tokens = logits.argmax(dim=-1)
    return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rows of logits float32 [R, vocab] and one token per row -> its log-probability float32 [R],
    without writing the rows' whole log-softmax."""
    return logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
