"""DecodeGraphs: CUDA graphs of the whole model forward for decode steps (engine/runner.py replays
them), with their static input buffers and the captured batch sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cometserve.engine.attention import AttentionMetadata
from cometserve.engine.piecewise import capture_or_clear
from cometserve.engine.sampler import greedy_logprobs

if TYPE_CHECKING:
    from cometserve.engine.runner import ModelRunner, StepInputs


class DecodeGraphs:
    """CUDA graphs of the whole model forward for decode batches padded to 1, 2, 4, ..., max_batch.

    Every graph reads one set of static buffers (input ids, positions, metadata). Rows past the real
    batch are 1-token decodes of a dummy sequence (dummy page, dummy window slot, context 1), so
    padding never touches a live sequence. The grid-shaping host values are fixed at capture:
    max_seqlen_q = 1 and max_context_len = max_model_len (kernels stop at each row's own length).
    Batches of at most SHORT_BATCH also get a graph captured for contexts of at most SHORT_CONTEXT,
    taken while every sequence fits: there the INT4 decode attention runs as one split, without the
    merge launch a max_model_len grid needs (benchmarks/kernels/NOTES-attention.md, session 15).
    Capture failure is not fatal: `ok` stays False and the runner runs eagerly.
    """

    SHORT_BATCH = 4
    SHORT_CONTEXT = 512

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        st, dev = runner.storage, runner.device
        self.sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
        self.max_pages = -(-runner.max_model_len // st.page_size)
        n = self.sizes[-1]
        i32 = {"dtype": torch.int32, "device": dev}
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.meta = AttentionMetadata(
            block_tables=torch.full((n, self.max_pages), st.dummy_page, **i32),
            cu_seqlens_q=torch.arange(n + 1, **i32), context_lens=torch.ones(n, **i32),
            seq_slots=torch.full((n,), st.dummy_slot, **i32),
            slot_mapping=torch.full((n,), st.dummy_page * st.page_size, dtype=torch.int64, device=dev),
            max_seqlen_q=1, max_context_len=runner.max_model_len, start_pos_host=[], context_lens_host=[],
            cu_seqlens_host=[],
        )
        self.logits = torch.empty(n, runner.model.config.vocab_size, dtype=torch.float32, device=dev)
        # keyed by (padded batch, the max_context_len captured)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.error = capture_or_clear(self._capture_all, self.graphs, self.outputs)

    def _view(self, bs: int, max_context_len: int) -> AttentionMetadata:
        m = self.meta
        return AttentionMetadata(m.block_tables[:bs], m.cu_seqlens_q[: bs + 1], m.context_lens[:bs],
                                 m.seq_slots[:bs], m.slot_mapping[:bs], 1, max_context_len, [], [], [])

    def _key(self, bs: int, max_context_len: int) -> tuple[int, int]:
        short = bs <= self.SHORT_BATCH and max_context_len <= self.SHORT_CONTEXT < self.meta.max_context_len
        return bs, self.SHORT_CONTEXT if short else self.meta.max_context_len

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bs in reversed(self.sizes):
            # the max_model_len graph, and the short-context one where the batch takes it
            for key in dict.fromkeys((self._key(bs, self.meta.max_context_len), self._key(bs, 1))):
                meta = self._view(*key)
                for _ in range(2):  # warm-up: compiles kernels and tunes the GEMMs for this M outside capture
                    self._forward(bs, meta)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.outputs[key] = self._forward(bs, meta)
                pool = g.pool()
                self.graphs[key] = g
        torch.cuda.synchronize()

    def _forward(self, bs: int, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits float32 [bs, vocab], greedy tokens [bs], their logprobs [bs]): every row of a
        decode step is sampled, so the LM head and the greedy pick are part of the graph."""
        hidden = self.runner.forward(self.input_ids[:bs], self.positions[:bs], meta)
        logits = self.logits[:bs]
        logits.copy_(self.runner.model.compute_logits(hidden))  # one buffer for every graph's logits
        return (logits, *greedy_logprobs(logits))

    @property
    def ok(self) -> bool:
        return bool(self.graphs)

    def run(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(logits, greedy tokens, logprobs) of a decode step's sampled rows, through the smallest
        graph that fits, or None."""
        b = inputs.input_ids.shape[0]
        bs = next((s for s in self.sizes if s >= b), None)
        key = self._key(bs, inputs.meta.max_context_len) if bs is not None else None
        if key not in self.graphs:
            return None
        m, st = self.meta, self.runner.storage
        self.input_ids[:b].copy_(inputs.input_ids)
        self.positions[:b].copy_(inputs.positions)
        npages = inputs.meta.block_tables.shape[1]
        m.block_tables[:b, :npages].copy_(inputs.meta.block_tables)
        m.block_tables[:b, npages:].fill_(st.dummy_page)
        m.context_lens[:b].copy_(inputs.meta.context_lens)
        m.seq_slots[:b].copy_(inputs.meta.seq_slots)
        m.slot_mapping[:b].copy_(inputs.meta.slot_mapping)
        if bs > b:  # padded rows: a 1-token decode of the dummy sequence
            self.input_ids[b:bs].zero_()
            self.positions[b:bs].zero_()
            m.block_tables[b:bs].fill_(st.dummy_page)
            m.context_lens[b:bs].fill_(1)
            m.seq_slots[b:bs].fill_(st.dummy_slot)
            m.slot_mapping[b:bs].fill_(st.dummy_page * st.page_size)
        self.graphs[key].replay()
        rows = inputs.sample_rows
        if rows == list(range(b)):
            return tuple(t[:b] for t in self.outputs[key])
        idx = torch.tensor(rows, device=self.input_ids.device)
        return tuple(t[idx] for t in self.outputs[key])
