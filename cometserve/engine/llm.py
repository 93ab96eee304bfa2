"""LLM: the offline Python API. `LLM(path).generate(prompts, SamplingParams(...))`.

This first engine runs one sequence at a time over the plain KV cache; it is the behavioural
reference that the batched, paged engine must reproduce."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cometserve.engine.sampler import make_generator, sample
from cometserve.model.loader import load_model
from cometserve.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    seconds: float = 0.0


class LLM:
    """A loaded model (16-bit directory, GGUF file or cometserve checkpoint) with its tokenizer."""

    def __init__(self, model: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> None:
        from transformers import AutoTokenizer

        self.loaded = load_model(model, device=device, dtype=dtype)
        self.model = self.loaded.model
        self.scheme = self.loaded.scheme
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.loaded.path))
        self.device = self.model.model.embed_tokens.weight.device
        self.max_model_len = self.model.config.max_model_len

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model has no chat template; generate without chat")
            msgs = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def generate(
        self,
        prompts: str | list[str],
        sampling_params: SamplingParams | None = None,
        chat: bool = False,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        params = sampling_params or SamplingParams()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self.encode(p, chat) for p in prompts]
        for p, ids in zip(prompts, encoded):
            self._check_length(ids, params)
        outputs = []
        for prompt, ids in tqdm(list(zip(prompts, encoded)), desc="generating", disable=not use_tqdm):
            t0 = time.perf_counter()
            completion = self._generate_one(ids, params)
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
    def _generate_one(self, prompt_ids: list[int], params: SamplingParams) -> CompletionOutput:
        scheme = self.scheme
        cache = self.model.new_cache(scheme.kv_bits, scheme.kv_group_size)
        gen = make_generator(params, self.device)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer.eos_token_id is not None:
            stop_ids.add(self.tokenizer.eos_token_id)
        tokens, logprobs = [], []
        step_ids = torch.tensor(prompt_ids, device=self.device)
        pos = 0
        while True:
            positions = torch.arange(pos, pos + step_ids.numel(), device=self.device)
            hidden = self.model(step_ids, positions, cache)
            token, lp = sample(self.model.compute_logits(hidden[-1:])[0], params, gen)
            pos += step_ids.numel()
            if token in stop_ids:
                return self._finish(tokens, logprobs, "stop", params)
            tokens.append(token)
            logprobs.append(lp)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(s in text for s in params.stop):
                return self._finish(tokens, logprobs, "stop", params)
            if len(tokens) >= params.max_tokens:
                return self._finish(tokens, logprobs, "length", params)
            step_ids = torch.tensor([token], device=self.device)

    def _finish(self, tokens: list[int], logprobs: list[float], reason: str, params: SamplingParams) -> CompletionOutput:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text = text[: text.index(s)]
        return CompletionOutput(text, tokens, reason, logprobs if params.logprobs else None)
