"""LLM: the offline Python API. `LLM(path).generate(prompts, SamplingParams(...))`.

`generate` runs every prompt through the batched engine (engine.py: continuous batching over the
paged KV cache). `generate_reference` keeps the first engine, one sequence at a time over the plain
per-sequence cache: the behavioural reference the batched engine is tested against."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cometserve.engine.detokenizer import completion_text
from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.kv_manager import cdiv
from cometserve.engine.request import Request
from cometserve.engine.sampler import make_generator, mark_prompt, new_counts, sample
from cometserve.model.loader import load_model
from cometserve.sampling_params import SamplingParams
from cometserve.structured.grammar import GrammarCompiler, constraint, unpack


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


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_config(path: Path) -> dict:
    """The model directory's generation_config.json ({} without one); a file that is not a JSON
    object is an error naming it."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        doc = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{f} must hold a JSON object")  # noqa: TRY004 - a bad file, not a bad argument
    return doc


def generation_defaults(path: Path, tokenizer) -> tuple[tuple[int, ...], dict]:
    """(EOS ids, default sampling) as vLLM reads a model's generation config: EOS is the tokenizer's
    and those the config adds (Llama 3 Instruct ends its turns with <|eot_id|>, which older tokenizer
    files do not call EOS); the sampling values it recommends are the server's defaults (vLLM's
    `--generation-config auto`)."""
    generation = generation_config(path)
    extra = generation.get("eos_token_id")
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    eos = tuple(dict.fromkeys(t for t in [getattr(tokenizer, "eos_token_id", None), *extra] if isinstance(t, int)))
    return eos, {k: generation[k] for k in SAMPLING_DEFAULT_KEYS if k in generation}


class LLM:
    """A loaded model (16-bit directory, GGUF file or cometserve checkpoint) with its tokenizer."""

    def __init__(self, model: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
                 engine_config: EngineConfig | None = None) -> None:
        from transformers import AutoTokenizer

        self.loaded = load_model(model, device=device, dtype=dtype)
        self.model = self.loaded.model
        self.scheme = self.loaded.scheme
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.loaded.path))
        self.eos_token_ids, self.default_sampling = generation_defaults(self.loaded.path, self.tokenizer)
        self.device = self.model.model.embed_tokens.weight.device
        self.max_model_len = self.model.config.max_model_len
        self.engine_config = engine_config
        self._engine: LLMEngine | None = None
        self._batches = 0

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the model's recommended sampling (generation_config.json), else
        SamplingParams()'s (greedy, not vLLM's temperature 1)."""
        return SamplingParams(**self.default_sampling)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return self.encode_chat([{"role": "user", "content": prompt}]) if chat else self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """A conversation ([{"role": ..., "content": ...}, ...]) through the model's chat template
        (with `tools`, OpenAI-style function definitions, where the template renders them)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; generate without chat")
        text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_all(self, prompts, sampling_params, chat: bool) -> tuple[list[str], list[list[int]], list[SamplingParams]]:
        """-> (prompt texts, token ids, one SamplingParams per prompt). A prompt is a string or, as vLLM's
        TokensPrompt, {"prompt_token_ids": [...]} (used as given: no chat template)."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        texts, encoded = [], []
        for p in prompts:
            if isinstance(p, dict):
                if set(p) != {"prompt_token_ids"}:
                    raise ValueError(f"a dict prompt takes exactly 'prompt_token_ids', got keys {sorted(p)}")
                ids = list(p["prompt_token_ids"])
                if not all(isinstance(t, int) and 0 <= t < self.model.config.vocab_size for t in ids):
                    raise ValueError(f"prompt_token_ids must be token ids in [0, {self.model.config.vocab_size})")
                texts.append(self.tokenizer.decode(ids))
                encoded.append(ids)
            elif isinstance(p, str):
                texts.append(p)
                encoded.append(self.encode(p, chat))
            else:
                raise TypeError(f"a prompt is a str or {{'prompt_token_ids': [...]}}, got {type(p).__name__}")
        return texts, encoded, self._params_per_prompt(sampling_params, len(encoded), encoded)

    def _params_per_prompt(self, sampling_params, n: int, encoded: list[list[int]]) -> list[SamplingParams]:
        """One SamplingParams for all prompts (default SamplingParams()) or a list of one per prompt."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * n
        else:
            params = list(sampling_params)
            if len(params) != n:
                raise ValueError(f"{len(params)} SamplingParams for {n} prompts: give one, or one per prompt")
        for ids, p in zip(encoded, params):
            self._check_length(ids, p)
        return params

    def generate(
        self,
        prompts: str | dict | list[str | dict],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        chat: bool = False,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """All prompts at once through the batched engine; outputs in prompt order. `chat` applies the
        chat template to each string prompt as one user message; `sampling_params` is one for all or
        a list of one per prompt."""
        texts, encoded, params = self._encode_all(prompts, sampling_params, chat)
        return self._run(texts, encoded, params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[RequestOutput]:
        """Conversations through the chat template, as vLLM's LLM.chat: `messages` is one conversation
        ([{"role": "user", "content": "..."}, ...]) or a list of them; one output per conversation.
        `tools` go to the template; constrain the answer to a call with `structured_outputs`."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not convs or not all(isinstance(c, list) and c and all(isinstance(m, dict) for m in c) for c in convs):
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists")
        encoded = [self.encode_chat(c, add_generation_prompt, tools) for c in convs]
        params = self._params_per_prompt(sampling_params, len(encoded), encoded)
        return self._run([self.tokenizer.decode(ids) for ids in encoded], encoded, params, use_tqdm)

    def _run(self, texts: list[str], encoded: list[list[int]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        """Every prompt's n completions through the engine: one request each (completion i with
        params.choice(i)); outputs in prompt order, each with its n completions."""
        self._batches += 1
        jobs = [[(f"generate-{self._batches}-{k}-{i}", p.choice(i)) for i in range(p.n)] for k, p in enumerate(params)]
        engine = self.engine([t for t, job in zip(encoded, jobs) for _ in job], [p for job in jobs for _, p in job])
        t0 = time.perf_counter()
        requests: dict = {}
        try:
            for toks, job in zip(encoded, jobs):
                for rid, p in job:
                    requests[rid] = engine.add_request(rid, toks, p)
        except Exception:  # a request refused (a bad grammar, a token outside the vocabulary): none run
            for rid in requests:
                engine.abort(rid)
            for _ in engine.stream():
                pass
            raise
        seconds: dict[str, float] = {}
        reasons: dict[str, str] = {}
        with tqdm(total=len(requests), desc="generating", disable=not use_tqdm) as bar:
            for delta in engine.stream():
                if delta.finished:
                    seconds[delta.request_id] = time.perf_counter() - t0
                    reasons[delta.request_id] = delta.finish_reason
                    bar.update(1)
        outputs = []
        for text, toks, job in zip(texts, encoded, jobs):
            completions = []
            for rid, p in job:
                req = requests[rid]
                lps = list(req.output_logprobs) if p.logprobs else None
                tops = list(req.output_top_logprobs) if p.top_logprobs else None
                completions.append(CompletionOutput(engine.completion_text(req), list(req.output_token_ids),
                                                    reasons.get(rid, req.finish_reason), lps, tops, req.prompt_logprobs))
            outputs.append(RequestOutput(text, toks, completions, max(seconds.get(rid, 0.0) for rid, _ in job)))
        return outputs

    def engine(self, encoded: list[list[int]] | None = None, params: list[SamplingParams] | None = None) -> LLMEngine:
        """The batched engine. On CUDA one engine sized from free memory is kept; on CPU the cache is
        sized (and the engine rebuilt) to hold this batch's requests whole (one SamplingParams each)."""
        if self.device.type == "cuda":
            if self._engine is None:
                self._engine = LLMEngine(self.model, self.scheme, self.engine_config, self.tokenizer, self.eos_token_ids)
                self._engine.warm_up()
            return self._engine
        cfg = self.engine_config or EngineConfig(max_num_seqs=64, use_cuda_graphs=False)
        page = cfg.page_size or (self.scheme.kv_group_size if self.scheme.kv_bits == 4 else 64)
        need = sum(cdiv(len(t) + p.max_tokens, page) for t, p in zip(encoded or [[0]], params)) if params else 1
        if cfg.num_pages is None:
            cfg = dataclasses.replace(cfg, num_pages=max(need, cdiv(self.max_model_len, page)))
        if self._engine is None or self._engine.storage.num_pages < cfg.num_pages:
            self._engine = None
            self._engine = LLMEngine(self.model, self.scheme, cfg, self.tokenizer, self.eos_token_ids)
        return self._engine

    def generate_reference(self, prompts: str | list[str], sampling_params: SamplingParams | None = None,
                           chat: bool = False) -> list[RequestOutput]:
        """The one-sequence-at-a-time path over the plain cache (the behavioural reference)."""
        texts, encoded, params = self._encode_all(prompts, sampling_params, chat)
        outputs = []
        for text, ids, p in zip(texts, encoded, params):
            t0 = time.perf_counter()
            completions = [generate_reference(self.model, self.scheme, ids, p.choice(i), self.tokenizer,
                                              self.eos_token_ids)
                           for i in range(p.n)]
            outputs.append(RequestOutput(text, ids, completions, time.perf_counter() - t0))
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
                       eos_token_id: int | tuple[int, ...] | None = None) -> CompletionOutput:
    """One sequence over the plain cache: prefill the prompt in one forward, then one token per
    forward. `tokenizer` (optional) gives the EOS id, the text and the stop strings."""
    device = model.model.embed_tokens.weight.device
    cache = model.new_cache(scheme.kv_bits, scheme.kv_group_size)
    gen = make_generator(params, device)
    counts = new_counts(params, model.config.vocab_size, device)
    if counts is not None:
        mark_prompt(counts, prompt_ids)
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    stop_ids = Request("reference", [0], params, eos).stop_ids
    grammar = constraint(params, GrammarCompiler(tokenizer, model.config.vocab_size), stop_ids)
    tokens, logprobs, tops = [], [], []
    step_ids = torch.tensor(prompt_ids, device=device)
    pos = 0
    prompt_lps = None

    def finish(reason: str) -> CompletionOutput:
        text = completion_text(tokenizer, tokens, params)[0] if tokenizer is not None else ""
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
        allowed = None if grammar is None else torch.from_numpy(unpack(grammar.allowed(), logits.numel())).to(device)
        token, lp = sample(logits, params, gen, counts, stop_ids if len(tokens) < params.min_tokens else None,
                           allowed)
        pos += step_ids.numel()
        if token in stop_ids:
            return finish("stop")
        tokens.append(token)
        logprobs.append(lp)
        if params.top_logprobs:
            v, i = torch.log_softmax(logits, dim=-1).topk(params.top_logprobs)
            tops.append(tuple(zip(i.tolist(), v.tolist())))
        stops = params.stop and tokenizer is not None and len(tokens) >= params.min_tokens
        if stops and completion_text(tokenizer, tokens, params)[1]:
            return finish("stop")
        if grammar is not None:
            grammar.accept(token)
        if len(tokens) >= params.max_tokens:
            return finish("length")
        if grammar is not None and grammar.is_terminated:  # nothing may follow: as if it sampled EOS
            return finish("stop")
        step_ids = torch.tensor([token], device=device)
