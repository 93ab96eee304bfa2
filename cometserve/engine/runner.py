"""ModelRunner: SchedulerOutput -> batch tensors + attention metadata (built once per step) -> model
forward over the paged cache -> logits at the sampled positions -> per-request samples (StepOutput).

The model takes flat `input_ids [T]` and `positions [T]` and a cache whose `layers[i].attend(q, k,
v, positions, scale)` writes the step's K/V and reads attention for layer i: a `StepCache` over one
`AttentionMetadata` (engine/attention.py, with the attention backends and their kernel choice). A
step whose every chunk is one token long runs decode attention; any longer chunk makes it a prefill
step.

Decode steps of up to `max_graph_batch` sequences replay a CUDA graph of the whole model forward
captured for the padded batch size (static buffers and the captured graphs live in `DecodeGraphs`,
engine/decode_graphs.py).

A step is `launch()` (everything up to the sampled tokens, on the device; their copy to the host
started) then `collect()` (wait, return the StepOutput); `execute()` does both. Between the two the
engine may launch the next step (async scheduling): its decodes that carry `PLACEHOLDER` get the
token this step sampled, from the device, and all device work runs in stream order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from cometserve.engine.attention import AttentionMetadata, Bf16Attention, Int4Attention, StepCache
from cometserve.engine.decode_graphs import DecodeGraphs
from cometserve.engine.interfaces import PLACEHOLDER, SchedulerOutput, StepOutput
from cometserve.engine.kv_storage import KVStorage
from cometserve.engine.piecewise import PiecewiseGraphs
from cometserve.engine.prompt_logprobs import PromptLogprobs
from cometserve.engine.sampler import greedy_logprobs, make_generator, mark_prompt, new_counts, sample_rows

_ALIGN = 32  # elements: each field packed by _to_device starts 128-byte aligned, as its own tensor would


def _to_device(dtype, device: torch.device, *fields) -> list[torch.Tensor]:
    """Fields (lists, or arrays of any shape) as `dtype` tensors on `device`, through one host buffer
    and one host-to-device copy: a decode step's metadata is several tiny arrays, each of which would
    otherwise pay a tensor construction and a copy. The results are views of one device buffer."""
    pieces = []  # [field 0, its padding, field 1, its padding, ...]
    for f in fields:
        n = len(f) if isinstance(f, list) else f.size
        pieces += (n, -n % _ALIGN)
    buf = np.empty(sum(pieces), dtype)
    o = 0
    for f, n, pad in zip(fields, pieces[::2], pieces[1::2]):
        buf[o : o + n] = f if isinstance(f, list) else f.reshape(-1)
        o += n + pad
    views = torch.from_numpy(buf).to(device, non_blocking=True).split(pieces)[::2]
    return [v if isinstance(f, list) or f.ndim == 1 else v.view(f.shape) for f, v in zip(fields, views)]


def _context_slots(chunks, page_size: int) -> np.ndarray:
    """int64 [sum(end_pos)]: the flat cache slot of every context position of every chunk, in order."""
    offsets = np.arange(page_size)
    return np.concatenate([
        (np.asarray(c.block_table, np.int64)[:, None] * page_size + offsets).reshape(-1)[: c.end_pos]
        for c in chunks
    ])


class HostBlockTables:
    """The host side of the block tables: row s holds the table of the request in sequence slot s,
    padded with the dummy page. A request's table changes once per page of tokens, so a decode step
    rewrites almost no row and gathers the batch's rows in one indexing op instead of padding and
    converting every table. A row is reused only while its last writer (request id, table) matches
    the chunk: correct whoever assigns or releases slots, and for tables that arrive as copies
    (a tensor-parallel worker's unpickled SchedulerOutput) at the cost of a tuple comparison."""

    def __init__(self, num_rows: int, width: int, pad: int) -> None:
        self.pad = pad
        self.rows = np.full((num_rows, max(width, 1)), pad, np.int32)
        self._written: list[tuple[str, tuple[int, ...]] | None] = [None] * num_rows

    def write(self, request_ids: list[str], slots: list[int], tables: list[tuple[int, ...]]) -> None:
        written = self._written
        for rid, slot, table in zip(request_ids, slots, tables):
            last = written[slot]
            if last is not None and last[0] == rid and (last[1] is table or last[1] == table):
                continue
            n = len(table)
            if n > self.rows.shape[1]:  # longer than max_model_len foresaw: widen, never truncate
                grown = np.full((self.rows.shape[0], n), self.pad, np.int32)
                grown[:, : self.rows.shape[1]] = self.rows
                self.rows = grown
            row = self.rows[slot]
            row[:n] = table
            row[n:] = self.pad
            written[slot] = (rid, table)

    def gather(self, slots: list[int], width: int) -> np.ndarray:
        """int32 [len(slots), width]: the rows of `slots`, cut to the batch's longest table."""
        return self.rows[slots, :width]


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # row of each sampled chunk's last token in [T]
    sample_ids: list[str]  # request ids, same order
    # prefill chunks whose request wants prompt_logprobs: PromptLogprobs.compute's chunk tuples
    prompt_chunks: list[tuple[str, int, int, tuple[int, ...], int, bool]] = field(default_factory=list)


@dataclass
class InFlight:
    """A launched step's samples on their way to the host (collect() waits for `done`)."""

    request_ids: list[str]
    tokens: torch.Tensor  # int64 [S] on the host (pinned on CUDA)
    logprobs: torch.Tensor  # float32 [S] on the host
    done: torch.cuda.Event | None
    top: tuple[list[int], list[int], torch.Tensor, torch.Tensor] | None = None  # _top_logprobs(), tensors on the host
    prompt: list[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # same


@dataclass
class PendingSample:
    """A launched step's samples before they leave the device: `deferred` rows still to be sampled
    (ModelRunner.finish), the others in `tokens` / `logprobs` (int64 / float32 [S])."""

    logits: torch.Tensor  # float32 [S, vocab]
    request_ids: list[str]
    deferred: list[int]
    params: dict
    suppress: dict
    tokens: torch.Tensor
    logprobs: torch.Tensor
    top: tuple | None
    prompt: list


class ModelRunner:
    """Runs one scheduled step of `model` over `storage`; keeps per-request sampler state."""

    async_ok = True  # launch() / collect() may be split by the next step's launch (LLMEngine)

    def __init__(self, model, storage: KVStorage, max_model_len: int, use_cuda_graphs: bool = False,
                 max_graph_batch: int = 256, max_piecewise_tokens: int = 0) -> None:
        self.model = model
        self.storage = storage
        self.max_model_len = max_model_len
        w = model.model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        cfg = model.config
        cls = Int4Attention if storage.kv_bits == 4 else Bf16Attention
        self.attn = cls(storage, cfg.num_heads, self.dtype, self.device)
        self.generators: dict[str, torch.Generator | None] = {}
        self.counts: dict[str, torch.Tensor | None] = {}  # per request: generated-token counts (penalties)
        self.prompt_logprobs = PromptLogprobs(model)
        self._prompt_out: list = []  # the last forward's PromptLogprobs.compute()
        self._last: tuple[dict[str, int], torch.Tensor] | None = None  # last launch: request -> row, tokens
        # tensor parallelism: replaces every rank's sampled tokens [S] in place with rank 0's (the ones
        # the scheduler gets), so that placeholders become the same tokens on every rank
        self.share_samples: Callable[[torch.Tensor], None] | None = None
        self.block_tables = HostBlockTables(storage.max_seqs + 1, -(-max_model_len // storage.page_size),
                                            storage.dummy_page)
        self.graphs: DecodeGraphs | None = None
        self.graphs_error: str | None = None
        if use_cuda_graphs and self.device.type == "cuda" and self.attn.graph_safe:
            self.graphs = DecodeGraphs(self, min(max_graph_batch, storage.max_seqs))
            if not self.graphs.ok:
                self.graphs_error, self.graphs = self.graphs.error, None
        self.pieces: PiecewiseGraphs | None = None
        self.pieces_error: str | None = None
        if use_cuda_graphs and self.device.type == "cuda" and max_piecewise_tokens > 0:
            self.pieces = PiecewiseGraphs(self, max_piecewise_tokens)
            if not self.pieces.ok:
                self.pieces_error, self.pieces = self.pieces.error, None

    # ---- metadata ------------------------------------------------------------------------

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Flatten the step's chunks into tensors; assign/release sequence window slots."""
        st = self.storage
        self.release(out.preempted_ids, keep_generators=True)  # a recompute rewrites the window
        self.release(out.finished_ids)
        chunks = out.chunks
        b, num_tokens = len(chunks), out.num_batched_tokens
        assign = st.slots.get_or_assign
        slots = [assign(c.request_id) for c in chunks]
        tables = [c.block_table for c in chunks]
        self.block_tables.write([c.request_id for c in chunks], slots, tables)
        starts = [c.start_pos for c in chunks]
        if num_tokens == b:  # one token per chunk (every decode step): no per-token work
            cu, ctxs, max_seqlen_q = list(range(b + 1)), [s + 1 for s in starts], 1
            ids, pos, slot_map = [c.token_ids[0] for c in chunks], starts, [c.slot_mapping[0] for c in chunks]
        else:
            lens = [len(c.token_ids) for c in chunks]
            cu, max_seqlen_q = [0, *itertools.accumulate(lens)], max(lens)
            ctxs = [s + n for s, n in zip(starts, lens)]
            ids = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64, num_tokens)
            pos = np.repeat(np.subtract(starts, cu[:-1]), lens) + np.arange(num_tokens)  # start + (t - cu)
            slot_map = np.fromiter(itertools.chain.from_iterable(c.slot_mapping for c in chunks), np.int64,
                                   num_tokens)
        dev = self.device
        block_tables = self.block_tables.gather(slots, max(map(len, tables)))
        # a mixed step's leading one-token chunks (the decodes: the scheduler puts them first)
        d = 0 if max_seqlen_q == 1 else next(i for i, n in enumerate(lens) if n != 1)
        cu_p = [x - d for x in cu[d:]] if d else []  # the other sequences' cu_seqlens_q, renumbered
        bt, cu_t, ctx_t, slots_t, *cu_p_t = _to_device(np.int32, dev, block_tables, cu, ctxs, slots,
                                                       *([cu_p] if d else []))
        held = [i for i, c in enumerate(chunks) if c.token_ids[0] == PLACEHOLDER]  # sampled by the last launch
        if held:
            if self._last is None:
                raise RuntimeError("a placeholder token but no launched step sampled it")
            rows, last = self._last
            ids_t, pos_t, slot_map_t, dst, src = _to_device(np.int64, dev, ids, pos, slot_map, [cu[i] for i in held],
                                                            [rows[chunks[i].request_id] for i in held])
            ids_t[dst] = last[src]
        else:
            ids_t, pos_t, slot_map_t = _to_device(np.int64, dev, ids, pos, slot_map)
        meta = AttentionMetadata(
            block_tables=bt, cu_seqlens_q=cu_t, context_lens=ctx_t, seq_slots=slots_t, slot_mapping=slot_map_t,
            max_seqlen_q=max_seqlen_q, max_context_len=max(ctxs), start_pos_host=starts, context_lens_host=ctxs,
            cu_seqlens_host=cu,
        )
        if d:
            meta.split(d, cu_p, cu_p_t[0])
        read = meta.prefills if d else meta  # what the prefill path reads: the prompt chunks, or the whole step
        if st.kv_bits == 16 and max_seqlen_q > 1 and any(read.start_pos_host):
            (read.kv_slots,) = _to_device(np.int64, dev, _context_slots(chunks[d:], st.page_size))
            (read.cu_seqlens_k,) = _to_device(np.int32, dev, [0, *itertools.accumulate(read.context_lens_host)])
        prompt = []  # one pass over the prefill chunks for the options that read the prompt
        for i, c in enumerate(chunks):
            p = c.sampling_params
            if not c.is_prefill or not p.whole_prompt:
                continue
            if p.repetition_penalty != 1.0:  # its prompt tokens (such requests prefill their whole prompt)
                mark_prompt(self._sampler_state(c.request_id, p)[1], c.token_ids)
            if p.prompt_logprobs is not None:
                prompt.append((c.request_id, cu[i], c.start_pos, c.token_ids, p.prompt_logprobs, c.needs_sample))
        sampled = [i for i, c in enumerate(chunks) if c.needs_sample]
        return StepInputs(ids_t, pos_t, meta, [cu[i + 1] - 1 for i in sampled], [chunks[i].request_id for i in sampled],
                          prompt)

    def release(self, request_ids, keep_generators: bool = False) -> None:
        """Drop per-request state: the window slot, and (finished requests) the seeded generator and
        the penalties' token counts.
        Idempotent: the engine releases at finish, the next SchedulerOutput names them again."""
        for rid in request_ids:
            self.storage.slots.release(rid)
            if not keep_generators:
                self.generators.pop(rid, None)
                self.counts.pop(rid, None)
                self.prompt_logprobs.release(rid)

    # ---- execution -----------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> StepOutput:
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, defer: frozenset[str] = frozenset()) -> InFlight | PendingSample | None:
        """Prepare, run and sample the step on the device and start copying the samples (and prompt
        log-probabilities) to the host; None when it has neither. Returns before the device is done.
        The sampled rows of the requests in `defer` wait for finish() (their structured-output masks
        need the tokens of the step still in flight): then a PendingSample is returned."""
        if out.is_empty:
            self._last = None
            self.release(out.preempted_ids, keep_generators=True)
            self.release(out.finished_ids)
            return None
        inputs = self.prepare(out)  # reads self._last for the placeholders
        self._last = None
        res = self.logits(inputs)
        prompt, self._prompt_out = self._prompt_out, []
        if res is None:
            none = torch.empty(0, dtype=torch.int64, device=self.device)
            return _to_host([], none, none.float(), None, prompt) if prompt else None
        params = {c.request_id: c.sampling_params for c in out.chunks if c.needs_sample}
        suppress = {c.request_id: c.suppress_ids for c in out.chunks if c.suppress_ids}
        tokens, logprobs = self.sample_device(*res, inputs.sample_ids, params, suppress, out.allowed_tokens, defer)
        top = _top_logprobs(res[0], inputs.sample_ids, params)
        rows = [i for i, rid in enumerate(inputs.sample_ids) if rid in defer]
        pending = PendingSample(res[0], inputs.sample_ids, rows, params, suppress, tokens, logprobs, top, prompt)
        return pending if rows else self._sent(pending)

    @torch.inference_mode()
    def finish(self, pending: PendingSample, allowed: dict) -> InFlight:
        """Sample a launched step's deferred rows (`allowed`: request id -> packed mask bits; a request
        without one, ended meanwhile, is sampled unconstrained and dropped) and start the copy."""
        masks = _device_masks(allowed, pending.logits.device, pending.logits.shape[1])
        tokens, lps = self._pick(pending.logits, pending.request_ids, pending.deferred, pending.params,
                                 pending.suppress, masks)
        idx = torch.tensor(pending.deferred, device=pending.tokens.device)
        pending.tokens = pending.tokens.index_copy(0, idx, tokens)
        pending.logprobs = pending.logprobs.index_copy(0, idx, lps)
        return self._sent(pending)

    def _sent(self, p: PendingSample) -> InFlight:
        """Share the samples (tensor parallel), keep them for the next step's placeholders, copy them out."""
        if self.share_samples is not None:
            self.share_samples(p.tokens)
        self._last = ({rid: i for i, rid in enumerate(p.request_ids)}, p.tokens)
        return _to_host(p.request_ids, p.tokens, p.logprobs, p.top, p.prompt)

    @staticmethod
    def collect(flight: InFlight | None) -> StepOutput:
        """Wait for a launched step's samples: {request_id: (token, logprob)}."""
        if flight is None:
            return StepOutput({})
        if flight.done is not None:
            flight.done.synchronize()
        top = {}
        if flight.top is not None:
            rows, ks, ids, lps = flight.top
            top = {flight.request_ids[r]: tuple(zip(i[:k], lp[:k]))
                   for r, k, i, lp in zip(rows, ks, ids.tolist(), lps.tolist())}
        prompt = {rid: [(first + j, lp, tuple(zip(i, v))) for j, (lp, i, v) in
                        enumerate(zip(lps.tolist(), ids.tolist(), vals.tolist()))]
                  for rid, first, lps, ids, vals in flight.prompt}
        return StepOutput(dict(zip(flight.request_ids, zip(flight.tokens.tolist(), flight.logprobs.tolist()))), top,
                          prompt)

    def logits(self, inputs: StepInputs) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None:
        """Run the step's forward: (float32 logits of the sampled rows, their greedy (tokens,
        logprobs) when a decode graph computed them, else None), or None when nothing is sampled."""
        if self.graphs is not None and inputs.meta.is_decode and not inputs.prompt_chunks:
            res = self.graphs.run(inputs)
            if res is not None:
                return (res[0], res[1:]) if inputs.sample_rows else None
        hidden = None if self.pieces is None else self.pieces.run(inputs.input_ids, inputs.positions, inputs.meta)
        if hidden is None:
            hidden = self.forward(inputs.input_ids, inputs.positions, inputs.meta)
        if inputs.prompt_chunks:  # taken by launch()
            self._prompt_out = self.prompt_logprobs.compute(hidden, inputs.prompt_chunks)
        if not inputs.sample_rows:
            return None
        rows = torch.tensor(inputs.sample_rows, device=self.device)
        return self.model.compute_logits(hidden[rows]), None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, StepCache(self.storage, meta, self.attn))

    def sample(self, logits: torch.Tensor, greedy_out: tuple[torch.Tensor, torch.Tensor] | None,
               request_ids: list[str], params: dict) -> dict[str, tuple[int, float]]:
        """`sample_device`, waited for: {request_id: (token, logprob)}."""
        return self.collect(_to_host(request_ids, *self.sample_device(logits, greedy_out, request_ids, params))).sampled

    def sample_device(self, logits: torch.Tensor, greedy_out: tuple[torch.Tensor, torch.Tensor] | None,
                      request_ids: list[str], params: dict, suppress: dict | None = None,
                      allowed: dict | None = None, defer: frozenset[str] = frozenset()
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits float32 [S, vocab] -> (tokens int64 [S], their logprobs float32 [S]) on the device,
        without waiting for it. Greedy rows in one batch (taken from `greedy_out` when the decode graph
        computed them), the others (sampled, or greedy with a bias, penalties or masks) in another,
        with their kept seeded generators and token counts (_pick); `suppress`: request id -> token ids
        its sample must not pick; `allowed`: request id -> packed bits (np.packbits) of bool [vocab], the only tokens it may.
        Rows of `defer` are left to finish() (their values here are placeholders)."""
        rows = [i for i, rid in enumerate(request_ids) if not params[rid].batched_greedy and rid not in defer]
        if len(rows) < len(request_ids):  # greedy rows: one batched pick
            greedy = greedy_out if greedy_out is not None else greedy_logprobs(logits)
            if not rows:
                return greedy
        masks = _device_masks({rid: m for rid, m in (allowed or {}).items() if rid not in defer}, logits.device,
                              logits.shape[1])
        tokens, lps = self._pick(logits, request_ids, rows, params, suppress or {}, masks)
        if len(rows) == len(request_ids):
            return tokens, lps
        idx = torch.tensor(rows, device=logits.device)
        return greedy[0].index_copy(0, idx, tokens), greedy[1].index_copy(0, idx, lps)

    def _pick(self, logits: torch.Tensor, request_ids: list[str], rows: list[int], params: dict, suppress: dict,
              masks: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples of `rows` (int64 / float32 [len(rows)]) in one sample_rows batch, each with its
        generator (a seeded row's own; unseeded rows share torch's) and token counts; `suppress`
        and `masks` (request id -> bool [vocab] on the device) as sample_device takes them."""
        ids = [request_ids[i] for i in rows]
        states = [self._sampler_state(rid, params[rid]) for rid in ids]
        allowed = None
        if any(rid in masks for rid in ids):
            every = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            allowed = torch.stack([masks.get(rid, every) for rid in ids])
        return sample_rows(logits.index_select(0, torch.tensor(rows, device=logits.device)), [params[r] for r in ids],
                           [g for g, _ in states], [c for _, c in states], [suppress.get(r, ()) for r in ids], allowed)

    def _sampler_state(self, rid: str, params) -> tuple[torch.Generator | None, torch.Tensor | None]:
        """The request's seeded generator and penalty counts, made at its first use."""
        if rid not in self.generators:  # unseeded rows draw from torch's generator, in one call
            self.generators[rid] = make_generator(params, self.device) if params.seed is not None else None
            self.counts[rid] = new_counts(params, self.model.config.vocab_size, self.device)
        return self.generators[rid], self.counts[rid]


def _device_masks(allowed: dict, device: torch.device, vocab: int) -> dict[str, torch.Tensor]:
    """Structured outputs' masks (request id -> packed bits of bool [vocab], np.packbits) as bool
    [vocab] on the device: one copy of the bits, from pinned memory (a pageable copy would block the
    host until the step's forward is done), unpacked there."""
    if not allowed:
        return {}
    packed = torch.from_numpy(np.stack(list(allowed.values())))  # uint8 [R, ceil(vocab / 8)]
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
    bits = (packed[:, :, None] >> shifts) & 1  # [R, ceil(vocab / 8), 8], the high bit first
    return dict(zip(allowed, bits.reshape(len(allowed), -1)[:, :vocab].bool()))


def _top_logprobs(logits: torch.Tensor, request_ids: list[str], params: dict):
    """(rows, k per row, token ids [R, kmax], log-probabilities [R, kmax], on the device) of the
    sampled rows whose request asks for top_logprobs, most likely first; None when none asks."""
    rows = [i for i, rid in enumerate(request_ids) if params[rid].top_logprobs]
    if not rows:
        return None
    ks = [params[request_ids[i]].top_logprobs for i in rows]
    idx = torch.tensor(rows, device=logits.device)
    lps, ids = torch.topk(torch.log_softmax(logits.index_select(0, idx), dim=-1), max(ks), dim=-1)
    return rows, ks, ids, lps


def _to_host(request_ids: list[str], tokens: torch.Tensor, logprobs: torch.Tensor, top=None,
             prompt=()) -> InFlight:
    """Start the samples' copy to the host (pinned buffers, an event to wait on) on CUDA."""
    if not tokens.is_cuda:
        return InFlight(request_ids, tokens, logprobs, None, top, list(prompt))
    host = [_pinned_copy(t) for t in (tokens, logprobs, *(top[2:] if top else ()))]
    prompt = [(rid, first, *map(_pinned_copy, ts)) for rid, first, *ts in prompt]
    done = torch.cuda.Event()
    done.record()
    return InFlight(request_ids, host[0], host[1], done, (*top[:2], *host[2:]) if top else None, prompt)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
