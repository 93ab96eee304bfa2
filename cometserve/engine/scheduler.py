"""Scheduler: continuous batching over the paged KV cache under a per-step token budget.

Each `schedule()` builds one step, in this order:

1. Running requests, decodes first (one token each), then a running request whose prompt is
   still being prefilled, each in arrival order. A request that needs a block when none is free
   makes room by preemption by recompute: the most recently arrived running request not yet
   scheduled in this step (possibly the needy request itself) loses all its blocks, goes back to
   the FRONT of the waiting queue with its outputs kept, and later prefills prompt + outputs again.
   Preempting the newest protects the oldest, so the oldest always progresses: no livelock.
2. Waiting requests in FIFO order (strict head of line: if the head's chunk does not fit, nobody
   behind it is admitted), each getting `min(remaining tokens, remaining budget)`; a long prompt is
   split across steps (chunked prefill). A step that preempted admits nobody: the pages just
   freed are needed by the requests already running. With prefix caching (kv_manager), an admitted
   request first takes the cached blocks of its longest cached prefix of whole blocks (always
   leaving one token to compute, whose logits it needs) and computes from there; `update()`
   registers every block a finished step filled.

Together these keep an ordering invariant that `check_invariants` asserts: every running request
arrived before every waiting one, the waiting queue is sorted by arrival, and at most one running
request (the newest) is mid-prefill.

`schedule()` and `update()` alternate. The scheduler advances `num_computed_tokens` when it schedules
a chunk (the K/V is written by that step), and `update()` appends the sampled tokens. Async
scheduling (the engine's) inserts one step: `hold()` marks the step just scheduled as in flight, each
request it samples counting one token not known yet (`Request.num_inflight`), and the next
`schedule()` may run before that step's `update()`: its decodes carry `PLACEHOLDER`, which the runner
fills on the device. The engine looks ahead only when `can_schedule_ahead()` (no preemption can
happen: a request with a token in flight is never preempted). Pure Python, deterministic: no torch,
no clocks, no randomness.
"""

from __future__ import annotations

from collections import deque

from cometserve.engine.interfaces import PLACEHOLDER, ScheduledChunk, SchedulerOutput, StepOutput
from cometserve.engine.kv_manager import KVBlockManager, block_keys
from cometserve.engine.request import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING


class RequestRejected(ValueError):
    """A request that can never be served (too long for the model or for the whole KV cache)."""


class Scheduler:
    """Owns the waiting and running queues and the KV block manager's allocation decisions."""

    def __init__(
        self, kv: KVBlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler.{name} must be a positive integer, got {value!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival
        self.requests: dict[str, Request] = {}  # live (waiting or running) requests only
        self._next_arrival = 0
        self._finished_ids: list[str] = []  # since the last schedule(), reported to the runner
        self._pending: SchedulerOutput | None = None  # scheduled, not yet updated
        self._held: SchedulerOutput | None = None  # scheduled, in flight (hold()), not yet updated
        # the Request of each chunk of those steps: an id aborted while its step is in flight may
        # already name a new request when that step is updated
        self._pending_reqs: tuple[Request, ...] = ()
        self._held_reqs: tuple[Request, ...] = ()
        self.prefix_queried_tokens = 0  # prompt (+ recomputed) tokens of admitted requests
        self.prefix_hit_tokens = 0  # of which found in the prefix cache

    # ---- admission and removal -----------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request, or mark it REJECTED and raise RequestRejected if it can never fit."""
        if request.status is not RequestStatus.WAITING or request.num_output_tokens:
            raise ValueError(f"request {request.request_id} is not new (status {request.status.name})")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id} is already in use")
        reason = self._never_fits(request)
        if reason is not None:
            request.error = f"request {request.request_id} rejected: {reason}"
            request.transition(RequestStatus.REJECTED)
            raise RequestRejected(request.error)
        request.arrival = self._next_arrival
        self._next_arrival += 1
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def _never_fits(self, request: Request) -> str | None:
        """Why the request can never run to max_tokens, or None if it can.

        The longest the request's K/V gets is prompt + max_tokens - 1 tokens (the last sample is
        never fed back), and preemption guarantees a request that fits the whole cache alone
        eventually runs, so those two bounds are the whole admission test.
        """
        prompt, max_tokens = request.num_prompt_tokens, request.sampling_params.max_tokens
        if prompt == 0:
            return "the prompt is empty"
        if prompt + max_tokens > self.max_model_len:
            return (
                f"prompt of {prompt} tokens + max_tokens {max_tokens} exceeds the model's context "
                f"of {self.max_model_len} tokens"
            )
        need = self.kv.blocks_for(prompt + max_tokens - 1)
        if need > self.kv.num_blocks:
            return (
                f"prompt of {prompt} tokens + max_tokens {max_tokens} needs {need} KV blocks of "
                f"{self.kv.block_size} tokens but the whole cache has {self.kv.num_blocks}"
            )
        return None

    def abort(self, request_id: str) -> bool:
        """End a live request and free its blocks; False if it is unknown or already finished."""
        if request_id not in self.requests:
            return False
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        return True

    def finish_request(self, request_id: str, status: RequestStatus) -> Request:
        """End a live request with a terminal `status` (the engine's stop strings use STOPPED)."""
        if not status.is_finished or status is RequestStatus.REJECTED:
            raise ValueError(f"finish_request needs a FINISHED_* status, got {status.name}")
        request = self.requests[request_id]
        if self._end(request, status):
            self.running.remove(request)
        return request

    def _end(self, request: Request, status: RequestStatus) -> bool:
        """Everything of finishing but the removal from `running`; whether it was running (the
        caller removes it: update() finishing many at once filters the list in one pass)."""
        was_running = request.status is _RUNNING
        request.transition(status)  # raises before any queue is touched if illegal
        if was_running:
            self.kv.free(request.request_id)
        else:
            self.waiting.remove(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
        return was_running

    # ---- queries -------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's chunks (see the module docstring for the policy)."""
        if self._pending is not None:
            raise RuntimeError("schedule() called twice without update(): every step must be updated")
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        budget = self._schedule_running(self.max_num_batched_tokens, chunks, preempted)
        if not preempted:
            budget = self._schedule_waiting(budget, chunks)
        output = SchedulerOutput(
            chunks=tuple(chunks),
            preempted_ids=tuple(preempted),
            finished_ids=tuple(self._finished_ids),
            num_batched_tokens=self.max_num_batched_tokens - budget,
        )
        self._finished_ids.clear()
        self._pending = output
        requests = self.requests
        self._pending_reqs = tuple(requests[c.request_id] for c in output.chunks)
        return output

    def _schedule_running(self, budget: int, chunks: list[ScheduledChunk], preempted: list[str]) -> int:
        """Decodes, then mid-prefill continuations; preempt the newest when blocks run out."""
        # `running` is sorted by arrival, so a stable split gives the (not decoding, arrival) order
        decoding, others = [], []
        for r in self.running:
            (decoding if r.is_decoding else others).append(r)
        for request in decoding:
            if budget == 0:
                return 0
            if request.status is not _RUNNING:  # preempted earlier in this loop
                continue
            if request.num_inflight and (request.num_output_tokens + request.num_inflight
                                         >= request.sampling_params.max_tokens):
                continue  # its last token is in flight: it ends at that step's update()
            if self._allocate_or_preempt(request, 1, chunks, preempted):
                chunks.append(self._decode_chunk(request))
                budget -= 1
        for request in others:
            if budget == 0:
                break
            if request.status is not _RUNNING:
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, num_new, chunks, preempted):
                chunks.append(self._make_chunk(request, num_new))
                budget -= num_new
        return budget

    def _allocate_or_preempt(
        self, request: Request, num_new: int, chunks: list[ScheduledChunk], preempted: list[str]
    ) -> bool:
        """Take blocks for `num_new` tokens, preempting newest-first; False if `request` itself went.
        `chunks`: this step's so far, whose requests are not preemptable."""
        while self.kv.allocate(request.request_id, num_new) is None:
            # the newest not yet scheduled: `running` is sorted by arrival
            scheduled = {c.request_id for c in chunks}
            victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the K/V, keep the tokens, go first in line."""
        if request.num_inflight:
            raise RuntimeError(f"preempting {request.request_id} with a token in flight: check can_schedule_ahead()")
        self.kv.free(request.request_id)
        self.running.remove(request)
        request.transition(RequestStatus.PREEMPTED)
        request.num_computed_tokens = 0
        request.num_cached_blocks = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _schedule_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        """Admit waiting requests FIFO while budget, sequence slots and blocks last; the budget left."""
        kv = self.kv
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            whole = request.sampling_params.whole_prompt  # the runner must see every prompt token
            cached = self._cached_blocks(request) if kv.enable_prefix_caching and not whole else []
            start = len(cached) * kv.block_size
            num_new = min(request.num_tokens - start, budget)
            if (kv.allocate_prefix(request.request_id, cached, num_new) if cached
                    else kv.allocate(request.request_id, num_new)) is None:
                break  # head of line waits for pages; admitting a later request would break FIFO
            request.num_computed_tokens, request.num_cached_blocks = start, len(cached)
            if request.num_cached_prompt_tokens is None:
                request.num_cached_prompt_tokens = start
            self.prefix_queried_tokens += request.num_tokens
            self.prefix_hit_tokens += start
            self.waiting.popleft()
            request.transition(_RUNNING)
            self.running.append(request)  # arrived after every running request: order kept
            chunks.append(self._make_chunk(request, num_new))
            budget -= num_new
        return budget

    def _keys(self, request: Request, n: int) -> list[bytes]:
        """The content keys of the request's first n blocks (all of whose tokens are known)."""
        keys, bs = request.block_keys, self.kv.block_size
        if len(keys) < n:
            keys += block_keys(request.token_slice(len(keys) * bs, n * bs), bs, keys[-1] if keys else b"")
        return keys

    def _cached_blocks(self, request: Request) -> list[int]:
        """Cached blocks of the request's longest cached prefix, short of its last token."""
        return self.kv.cached_prefix(self._keys(request, (request.num_tokens - 1) // self.kv.block_size))

    def _register(self, chunks, reqs) -> None:
        """Cache the blocks a finished step's chunks filled (their K/V is written now)."""
        bs, requests = self.kv.block_size, self.requests
        for c, r in zip(chunks, reqs):
            full = (c.start_pos + len(c.token_ids)) // bs
            if full > r.num_cached_blocks and r.status is _RUNNING and requests.get(r.request_id) is r:
                keys = self._keys(r, full)
                for i in range(r.num_cached_blocks, full):
                    self.kv.register(r.request_id, i, keys[i])
                r.num_cached_blocks = full

    def _make_chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        """Describe tokens [computed, computed + num_new) and mark them computed."""
        rid, start = request.request_id, request.num_computed_tokens
        end = start + num_new
        sample = end == request.num_tokens
        chunk = ScheduledChunk(
            request_id=rid,
            token_ids=tuple(request.token_slice(start, end)),
            start_pos=start,
            block_table=self.kv.table_tuple(rid),
            slot_mapping=tuple(self.kv.slots(rid, start, end)),
            is_prefill=not request.is_decoding,
            needs_sample=sample,
            sampling_params=request.sampling_params,
            suppress_ids=request.suppressed_ids(end) if sample and request.sampling_params.min_tokens else (),
        )
        request.num_computed_tokens = end
        return chunk

    def _decode_chunk(self, request: Request) -> ScheduledChunk:
        """`_make_chunk(request, 1)` for a decoding request (its one uncomputed token is its newest
        output), without the general path's lists: a decode step makes one per running request."""
        rid, pos = request.request_id, request.num_computed_tokens
        table, bs = self.kv.table_tuple(rid), self.kv.block_size
        request.num_computed_tokens = pos + 1
        token = PLACEHOLDER if request.num_inflight else request.output_token_ids[-1]
        params = request.sampling_params
        return ScheduledChunk(rid, (token,), pos, table, (table[pos // bs] * bs + pos % bs,),
                              False, True, params, request.suppressed_ids(pos + 1) if params.min_tokens else ())

    @property
    def in_flight(self) -> bool:
        """A step is held (scheduled, launched, not yet updated): async scheduling."""
        return self._held is not None

    def hold(self) -> None:
        """The step just scheduled is in flight: its samples count as tokens (num_inflight) until its
        update(), and the next schedule() may come first (async scheduling; module docstring)."""
        if self._pending is None or self._held is not None:
            raise RuntimeError("hold() needs a scheduled step and no other step in flight")
        self._held, self._pending = self._pending, None
        self._held_reqs = self._pending_reqs
        for c, r in zip(self._held.chunks, self._held_reqs):
            if c.needs_sample and r.status is _RUNNING:
                r.num_inflight += 1

    def can_schedule_ahead(self) -> bool:
        """Whether schedule() can run now without preempting: every running request's next chunk
        (one decode token, or the rest of its prompt within the step's budget) fits the free blocks."""
        kv, budget, need = self.kv, self.max_num_batched_tokens, 0
        for r in self.running:
            if budget <= 0:
                break
            n = 1 if r.is_decoding else min(r.num_tokens - r.num_computed_tokens, budget)
            need += kv.num_new_blocks(r.request_id, n)
            budget -= n
        return need <= kv.num_free_blocks

    def update(self, step_output: StepOutput) -> list[Request]:
        """Fold the step's samples into requests; returns the requests this step finished.

        A request aborted between schedule() and update() is skipped. A missing sample for a
        chunk that needed one, or a sample nobody asked for, is a runner bug and raises before
        any request is changed.
        """
        held = self._held is not None  # the oldest step not yet updated: in flight, else the pending one
        step = self._held if held else self._pending
        if step is None:
            raise RuntimeError("update() without a preceding schedule()")
        sampled = step_output.sampled
        expected = [c.request_id for c in step.chunks if c.needs_sample]
        unexpected = sampled.keys() - set(expected)
        if unexpected:
            raise ValueError(f"runner sampled for requests that needed no sample: {sorted(unexpected)}")
        # aborted since schedule(): skip, by object (its id may name a new request by now)
        requests, reqs = self.requests, self._held_reqs if held else self._pending_reqs
        live = [r for c, r in zip(step.chunks, reqs)
                if c.needs_sample and r.status is _RUNNING and requests.get(r.request_id) is r]
        missing = [r.request_id for r in live if r.request_id not in sampled]
        if missing:
            raise ValueError(f"runner returned no sample for requests {missing}")
        if self.kv.enable_prefix_caching:  # before any of them finishes and frees its blocks
            self._register(step.chunks, reqs)
        for r in reqs if step_output.prompt else ():  # prompt log-probabilities, from chunks that sample or not
            entries = step_output.prompt.get(r.request_id)
            if entries and r.prompt_logprobs is not None and requests.get(r.request_id) is r:
                n = len(r.prompt_logprobs)
                for pos, lp, top in entries:
                    if pos < n:  # a recompute's chunk runs over earlier outputs too
                        r.prompt_logprobs[pos] = (lp, top)
        if held:
            self._held = None
        else:
            self._pending = None
        finished = []
        for request in live:
            token_id, logprob = sampled[request.request_id]
            if held:
                request.num_inflight -= 1
            status = self._append_sample(request, token_id, logprob, step_output.top.get(request.request_id, ()))
            if status is not None:
                self._end(request, status)
                finished.append(request)
        if finished:  # one pass, not a list.remove per request: a whole batch may end together
            self.running[:] = [r for r in self.running if r.status is _RUNNING]
        return finished

    def _append_sample(self, request: Request, token_id: int, logprob: float,
                       top: tuple[tuple[int, float], ...] = ()) -> RequestStatus | None:
        """Record the sample; the finishing status if it ends the request (stop before length)."""
        if request.is_stop_token(token_id):
            request.stop_token_id = token_id
            return RequestStatus.FINISHED_STOPPED
        request.append_output(token_id, logprob, top)
        if request.num_output_tokens >= request.sampling_params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- checks --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise RuntimeError if queues, statuses, block tables or the ordering invariant disagree."""
        self.kv.check_invariants()
        waiting_ids = [r.request_id for r in self.waiting]
        running_ids = [r.request_id for r in self.running]
        if set(waiting_ids) & set(running_ids) or set(waiting_ids) | set(running_ids) != set(self.requests):
            raise RuntimeError("waiting and running queues do not partition the live requests")
        if len(self.running) > self.max_num_seqs:
            raise RuntimeError(f"{len(self.running)} running requests > max_num_seqs {self.max_num_seqs}")
        arrivals = [r.arrival for r in self.running] + [r.arrival for r in self.waiting]
        if arrivals != sorted(arrivals):
            raise RuntimeError(f"arrival order broken: running + waiting arrivals are {arrivals}")
        for r in self.waiting:
            if r.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                raise RuntimeError(f"{r!r} is in the waiting queue")
            if r.request_id in self.kv or r.num_computed_tokens:
                raise RuntimeError(f"waiting {r!r} holds KV blocks or computed tokens")
        mid_prefill = [r for r in self.running if r.num_computed_tokens < r.num_tokens - 1]
        if len(mid_prefill) > 1 or (mid_prefill and mid_prefill[0] is not self.running[-1]):
            raise RuntimeError(f"more than the newest running request is mid-prefill: {mid_prefill}")
        for r in self.running:
            if r.status is not _RUNNING or self.kv.num_tokens(r.request_id) != r.num_computed_tokens:
                raise RuntimeError(f"{r!r} holds {self.kv.num_tokens(r.request_id)} token slots")
