"""Request: one generation's tokens and lifecycle, the unit the scheduler moves between queues.

The status is a small state machine with its legal transitions written down in one table, so a
scheduler bug (finishing a request twice, resuming a finished one) fails loudly at the transition
instead of silently corrupting a batch:

```
WAITING ──► RUNNING ──► FINISHED_STOPPED | FINISHED_LENGTH
   │  ▲        │  ▲
   │  │        ▼  │
   │  └── PREEMPTED (blocks freed; recomputed from token 0 on resume)
   ▼
REJECTED (can never fit)        WAITING | RUNNING | PREEMPTED ──► FINISHED_ABORTED
```

Pure Python: the scheduler and KV manager run and are tested without torch.
"""

from __future__ import annotations

import enum

from cometserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    REJECTED = "rejected"

    @property
    def is_finished(self) -> bool:
        """Terminal: the request holds no blocks and will never be scheduled again."""
        return self._value_ in _TERMINAL_VALUES  # a str lookup: Enum.__hash__ runs Python code


_TERMINAL = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.REJECTED,
    }
)

_LEGAL: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.WAITING: frozenset(
        {RequestStatus.RUNNING, RequestStatus.REJECTED, RequestStatus.FINISHED_ABORTED}
    ),
    RequestStatus.RUNNING: frozenset(
        {
            RequestStatus.PREEMPTED,
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        }
    ),
    RequestStatus.PREEMPTED: frozenset({RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED}),
}

_TERMINAL_VALUES = frozenset(s.value for s in _TERMINAL)

# OpenAI's finish_reason strings, matching CompletionOutput in engine/llm.py
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.REJECTED: "rejected",
}


class IllegalTransition(RuntimeError):
    """A status change the state machine does not allow: always a bug in the caller."""


class Request:
    """Prompt, sampled outputs and scheduling state of one generation.

    `num_computed_tokens` counts the leading tokens of `all_token_ids` whose K/V is in the cache
    (or is written by the step in flight: the scheduler advances it when it schedules a chunk).
    A decoding request has exactly one token not yet computed, its newest output. Preemption
    resets it to 0 and keeps the outputs, so the resumed request prefills prompt + outputs.

    A sampled stop token (a stop_token_id or EOS) ends the request and is recorded in
    `stop_token_id`, not appended to `output_token_ids`: the completion excludes it, as in the
    one-sequence reference engine (engine/llm.py).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | tuple[int, ...] | None = None,
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if any(not isinstance(t, int) or t < 0 for t in prompt_token_ids):
            raise ValueError(f"request {request_id}: prompt token ids must be non-negative integers")
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        # EOS: the tokenizer's, and any more a model's generation_config names (Llama 3's <|eot_id|>)
        self.eos_token_ids: tuple[int, ...] = (
            () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        self.arrival = -1  # stamped by Scheduler.add: the FIFO order, unique and increasing
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[tuple[tuple[int, float], ...]] = []  # () where not asked for
        # SamplingParams.prompt_logprobs: per prompt position, (logprob, alternatives); None at 0
        self.prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]] | None] | None = (
            None if sampling_params.prompt_logprobs is None else [None] * len(self.prompt_token_ids))
        self.num_computed_tokens = 0
        self.num_inflight = 0  # sampled by a step still on the device, not yet in output_token_ids (0 or 1)
        self.num_preemptions = 0
        # prefix caching (kv_manager): content keys of its full blocks so far, and how many leading
        # blocks of its table are cached (attached at admission or registered once written)
        self.block_keys: list[bytes] = []
        self.num_cached_blocks = 0
        self.num_cached_prompt_tokens: int | None = None  # found cached at its first admission
        self.stop_token_id: int | None = None
        self.error: str | None = None  # why the request was rejected
        self._status = RequestStatus.WAITING

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self._status.name}, arrival={self.arrival}, "
            f"prompt={self.num_prompt_tokens}, outputs={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens})"
        )

    @property
    def status(self) -> RequestStatus:
        return self._status

    def transition(self, new: RequestStatus) -> None:
        """Move to `new`, or raise IllegalTransition if the state machine forbids it."""
        if new not in _LEGAL.get(self._status, frozenset()):
            raise IllegalTransition(
                f"request {self.request_id}: illegal status transition {self._status.name} -> {new.name}"
            )
        self._status = new

    @property
    def is_finished(self) -> bool:
        return self._status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason once terminal ("stop", "length", "abort", "rejected"), else None."""
        return _FINISH_REASON.get(self._status)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens so far: prompt + outputs sampled, counting one still on the device (async scheduling)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight

    @property
    def all_token_ids(self) -> list[int]:
        """A new list, prompt + outputs: what a recompute after preemption prefills."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_decoding(self) -> bool:
        """Past its prefill: every known token computed but the newest sampled one."""
        num_outputs = len(self.output_token_ids) + self.num_inflight  # inlined: the scheduler asks every step
        return num_outputs > 0 and self.num_computed_tokens == len(self.prompt_token_ids) + num_outputs - 1

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode reads one token)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"request {self.request_id}: token slice [{start}, {end}) of {self.num_tokens}")
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def append_output(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...] = ()) -> None:
        """Record one sampled token; only a running request samples."""
        if self._status is not RequestStatus.RUNNING:
            raise IllegalTransition(
                f"request {self.request_id}: cannot append a token while {self._status.name}"
            )
        self.output_token_ids.append(token_id)
        self.output_logprobs.append(logprob)
        self.output_top_logprobs.append(top)

    def suppressed_ids(self, end: int) -> tuple[int, ...]:
        """The stop tokens masked from the sample after tokens [0, end): every token that would stop
        the request while that sample would be output number < min_tokens, else none."""
        if end - len(self.prompt_token_ids) >= self.sampling_params.min_tokens:
            return ()
        return self.stop_ids

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every token that ends the request: its stop_token_ids, and EOS unless it ignores EOS."""
        params = self.sampling_params
        return params.stop_token_ids + (() if params.ignore_eos else self.eos_token_ids)

    def is_stop_token(self, token_id: int) -> bool:
        """A stop_token_id always stops; EOS stops unless the request asked to ignore it."""
        params = self.sampling_params
        if token_id in params.stop_token_ids:
            return True
        return not params.ignore_eos and token_id in self.eos_token_ids
