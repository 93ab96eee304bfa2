"""AsyncEngine: the synchronous LLMEngine behind an asyncio front, for the HTTP server.

```
engine = AsyncEngine.from_checkpoint("ckpt", EngineConfig(max_num_seqs=64), max_queue=256)
engine.start()                                    # inside the running event loop
stream = await engine.add([prompt_ids], [SamplingParams(max_tokens=16)])
async for index, delta in stream:                 # RequestDelta of sub-request `index`
    ...
```

One background thread owns the LLMEngine: it drains a command queue (add, abort, stop) between
steps and runs `engine.step()` while any request is unfinished, sleeping on the queue otherwise.
Nothing else touches the engine, so the engine needs no locks. Each step's deltas go back to the
event loop in one `call_soon_threadsafe`, where they are routed to per-request asyncio queues.

One API request (n choices, several prompts) is one `RequestStream` of sub-requests. Admission is
bounded: `add` raises EngineOverloaded when more than `max_queue` sub-requests would be waiting,
and EngineShutdown once shutdown has begun. Closing a stream early (a client that went away)
aborts its unfinished sub-requests, which frees their KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from cometserve.engine.engine import EngineConfig, LLMEngine, RequestDelta
from cometserve.engine.scheduler import RequestRejected
from cometserve.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["AsyncEngine", "EngineDead", "EngineOverloaded", "EngineShutdown", "EngineStats",
           "RequestRejected", "RequestStream"]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


class EngineShutdown(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class EngineDead(RuntimeError):
    """The engine thread failed; every live request ends with this error (HTTP 500/503)."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int  # in the scheduler's queue, plus adds the engine thread has not taken yet
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    num_prompt_tokens: int  # totals since start
    num_generated_tokens: int
    num_finished: dict[str, int]  # by finish reason
    num_rejected_overload: int
    prefix_queried_tokens: int = 0  # prompt tokens of admitted requests (prefix caching)
    prefix_hit_tokens: int = 0  # of which read from the prefix cache


class RequestStream:
    """The deltas of one API request's sub-requests, as `(index, RequestDelta)`, until all finish."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._live = set(request_ids)

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while self._live:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._live.clear()
                raise item
            if item.finished:
                self._live.discard(item.request_id)
            yield self._index[item.request_id], item

    @property
    def finished(self) -> bool:
        return not self._live

    def abort(self) -> None:
        """Abort every unfinished sub-request (idempotent; a no-op once all have finished)."""
        if self._live:
            self._engine._abort(list(self._live))
            self._live.clear()


class AsyncEngine:
    """Owns an LLMEngine and the thread that steps it. Create it anywhere; `start()` in the loop."""

    def __init__(self, engine: LLMEngine, max_queue: int = 256) -> None:
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer, got {max_queue!r}")
        t0 = time.perf_counter()
        if engine.runner.device.type == "cuda":
            engine.warm_up()  # kernel compilation and tuning before the first request, not in it
            if engine.tokenizer is not None:  # the vocabulary's index and json_object's grammar (~2 s)
                engine.grammars.grammar(StructuredOutputsParams(json_object=True))
        self.warm_up_s = time.perf_counter() - t0
        self.engine = engine
        self.max_queue = max_queue
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model.config.vocab_size
        # the model's recommended sampling for fields a request leaves unset (generation_config.json)
        self.sampling_defaults: dict = {}
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # live sub-request id -> stream (event loop only)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._num_adding = 0  # sub-requests handed to the thread, not yet in its scheduler
        self._adding_lock = threading.Lock()
        self._closing = False
        self._error: BaseException | None = None
        self._prompt_tokens = self._generated_tokens = self._overloaded = 0
        self._finished: dict[str, int] = {}

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, config: EngineConfig, device: str | None = None,
                        max_queue: int = 256) -> AsyncEngine:
        """A model directory, GGUF or cometserve checkpoint with its tokenizer (engine/llm.py's LLM).
        On CPU without `config.num_pages` the cache holds one full context."""
        from cometserve.engine.llm import LLM

        llm = LLM(path, device=device, engine_config=config)
        if llm.device.type != "cuda":
            llm.engine_config = dataclasses.replace(config, use_cuda_graphs=False)
        engine = cls(llm.engine(), max_queue)
        engine.sampling_defaults = llm.default_sampling
        return engine

    @classmethod
    def from_random_weights(cls, name: str, mode: str, config: EngineConfig, device: str | None = None,
                            max_queue: int = 256) -> AsyncEngine:
        """A model of real shape with random weights (engine/random_model.py) and no tokenizer:
        prompts must be token ids, completions carry no text. For serving benchmarks."""
        from cometserve.engine.random_model import build_random_model

        loaded = build_random_model(name, mode, device=device)
        if loaded.model.model.embed_tokens.weight.device.type != "cuda":
            config = dataclasses.replace(config, use_cuda_graphs=False)
        return cls(LLMEngine(loaded.model, loaded.scheme, config), max_queue)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from inside the event loop that will consume the streams."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="cometserve-engine", daemon=True)
        self._thread.start()

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on (safe to call from a signal handler)."""
        self._closing = True

    async def shutdown(self) -> None:
        """Refuse new requests, abort the live ones, stop and join the engine thread."""
        self._closing = True
        for stream in set(self._streams.values()):
            stream.abort()
            stream._queue.put_nowait(EngineShutdown("the request was aborted: the server shut down"))
        self._streams.clear()
        if self._thread is not None:
            self._commands.put(("stop", None))
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def error(self) -> BaseException | None:
        """Why the engine thread died, or None while it is healthy."""
        return self._error

    # ---- requests ---------------------------------------------------------------------------

    async def add(self, prompts: list[list[int]], params: list[SamplingParams]) -> RequestStream:
        """Queue one sub-request per (prompt, params) pair, all or none. Raises EngineOverloaded,
        EngineShutdown, EngineDead, or RequestRejected (a ValueError: it can never fit)."""
        if len(prompts) != len(params) or not prompts:
            raise ValueError("add() needs one SamplingParams per prompt, and at least one prompt")
        if len(prompts) > self.max_queue:
            raise RequestRejected(f"{len(prompts)} sequences in one request can never fit the waiting queue "
                                  f"of {self.max_queue}")
        if self._error is not None:
            raise EngineDead(f"the engine failed: {self._error!r}")
        if self._closing or self._thread is None:
            raise EngineShutdown("the server is shutting down and takes no new requests")
        waiting = self.engine.scheduler.num_waiting + self._num_adding  # a racy read is fine: a bound
        if waiting + len(prompts) > self.max_queue:
            self._overloaded += 1
            raise EngineOverloaded(
                f"server overloaded: {waiting} requests are waiting and the queue holds {self.max_queue}; "
                f"retry later"
            )
        specs = {p.structured_outputs for p in params if p.structured_outputs is not None}
        try:  # compiled here, off the engine's thread, which then finds them cached
            await asyncio.gather(*(asyncio.to_thread(self.engine.grammars.grammar, s) for s in specs))
        except ValueError as e:
            raise RequestRejected(f"the structured output cannot be compiled: {e}") from None
        base = f"req-{next(self._ids)}"
        stream = RequestStream(self, [f"{base}-{i}" for i in range(len(prompts))])
        for rid in stream.request_ids:
            self._streams[rid] = stream
        done: Future = Future()
        with self._adding_lock:  # the engine thread takes them off when it adds them (_apply)
            self._num_adding += len(prompts)
        self._commands.put(("add", (stream.request_ids, prompts, params, done)))
        try:
            await asyncio.wrap_future(done)
        except BaseException:  # rejected, or the caller was cancelled while the thread added them
            for rid in stream.request_ids:
                self._streams.pop(rid, None)
            self._abort(stream.request_ids)  # after the add in the command queue; a no-op if rejected
            raise
        self._prompt_tokens += sum(len(p) for p in prompts)
        return stream

    def _abort(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    def stats(self) -> EngineStats:
        sched = self.engine.scheduler
        kv = sched.kv
        return EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting + self._num_adding,
            kv_usage=kv.usage, num_free_blocks=kv.num_free_blocks, num_blocks=kv.num_blocks,
            num_prompt_tokens=self._prompt_tokens, num_generated_tokens=self._generated_tokens,
            num_finished=dict(self._finished), num_rejected_overload=self._overloaded,
            prefix_queried_tokens=sched.prefix_queried_tokens, prefix_hit_tokens=sched.prefix_hit_tokens,
        )

    # ---- event loop side --------------------------------------------------------------------

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        for d in deltas:
            self._generated_tokens += len(d.new_token_ids)
            stream = self._streams.get(d.request_id)
            if d.finished:
                self._finished[d.finish_reason] = self._finished.get(d.finish_reason, 0) + 1
                self._streams.pop(d.request_id, None)
            if stream is not None:
                stream._queue.put_nowait(d)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        failure = EngineDead(f"the engine failed: {error!r}")
        for stream in set(self._streams.values()):
            stream._queue.put_nowait(failure)
        self._streams.clear()

    # ---- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._apply(self._commands.get()):  # idle: sleep until a command comes
                    return
                while True:
                    while not self._commands.empty():
                        if not self._apply(self._commands.get_nowait()):
                            return
                    if not engine.has_unfinished():
                        break
                    deltas = engine.step()
                    if deltas:
                        self._loop.call_soon_threadsafe(self._dispatch, deltas)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request and /health
            self._loop.call_soon_threadsafe(self._fail, e)

    def _apply(self, command) -> bool:
        """Run one command on the engine; False for stop."""
        kind, arg = command
        if kind == "stop":
            for rid in list(self.engine.scheduler.requests):
                self.engine.abort(rid)
            return False
        if kind == "abort":
            for rid in arg:
                self.engine.abort(rid)
            return True
        request_ids, prompts, params, done = arg
        try:
            for i, (rid, ids, p) in enumerate(zip(request_ids, prompts, params)):
                try:
                    self.engine.add_request(rid, ids, p)
                except Exception:
                    for added in request_ids[:i]:
                        self.engine.abort(added)
                    raise
        except Exception as e:  # noqa: BLE001 - the caller gets it (RequestRejected and friends)
            done.set_exception(e)
        else:
            done.set_result(None)
        finally:  # in the scheduler (or rejected) now: never counted twice by add()'s bound
            with self._adding_lock:
                self._num_adding -= len(prompts)
        return True
