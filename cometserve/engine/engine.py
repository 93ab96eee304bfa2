"""LLMEngine: requests in, per-step deltas out. Scheduler -> runner -> scheduler.update -> stop strings.

```
engine = LLMEngine(model, scheme, EngineConfig(...), tokenizer=tok)
engine.add_request("a", prompt_ids, SamplingParams(max_tokens=32))
while engine.has_unfinished():
    for delta in engine.step():        # RequestDelta: new token ids, text delta, finish reason
        ...
```

`stream()` runs steps until every request is done and yields the deltas: the server issue wraps
it. Async scheduling (on by default for a single-GPU CUDA engine): while a step runs on the device,
the next one is scheduled and launched, so the host's scheduling, metadata and output handling
hide behind the GPU (Scheduler.hold, ModelRunner.launch / collect). A request that stops on a token
was then scheduled for one more step, whose sample is dropped; outputs are those of the synchronous
engine. Stop tokens, EOS and max_tokens are the scheduler's (`Scheduler.update`); stop strings are
checked here, on detokenized text, and end the request through `Scheduler.finish_request` with the
completion text cut before the stop string (the one-sequence reference engine's semantics).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cometserve.engine.detokenizer import IncrementalDetokenizer, completion_text
from cometserve.engine.kv_manager import KVBlockManager
from cometserve.engine.kv_storage import KVStorage
from cometserve.engine.request import Request, RequestStatus
from cometserve.engine.runner import ModelRunner
from cometserve.engine.scheduler import Scheduler
from cometserve.model.layers.linear import tune_gemms
from cometserve.model.layers.lm_head import LM_HEADS, use_lm_head
from cometserve.sampling_params import SamplingParams, find_stop
from cometserve.structured.grammar import FixedMask, GrammarCompiler, GrammarMatcher, constraint


@dataclass(frozen=True)
class EngineConfig:
    """Batching and cache sizing. `num_pages` None sizes the cache from `memory_fraction` of the
    free GPU memory (after the weights); it is required on CPU."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's
    num_pages: int | None = None
    page_size: int | None = None  # None: the KV group size (INT4) or 64 (16-bit)
    memory_fraction: float = 0.9
    use_cuda_graphs: bool = True
    max_graph_batch: int | None = None  # decode CUDA graphs up to this batch; None: max_num_seqs
    # other steps (prefill, mixed) up to this many tokens replay graphs of all but attention (0: never)
    max_piecewise_tokens: int = 2048
    async_scheduling: bool | None = None  # None: where the runner allows it, on CUDA
    enable_prefix_caching: bool = True  # reuse the cached K/V of a prompt's leading full pages
    lm_head: str = "16bit"  # "int8": the weight-only INT8 LM head (model/layers/lm_head.py), made at start

    def __post_init__(self) -> None:
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.memory_fraction must be in (0, 1], got {self.memory_fraction}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.max_piecewise_tokens < 0:
            raise ValueError(f"EngineConfig.max_piecewise_tokens must be >= 0, got {self.max_piecewise_tokens}")
        if self.lm_head not in LM_HEADS:
            raise ValueError(f"EngineConfig.lm_head must be one of {LM_HEADS}, got {self.lm_head!r}")


@dataclass
class RequestDelta:
    """What one step added to one request. `finish_reason` is set on its last delta only."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str = ""
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # on the final delta: prompt tokens read from the prefix cache
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None  # per new token, where asked for
    # SamplingParams.prompt_logprobs, on the request's first delta: per prompt position (None at 0)
    prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Tracked:
    request: Request
    detok: IncrementalDetokenizer | None  # None without a tokenizer
    num_sent: int = 0  # output tokens already reported
    text: str = ""  # detokenized output, cut at a stop string once one is found
    text_sent: int = 0
    stop_hit: bool = False
    prompt_sent: bool = False  # its prompt_logprobs went out
    grammar: GrammarMatcher | FixedMask | None = None  # structured outputs / allowed_token_ids


def _reserve_bytes(model, cfg: EngineConfig) -> int:
    """Working memory kept out of the KV cache: a prefill step's activations (eager, and in the
    piecewise graphs' own pool) and the logits."""
    c = model.config
    per_token = (4 * c.intermediate_size + 8 * c.hidden_size) * 4
    tokens = cfg.max_num_batched_tokens + (_piecewise_tokens(cfg) if cfg.use_cuda_graphs else 0)
    return tokens * per_token + cfg.max_num_seqs * c.vocab_size * 4 * 4 + (1 << 30)


def _piecewise_tokens(cfg: EngineConfig) -> int:
    return min(cfg.max_piecewise_tokens, cfg.max_num_batched_tokens)


class LLMEngine:
    def __init__(self, model, scheme, config: EngineConfig | None = None, tokenizer=None,
                 eos_token_id: int | tuple[int, ...] | None = None) -> None:
        self.model, self.scheme = model, scheme
        self.config = cfg = config or EngineConfig()
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        use_lm_head(model, cfg.lm_head)  # before the KV cache takes the memory it frees
        max_len = min(cfg.max_model_len or model.config.max_model_len, model.config.max_model_len)
        self.max_model_len = max_len
        self.storage = KVStorage.create(
            model, scheme.kv_bits, scheme.kv_group_size, cfg.max_num_seqs, cfg.num_pages, cfg.page_size,
            cfg.memory_fraction, _reserve_bytes(model, cfg),
        )
        if next(model.parameters()).is_cuda:  # every GEMM shape tuned now, not in a served step
            tune_gemms(model, cfg.max_num_batched_tokens)
        kv = KVBlockManager(self.storage.num_pages, self.storage.page_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, max_len)
        self.runner = ModelRunner(model, self.storage, max_len, cfg.use_cuda_graphs,
                                  cfg.max_graph_batch or cfg.max_num_seqs, _piecewise_tokens(cfg))
        self._tracked: dict[str, _Tracked] = {}
        self._aborted: list[str] = []
        self._flight = None  # ModelRunner.launch() of the step the scheduler holds (async scheduling)
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size)  # structured outputs
        self._num_structured = 0  # live requests with a grammar
        self.num_steps = 0

    def warm_up(self) -> None:
        """Run the step shapes serving meets (a full prefill chunk, a prefill continuing over its
        cached prefix beside a fresh one, decodes; on CUDA also decodes of 1, 2 and 4 sequences and
        one prefill per GEMM tuning bucket, with a row count that is and one that is not a multiple
        of 16, the two integer specializations Triton compiles), so that kernel compilation and
        tuning happen here and not in a user's step (measured on the H100: 1.9 s and, for a
        600-1000-row step, 1.2 s stalls), and on CUDA a mixed step.
        Ordinary requests and steps (a tensor-parallel driver steps its workers as usual); leaves
        the engine empty."""
        vocab, page = self.model.config.vocab_size, self.storage.page_size
        fits = min(self.max_model_len - 4, self.storage.num_pages * page // 2)
        long = min(self.config.max_num_batched_tokens + 64, fits)
        g = torch.Generator().manual_seed(0)
        rounds = [((long, 16), 4)]  # (prompt lengths, max_tokens)
        if self.runner.device.type == "cuda":
            # decodes of 1, 2 and 4 sequences: the GEMM's buckets below 16 rows, tuned here also when
            # the decode graphs (whose capture tunes them) are off
            rounds += [((16,) * k, 3) for k in (1, 2, 4) if k <= self.config.max_num_seqs]
            cap, b = min(self.config.max_num_batched_tokens, fits), 32
            while b // 2 < cap:  # rows b/2+1 .. b share a bucket (kernels/gemm_w4ax._m_bucket)
                rounds += [((n,), 1) for n in (min(b, cap) - 1, min(b, cap) - 16) if n > b // 2]
                b *= 2

        def add(rid: str, n: int, max_tokens: int) -> None:
            self.add_request(rid, torch.randint(0, vocab, (n,), generator=g).tolist(),
                             SamplingParams(max_tokens=max_tokens, ignore_eos=True))

        for i, (lengths, max_tokens) in enumerate(rounds):
            for j, n in enumerate(lengths):
                add(f"__warm_up_{i}_{j}", n, max_tokens)
            while self.has_unfinished():
                self.step()
        if self.runner.device.type == "cuda":
            # mixed steps (a decode beside a prompt's first chunk, then beside its continuation): their
            # attention runs the decode kernel eagerly, and a continuation beside a decode builds a
            # variant of the INT4 gather no round above compiles (measured, H200: the first such step
            # of a served run took 279 ms, 240 of them compiling it; later ones 39 ms)
            add("__warm_up_mixed_0", 16, 4)
            self.step()
            add("__warm_up_mixed_1", long, 1)
            while self.has_unfinished():
                self.step()

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; raises RequestRejected (a ValueError) if it can never fit."""
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id} is already in use")
        if params.n != 1:
            raise ValueError(f"a request is one completion, got n={params.n}: add params.choice(i) for each")
        vocab = self.model.config.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            raise ValueError(f"logit_bias names token {params.logit_bias[-1][0]}, outside the vocabulary [0, {vocab})")
        request = Request(request_id, list(prompt_token_ids), params, self.eos_token_id)
        grammar = constraint(params, self.grammars, request.stop_ids)
        if params.min_tokens and params.allowed_token_ids and set(params.allowed_token_ids) <= set(request.stop_ids):
            raise ValueError("allowed_token_ids holds only stop tokens, which min_tokens forbids: nothing could "
                             "be sampled")
        self.scheduler.add(request)
        detok = (IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if self.tokenizer is not None
                 else None)
        self._tracked[request_id] = _Tracked(request, detok, grammar=grammar)
        self._num_structured += grammar is not None
        return request

    def abort(self, request_id: str) -> bool:
        """End a live request; its final delta (finish_reason "abort") comes with the next step."""
        if not self.scheduler.abort(request_id):
            return False
        self.runner.release([request_id])
        self._aborted.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self.scheduler.in_flight

    @property
    def async_scheduling(self) -> bool:
        """Whether step() overlaps the next step's host work with this one's device work."""
        runner = self.runner  # a tensor-parallel driver's runner steps its workers synchronously
        want = self.config.async_scheduling
        return getattr(runner, "async_ok", False) and (runner.device.type == "cuda" if want is None else want)

    # ---- stepping ------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """One scheduler step; a delta for every request that got a token or finished. With async
        scheduling, the step whose samples this returns was launched by the previous call (or now),
        and the next one is launched before waiting for them."""
        deltas = [self._final_delta(rid, "abort") for rid in self._aborted]
        self._aborted.clear()
        sched, runner = self.scheduler, self.runner
        if not sched.in_flight:
            out = self._constrained(sched.schedule())
            if not self.async_scheduling:
                return self._updated(runner.execute(out), deltas)
            self._flight = runner.launch(out)
            sched.hold()
        ahead = sched.has_unfinished() and sched.can_schedule_ahead()
        if ahead:  # its structured requests' samples wait for their masks, which the step in flight decides
            out = sched.schedule()
            deferred = self._structured_ids(out)
            nxt = runner.launch(out, deferred)
        deltas += self.sync()
        if ahead:
            if deferred:
                nxt = runner.finish(nxt, self._masks(deferred))
            self._flight = nxt
            sched.hold()
        return deltas

    def sync(self) -> list[RequestDelta]:
        """Collect and fold the step in flight (async scheduling) without launching another: the
        scheduler is then between steps, as after a synchronous step(). Its deltas."""
        if not self.scheduler.in_flight:
            return []
        flight, self._flight = self._flight, None
        return self._updated(self.runner.collect(flight), [])

    def _structured_ids(self, out) -> frozenset[str]:
        """The step's requests that sample under a grammar."""
        if not self._num_structured:
            return frozenset()
        return frozenset(c.request_id for c in out.chunks if c.needs_sample and c.request_id in self._tracked
                         and self._tracked[c.request_id].grammar is not None)

    def _masks(self, request_ids) -> dict:
        """Their grammars' allowed tokens now; none for a request that ended (its sample is dropped)."""
        tracked = (self._tracked.get(rid) for rid in request_ids)
        return {t.request.request_id: t.grammar.allowed() for t in tracked
                if t is not None and not t.request.is_finished}

    def _constrained(self, out):
        """The step with its structured requests' allowed tokens, for the runner's sampler."""
        out.allowed_tokens.update(self._masks(self._structured_ids(out)))
        return out

    def _updated(self, step_out, deltas: list[RequestDelta]) -> list[RequestDelta]:
        """Fold a step's samples into the requests; their deltas appended to `deltas`."""
        finished = self.scheduler.update(step_out)
        self.runner.release([r.request_id for r in finished])
        self.num_steps += 1
        tracked = [t for t in map(self._tracked.get, step_out.sampled) if t is not None]
        if self._num_structured:
            self._follow_grammars([t for t in tracked if t.grammar is not None])
        deltas += [self._delta(t) for t in tracked]
        return deltas

    def _follow_grammars(self, tracked: list[_Tracked]) -> None:
        """Advance each grammar over its request's new token (one per step), compute the masks of the
        states reached (in parallel: GrammarCompiler.prefetch), and end each request whose text the
        grammar lets nothing follow, as if it had sampled EOS."""
        for t in tracked:
            if t.request.num_output_tokens > t.num_sent:
                t.grammar.accept(t.request.output_token_ids[-1])
        self.grammars.prefetch([t.grammar for t in tracked if not t.request.is_finished])
        for t in tracked:
            r = t.request
            if not r.is_finished and t.grammar.is_terminated:
                self.scheduler.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED)
                self.runner.release([r.request_id])

    def stream(self) -> Iterator[RequestDelta]:
        """Step until no request is left, yielding every delta as it comes."""
        while self.has_unfinished():
            yield from self.step()

    # ---- outputs -------------------------------------------------------------------------

    def _delta(self, t: _Tracked) -> RequestDelta:
        r = t.request
        params = r.sampling_params
        if t.detok is not None and not t.stop_hit:
            before = len(t.text)
            t.detok.update(r.output_token_ids, final=r.is_finished)
            t.text = t.detok.text
            if params.stop and r.num_output_tokens >= params.min_tokens:
                self._check_stop_strings(t, before)
        new = r.output_token_ids[t.num_sent:]  # a new list: the delta owns it
        lps = r.output_logprobs[t.num_sent:] if params.logprobs else None
        tops = r.output_top_logprobs[t.num_sent:] if params.top_logprobs else None
        t.num_sent = r.num_output_tokens
        reason = None
        if r.is_finished:
            reason = "stop" if t.stop_hit else r.finish_reason
        text_delta = self._text_delta(t, final=reason is not None)
        if reason is not None:
            self._forget(r.request_id)
        cached = (r.num_cached_prompt_tokens or 0) if reason is not None else 0
        plps = None
        if r.prompt_logprobs is not None and not t.prompt_sent:
            plps, t.prompt_sent = list(r.prompt_logprobs), True
        return RequestDelta(r.request_id, new, text_delta, lps, reason, cached, tops, plps)

    def _check_stop_strings(self, t: _Tracked, checked: int) -> None:
        """Finish the request (status STOPPED) once its text contains a stop string; cut the text there
        (before it, or after it with include_stop_str_in_output).
        t.text[:checked] held none, so a new hit ends after `checked`: only the tail is searched."""
        r = t.request
        i = find_stop(t.text, r.sampling_params, checked)
        if i >= 0:
            t.text = t.text[:i]
            t.stop_hit = True
            if not r.is_finished:
                self.scheduler.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED)
                self.runner.release([r.request_id])

    def _text_delta(self, t: _Tracked, final: bool) -> str:
        """Text added since the last delta (no tokenizer: ""). Held back while it may still be the
        start of a stop string or ends in an incomplete character."""
        if t.detok is None:
            return ""
        r = t.request
        end = len(t.text)
        if not final:
            if t.text.endswith("\ufffd"):
                end -= 1
            for s in r.sampling_params.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if t.text.endswith(s[:k], 0, end):  # no copy of the text
                        end -= k
                        break
        end = max(end, t.text_sent)
        delta = t.text[t.text_sent:end]
        t.text_sent = end
        return delta

    def _forget(self, rid: str) -> _Tracked | None:
        t = self._tracked.pop(rid, None)
        self._num_structured -= t is not None and t.grammar is not None
        return t

    def _final_delta(self, rid: str, reason: str) -> RequestDelta:
        t = self._forget(rid)
        params = t.request.sampling_params if t else None
        return RequestDelta(rid, [], "", [] if params and params.logprobs else None, reason,
                            top_logprobs=[] if params and params.top_logprobs else None)

    def completion_text(self, request: Request) -> str:
        """The whole completion text of a finished request, cut before the first stop string."""
        if self.tokenizer is None:
            return ""
        return completion_text(self.tokenizer, request.output_token_ids, request.sampling_params)[0]
