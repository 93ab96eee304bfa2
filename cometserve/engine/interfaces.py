"""The stage boundary of one engine step: SchedulerOutput -> runner -> StepOutput.

The scheduler decides *which* tokens run and *where* their K/V goes; the runner turns that into
tensors, runs the model and samples; the scheduler then folds the samples back into requests.
Everything crossing the boundary is in these frozen dataclasses, so the runner needs no access to
Request objects or the block manager, and a step can be logged, replayed or faked in a test.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields

from cometserve.sampling_params import SamplingParams

PLACEHOLDER = -1  # a decode chunk's token while the step that sampled it is still on the device (async scheduling)


@dataclass(frozen=True, init=False)
class ScheduledChunk:
    """Tokens [start_pos, start_pos + len(token_ids)) of one request, run in this step.

    - `block_table`: the request's whole table after this step's allocation; attention for these
      tokens reads positions [0, end_pos) through it.
    - `slot_mapping[i]`: flat cache slot (block_id * block_size + offset) where token i's K/V is
      written.
    - `is_prefill`: False only for a decode, the single newest sampled token of a request whose
      earlier tokens are all in the cache. Chunks of a prompt, and of a preempted request's
      recompute (prompt + earlier outputs), are prefill even when one token long.
    - `needs_sample`: the chunk reaches the end of the request's known tokens, so the logits of its
      last position give the next token and the runner must return one sample for this request.
      A non-final chunk of a chunked prefill samples nothing.
    - `sampling_params`: the request's, so the runner can sample (and seed) without a lookup.
    - `suppress_ids`: token ids the sample must not pick (its stop tokens before min_tokens).
    - A decode's token is `PLACEHOLDER` when the previous step, still running, sampled it: the runner
      takes it from that step's sampled tokens on the device.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    slot_mapping: tuple[int, ...]
    is_prefill: bool
    needs_sample: bool
    sampling_params: SamplingParams
    suppress_ids: tuple[int, ...]

    def __init__(
        self,
        request_id: str,
        token_ids: tuple[int, ...],
        start_pos: int,
        block_table: tuple[int, ...],
        slot_mapping: tuple[int, ...],
        is_prefill: bool,
        needs_sample: bool,
        sampling_params: SamplingParams,
        suppress_ids: tuple[int, ...] = (),
    ) -> None:
        # One __dict__ update instead of the generated frozen __init__'s object.__setattr__ per field:
        # a decode step builds one chunk per running sequence, and that was half of its scheduling
        # cost. Still frozen afterwards (assignment raises); the fields are checked below.
        self.__dict__.update({
            "request_id": request_id, "token_ids": token_ids, "start_pos": start_pos,
            "block_table": block_table, "slot_mapping": slot_mapping, "is_prefill": is_prefill,
            "needs_sample": needs_sample, "sampling_params": sampling_params, "suppress_ids": suppress_ids,
        })
        if not token_ids:
            raise ValueError(f"chunk of {request_id} has no tokens")
        if len(slot_mapping) != len(token_ids):
            raise ValueError(f"chunk of {request_id}: {len(slot_mapping)} slots for {len(token_ids)} tokens")
        if start_pos < 0:
            raise ValueError(f"chunk of {request_id}: negative start_pos {start_pos}")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """Context length after this chunk: the sequence length attention sees for its last token."""
        return self.start_pos + len(self.token_ids)


if [f.name for f in fields(ScheduledChunk)] != list(inspect.signature(ScheduledChunk.__init__).parameters)[1:]:
    raise TypeError("ScheduledChunk.__init__ must take exactly the dataclass fields, in order")


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's work. Decodes come first in `chunks`, then prefill chunks, each group in arrival order.

    - `preempted_ids`: requests preempted in this step. Their K/V is gone (blocks already reused
      possibly); they will come back as prefill chunks from position 0. Keep per-request sampler
      state (seeded generators): they are not finished.
    - `finished_ids`: requests that ended (stop, length, abort) since the previous step; drop any
      per-request state kept for them. May name requests the runner never saw.
    - `allowed_tokens`: request id -> the only tokens its sample may pick, as packed bits of bool
      [vocab] (np.packbits; structured outputs: filled by the engine after scheduling, as the grammar
      is the engine's).
    """

    chunks: tuple[ScheduledChunk, ...]
    preempted_ids: tuple[str, ...]
    finished_ids: tuple[str, ...]
    num_batched_tokens: int
    allowed_tokens: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        total = sum(len(c.token_ids) for c in self.chunks)
        if total != self.num_batched_tokens:
            raise ValueError(f"num_batched_tokens {self.num_batched_tokens} but chunks hold {total}")
        ids = [c.request_id for c in self.chunks]
        if len(set(ids)) != len(ids):
            raise ValueError("a request appears in two chunks of one step")

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_decodes(self) -> int:
        return sum(1 for c in self.chunks if not c.is_prefill)


@dataclass(frozen=True)
class StepOutput:
    """What the runner sampled: request_id -> (token_id, logprob of that token), one entry for
    exactly the chunks of the step that had `needs_sample`; `top`: request_id -> its
    SamplingParams.top_logprobs most likely (token_id, logprob), for the requests that ask."""

    sampled: dict[str, tuple[int, float]]
    top: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    # request_id -> [(position, logprob of the token there, alternatives)] for SamplingParams.prompt_logprobs
    prompt: dict[str, list[tuple[int, float, tuple[tuple[int, float], ...]]]] = field(default_factory=dict)
