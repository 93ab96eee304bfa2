"""ModelRunner metadata for a scripted SchedulerOutput (exact block tables, slots, rows), sequence
slot lifecycle, samples only where asked; KVStorage sizing."""

from __future__ import annotations

import pytest
import torch

from cometserve.engine.interfaces import ScheduledChunk, SchedulerOutput
from cometserve.engine.kv_storage import KVStorage, Paged16Cache, SeqSlots, page_bytes
from cometserve.engine.runner import ModelRunner
from cometserve.kernels.ref import PagedKVCache
from cometserve.model.loader import load_model
from cometserve.sampling_params import SamplingParams
from tests.tiny_models import write_tiny_model

P = 4  # page size of these tests
GREEDY = SamplingParams(max_tokens=8)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    return load_model(write_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama"), device="cpu")


def chunk(rid, tokens, start, table, prefill=True, sample=True) -> ScheduledChunk:
    slots = tuple(table[p // P] * P + p % P for p in range(start, start + len(tokens)))
    return ScheduledChunk(rid, tuple(tokens), start, tuple(table), slots, prefill, sample, GREEDY)


def step(chunks, preempted=(), finished=()) -> SchedulerOutput:
    return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(finished), sum(c.num_tokens for c in chunks))


def make_runner(loaded, kv_bits=16, num_pages=10, max_seqs=3):
    st = KVStorage.create(loaded.model, kv_bits, 4, max_seqs, num_pages=num_pages, page_size=P)
    return ModelRunner(loaded.model, st, max_model_len=64)


def test_metadata_of_a_scripted_step(tiny16):
    runner = make_runner(tiny16)
    out = step([
        chunk("a", [7], 9, (3, 5, 7), prefill=False),  # decode at position 9
        chunk("b", [1, 2, 3, 4, 5, 6], 0, (0, 1), sample=False),  # first chunk of a prompt
    ])
    x = runner.prepare(out)
    m = x.meta
    assert x.input_ids.tolist() == [7, 1, 2, 3, 4, 5, 6]
    assert x.positions.tolist() == [9, 0, 1, 2, 3, 4, 5]
    assert m.block_tables.dtype == torch.int32
    assert m.block_tables.tolist() == [[3, 5, 7], [0, 1, 10]]  # padded with the dummy page (10)
    assert m.cu_seqlens_q.tolist() == [0, 1, 7]
    assert m.context_lens.tolist() == [10, 6]
    assert m.seq_slots.tolist() == [0, 1]
    assert m.slot_mapping.tolist() == [7 * P + 1, 0, 1, 2, 3, 4, 5]
    assert (m.max_seqlen_q, m.max_context_len, m.is_decode) == (6, 10, False)
    assert x.sample_rows == [0] and x.sample_ids == ["a"]
    # a continuation in a 16-bit step: every context token's page slot, for the varlen gather
    assert m.kv_slots.tolist() == [12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 0, 1, 2, 3, 4, 5]
    assert m.cu_seqlens_k.tolist() == [0, 10, 16]


def test_slots_follow_preemption_and_finish(tiny16):
    runner = make_runner(tiny16)
    runner.prepare(step([chunk("a", [1, 2], 0, (0,)), chunk("b", [3], 0, (1,))]))
    assert runner.prepare(step([chunk("c", [4], 0, (2,))], preempted=["a"])).meta.seq_slots.tolist() == [0]
    x = runner.prepare(step([chunk("a", [1, 2, 9], 0, (3,)), chunk("d", [5], 0, (4,))], finished=["c", "b"]))
    assert x.meta.seq_slots.tolist() == [0, 1]  # lowest free slots, "a" recomputed in a new one
    assert x.meta.is_decode is False


def test_execute_samples_exactly_the_needed_chunks(tiny16):
    runner = make_runner(tiny16)
    out = runner.execute(step([chunk("a", [1, 2, 3], 0, (0,)), chunk("b", [4, 5], 0, (1,), sample=False)]))
    assert set(out.sampled) == {"a"}
    token, logprob = out.sampled["a"]
    assert 0 <= token < 320 and logprob <= 0.0
    out = runner.execute(step([chunk("a", [token], 3, (0,), prefill=False), chunk("b", [6], 2, (1,))]))
    assert set(out.sampled) == {"a", "b"}


def test_decode_step_uses_decode_metadata(tiny16):
    runner = make_runner(tiny16, kv_bits=4)
    runner.execute(step([chunk("a", [1, 2, 3, 4, 5], 0, (0, 1)), chunk("b", [6, 7], 0, (2,))]))
    x = runner.prepare(step([chunk("a", [9], 5, (0, 1), prefill=False), chunk("b", [8], 2, (2,), prefill=False)]))
    assert x.meta.is_decode and x.meta.context_lens.tolist() == [6, 3]


def test_storage_layouts_and_sizes(tiny16):
    cfg = tiny16.model.config
    st4 = KVStorage.create(tiny16.model, 4, 16, 5, num_pages=7, page_size=32)
    assert isinstance(st4.layers[0], PagedKVCache) and len(st4.layers) == cfg.num_layers
    assert st4.layers[0].k_codes.shape[0] == 8 and st4.layers[0].page_size == 32  # + dummy page
    assert st4.layers[0].k_window.shape == (6, cfg.num_kv_heads, 16, cfg.head_dim)  # + dummy slot
    st16 = KVStorage.create(tiny16.model, 16, 64, 5, num_pages=7, page_size=16)
    assert isinstance(st16.layers[0], Paged16Cache)
    assert st16.layers[0].k_pages.shape == (8, cfg.num_kv_heads, 16, cfg.head_dim)
    # Llama-3-8B: INT4 pages are 0.28x the bf16 ones (codes + float16 scales and zeros per 64 tokens)
    b16 = page_bytes(16, 32, 8, 128, 64, 64, torch.bfloat16)
    b4 = page_bytes(4, 32, 8, 128, 64, 64, torch.bfloat16)
    assert b4 / b16 == pytest.approx(1152 / 4096)
    with pytest.raises(ValueError, match="multiple"):
        KVStorage.create(tiny16.model, 4, 64, 5, num_pages=7, page_size=32)


def test_seq_slots_lowest_first():
    s = SeqSlots(3)
    assert [s.get_or_assign(r) for r in "abc"] == [0, 1, 2]
    s.release("b")
    s.release("zz")  # unknown: no-op
    assert s.get_or_assign("d") == 1 and s.get_or_assign("a") == 0
    with pytest.raises(RuntimeError, match="no free sequence slot"):
        s.get_or_assign("e")
