"""LLM: the offline Python API. `LLM(path).generate(prompts, SamplingParams(...))`.

`generate` runs every prompt through the batched engine (engine.py: continuous batching over the
paged KV cache). `generate_reference` keeps the first engine, one sequence at a time over the plain
per-sequence cache: the behavioural reference the batched engine is tested against."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.kv_manager import cdiv
from cometserve.engine.sampler import make_generator, mark_prompt, new_counts, sample
from cometserve.model.loader import load_model
from cometserve.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None  # per token: (token id, logprob), best first
    # SamplingParams.prompt_logprobs: per prompt position (logprob, alternatives), None at position 0
    prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]] | None] | None = None


@dataclass
class RequestOutput:
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    seconds: float = 0.0


class LLM:
    """A loaded model (16-bit directory, GGUF file or cometserve checkpoint) with its tokenizer."""

    def __init__(self, model: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
                 engine_config: EngineConfig | None = None) -> None:
        from transformers import AutoTokenizer

        self.loaded = load_model(model, device=device, dtype=dtype)
        self.model = self.loaded.model
        self.scheme = self.loaded.scheme
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.loaded.path))
        self.device = self.model.model.embed_tokens.weight.device
        self.max_model_len = self.model.config.max_model_len
        self.engine_config = engine_config
        self._engine: LLMEngine | None = None
        self._batches = 0

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model has no chat template; generate without chat")
            msgs = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def _encode_all(self, prompts, params: SamplingParams, chat: bool) -> tuple[list[str], list[list[int]]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self.encode(p, chat) for p in prompts]
        for ids in encoded:
            self._check_length(ids, params)
        return prompts, encoded

    def generate(
        self,
        prompts: str | list[str],
        sampling_params: SamplingParams | None = None,
        chat: bool = False,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """All prompts at once through the batched engine; outputs in prompt order."""
        params = sampling_params or SamplingParams()
        prompts, encoded = self._encode_all(prompts, params, chat)
        engine = self.engine(encoded, params)
        t0 = time.perf_counter()
        self._batches += 1
        ids = [f"generate-{self._batches}-{i}" for i in range(len(prompts))]
        requests = [engine.add_request(rid, toks, params) for rid, toks in zip(ids, encoded)]
        seconds: dict[str, float] = {}
        reasons: dict[str, str] = {}
        with tqdm(total=len(prompts), desc="generating", disable=not use_tqdm) as bar:
            for delta in engine.stream():
                if delta.finished:
                    seconds[delta.request_id] = time.perf_counter() - t0
                    reasons[delta.request_id] = delta.finish_reason
                    bar.update(1)
        outputs = []
        for prompt, toks, rid, req in zip(prompts, encoded, ids, requests):
            reason = reasons.get(rid, req.finish_reason)
            lps = list(req.output_logprobs) if params.logprobs else None
            tops = list(req.output_top_logprobs) if params.top_logprobs else None
            completion = CompletionOutput(engine.completion_text(req), list(req.output_token_ids), reason, lps, tops,
                                          req.prompt_logprobs)
            outputs.append(RequestOutput(prompt, toks, [completion], seconds.get(rid, 0.0)))
        return outputs

    def engine(self, encoded: list[list[int]] | None = None, params: SamplingParams | None = None) -> LLMEngine:
        """The batched engine. On CUDA one engine sized from free memory is kept; on CPU the cache is
        sized (and the engine rebuilt) to hold this batch's requests whole."""
        if self.device.type == "cuda":
            if self._engine is None:
                self._engine = LLMEngine(self.model, self.scheme, self.engine_config, self.tokenizer)
                self._engine.warm_up()
            return self._engine
        cfg = self.engine_config or EngineConfig(max_num_seqs=64, use_cuda_graphs=False)
        page = cfg.page_size or (self.scheme.kv_group_size if self.scheme.kv_bits == 4 else 64)
        need = sum(cdiv(len(t) + params.max_tokens, page) for t in encoded or [[0]]) if params else 1
        if cfg.num_pages is None:
            cfg = dataclasses.replace(cfg, num_pages=max(need, cdiv(self.max_model_len, page)))
        if self._engine is None or self._engine.storage.num_pages < cfg.num_pages:
            self._engine = None
            self._engine = LLMEngine(self.model, self.scheme, cfg, self.tokenizer)
        return self._engine

    def generate_reference(self, prompts: str | list[str], sampling_params: SamplingParams | None = None,
                           chat: bool = False) -> list[RequestOutput]:
        """The one-sequence-at-a-time path over the plain cache (the behavioural reference)."""
        params = sampling_params or SamplingParams()
        prompts, encoded = self._encode_all(prompts, params, chat)
        outputs = []
        for prompt, ids in zip(prompts, encoded):
            t0 = time.perf_counter()
            completion = generate_reference(self.model, self.scheme, ids, params, self.tokenizer)
            outputs.append(RequestOutput(prompt, ids, [completion], time.perf_counter() - t0))
        return outputs

    def _check_length(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the model's "
                f"context of {self.max_model_len} tokens"
            )


@torch.no_grad()
def generate_reference(model, scheme, prompt_ids: list[int], params: SamplingParams, tokenizer=None,
                       eos_token_id: int | None = None) -> CompletionOutput:
    """One sequence over the plain cache: prefill the prompt in one forward, then one token per
    forward. `tokenizer` (optional) gives the EOS id, the text and the stop strings."""
    device = model.model.embed_tokens.weight.device
    cache = model.new_cache(scheme.kv_bits, scheme.kv_group_size)
    gen = make_generator(params, device)
    counts = new_counts(params, model.config.vocab_size, device)
    if counts is not None:
        mark_prompt(counts, prompt_ids)
    stop_ids = set(params.stop_token_ids)
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if not params.ignore_eos and eos is not None:
        stop_ids.add(eos)
    tokens, logprobs, tops = [], [], []
    step_ids = torch.tensor(prompt_ids, device=device)
    pos = 0
    prompt_lps = None

    def finish(reason: str) -> CompletionOutput:
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
        for s in params.stop:
            if s in text:
                text = text[: text.index(s)]
        return CompletionOutput(text, tokens, reason, logprobs if params.logprobs else None,
                                tops if params.top_logprobs else None, prompt_lps)

    while True:
        positions = torch.arange(pos, pos + step_ids.numel(), device=device)
        hidden = model(step_ids, positions, cache)
        if pos == 0 and params.prompt_logprobs is not None:
            rows = torch.log_softmax(model.compute_logits(hidden[:-1]), dim=-1)
            v, i = rows.topk(params.prompt_logprobs, dim=-1)
            lps = rows.gather(1, step_ids[1:, None])[:, 0]
            prompt_lps = [None] + [(lp, tuple(zip(ii, vv))) for lp, ii, vv in zip(lps.tolist(), i.tolist(), v.tolist())]
        logits = model.compute_logits(hidden[-1:])[0]
        token, lp = sample(logits, params, gen, counts)
        pos += step_ids.numel()
        if token in stop_ids:
            return finish("stop")
        tokens.append(token)
        logprobs.append(lp)
        if params.top_logprobs:
            v, i = torch.log_softmax(logits, dim=-1).topk(params.top_logprobs)
            tops.append(tuple(zip(i.tolist(), v.tolist())))
        if params.stop and tokenizer is not None:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if any(s in text for s in params.stop):
                return finish("stop")
        if len(tokens) >= params.max_tokens:
            return finish("length")
        step_ids = torch.tensor([token], device=device)
