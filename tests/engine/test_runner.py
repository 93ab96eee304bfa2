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


def chunk(rid, tokens, start, table, prefill=True, sample=True, page=P) -> ScheduledChunk:
    slots = tuple(table[p // page] * page + p % page for p in range(start, start + len(tokens)))
    return ScheduledChunk(rid, tuple(tokens), start, tuple(table), slots, prefill, sample, GREEDY)


def step(chunks, preempted=(), finished=()) -> SchedulerOutput:
    return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(finished), sum(c.num_tokens for c in chunks))


def make_runner(loaded, kv_bits=16, num_pages=10, max_seqs=3, page=P):
    st = KVStorage.create(loaded.model, kv_bits, page, max_seqs, num_pages=num_pages, page_size=page)
    return ModelRunner(loaded.model, st, max_model_len=16 * page)


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
    # a mixed step: the decode is read by the decode kernel, the prompt chunk alone by the prefill
    # path (a first chunk: its own K/V, nothing gathered)
    d, p = m.decodes, m.prefills
    assert m.num_decodes == 1 and m.kv_slots is None
    assert d.is_decode and d.block_tables.tolist() == [[3, 5, 7]] and d.context_lens.tolist() == [10]
    assert (d.max_context_len, d.seq_slots.tolist(), d.slot_mapping.tolist()) == (10, [0], [7 * P + 1])
    assert p.cu_seqlens_q.tolist() == [0, 6] and p.block_tables.tolist() == [[0, 1, 10]]
    assert (p.context_lens.tolist(), p.seq_slots.tolist(), p.max_seqlen_q, p.max_context_len) == ([6], [1], 6, 6)
    assert p.slot_mapping.tolist() == [0, 1, 2, 3, 4, 5] and p.kv_slots is None
    # a continuation in a 16-bit step: every context token's page slot of the prompt chunks only
    m = runner.prepare(step([
        chunk("a", [8], 10, (3, 5, 7), prefill=False),
        chunk("b", [7, 8], 6, (0, 1, 2)),
        chunk("c", [1], 0, (9,)),  # a one-token prompt after them stays with the prompt chunks
    ])).meta
    assert m.num_decodes == 1 and m.prefills.cu_seqlens_q.tolist() == [0, 2, 3]
    assert m.prefills.kv_slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 36]
    assert m.prefills.cu_seqlens_k.tolist() == [0, 8, 9]


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


def _mixed_vs_apart(loaded, kv_bits, page=P, n=1):
    """Largest |logit| difference between a mixed step (a decode, a prompt continuation, a new prompt)
    and the same chunks as a decode step then a prefill step, on two runners with equal caches, and
    the logits' scale. Prompt lengths scale with n."""
    runners = [make_runner(loaded, kv_bits, page=page) for _ in range(2)]
    g = torch.Generator().manual_seed(0)

    def ck(rid, start, length, table, **kw):
        return chunk(rid, torch.randint(0, 320, (length,), generator=g).tolist(), start, table, page=page, **kw)

    first = step([ck("a", 0, 5 * n, (0, 1)), ck("b", 0, 3 * n, (2, 3))])
    dec, cont, new = ck("a", 5 * n, 1, (0, 1), prefill=False), ck("b", 3 * n, 3 * n, (2, 3, 4)), ck("c", 0, 2 * n, (5,))
    with torch.inference_mode():
        for r in runners:
            r.execute(first)
        mixed = runners[0].prepare(step([dec, cont, new]))
        assert mixed.meta.num_decodes == 1
        got = runners[0].logits(mixed)[0]
        apart = torch.cat([runners[1].logits(runners[1].prepare(step(s)))[0] for s in ([dec], [cont, new])])
    return float((got - apart).abs().max()), float(apart.abs().max())


@pytest.mark.parametrize("kv_bits", [16, 4])
def test_mixed_step_reads_each_part_as_its_own_step(tiny16, kv_bits):
    """A mixed step reads its decodes through the decode path and its prompt chunks through the
    prefill path: every sequence's logits are those of a decode step and a prefill step run apart."""
    err, scale = _mixed_vs_apart(tiny16, kv_bits)
    assert err <= 1e-4 * scale, (err, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_bits", [16, 4])
def test_gpu_mixed_step_reads_each_part_as_its_own_step(tmp_path, kv_bits):
    """The same through the CUDA kernels (head_dim 64, pages and groups of 64, prompts of 42-126
    tokens); bf16 logits, so within bf16 rounding of the GEMMs at other row counts."""
    path = write_tiny_model("llama", tmp_path / "llama", hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2)
    err, scale = _mixed_vs_apart(load_model(path, device="cuda"), kv_bits, page=64, n=21)
    assert err <= 2e-2 * scale, (err, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fresh_prompts_attend_over_their_own_rows(tmp_path):
    """INT4 cache: chunks that start at position 0 attend over their own K/V rows, which
    write_kv(dequantize=True) leaves holding the cache's values: every step's logits equal those of
    the gather path (a second runner with the own-rows path off) bit for bit: one prompt of a length
    SDPA pads, three prompts (varlen), then a mixed step (two decodes beside a new prompt)."""
    path = write_tiny_model("llama", tmp_path / "llama", hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2)
    loaded = load_model(path, device="cuda")
    runners = [make_runner(loaded, 4, num_pages=16, max_seqs=5, page=64) for _ in range(2)]
    assert runners[0].attn.own_rows is not None, runners[0].attn.reason
    runners[1].attn.own_rows = None
    g = torch.Generator().manual_seed(0)

    def ck(rid, start, length, table, **kw):
        return chunk(rid, torch.randint(0, 320, (length,), generator=g).tolist(), start, table, page=64, **kw)

    steps = [[ck("a", 0, 100, (0, 1))],
             [ck("b", 0, 64, (2,)), ck("c", 0, 130, (3, 4, 5)), ck("d", 0, 7, (6,))],
             [ck("a", 100, 1, (0, 1), prefill=False), ck("c", 130, 1, (3, 4, 5), prefill=False),
              ck("e", 0, 200, (7, 8, 9, 10))]]
    with torch.inference_mode():
        for s in steps:
            got, want = (r.logits(r.prepare(step(s)))[0] for r in runners)
            assert torch.equal(got, want), (s[0].request_id, float((got - want).abs().max()))
