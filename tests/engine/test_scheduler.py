"""Scheduler with scripted requests: exact block ids and chunk splits, decode growth, preemption
order, FIFO, rejection, abort, stop tokens, the schedule/update contract. The fake runner samples
`1000 + end_pos`, a function of position only, so a recomputed request samples what it would have
sampled without preemption. The randomized stress test at the end runs a fake paged "model" whose
next token depends on every cached token of the request, read back through the block table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cometserve.engine.interfaces import SchedulerOutput, StepOutput
from cometserve.engine.kv_manager import KVBlockManager
from cometserve.engine.request import IllegalTransition, Request, RequestStatus
from cometserve.engine.scheduler import RequestRejected, Scheduler
from cometserve.sampling_params import SamplingParams

S = RequestStatus


def make(num_blocks=10, block_size=4, max_num_seqs=8, budget=64, max_model_len=256, cache=False) -> Scheduler:
    return Scheduler(KVBlockManager(num_blocks, block_size, cache), max_num_seqs, budget, max_model_len)


def req(rid: str, prompt_len: int, max_tokens: int = 4, eos: int | None = None, **kw) -> Request:
    prompt = [100 + i for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **kw), eos_token_id=eos)


def step(s: Scheduler, tokens: dict[str, int] | None = None) -> SchedulerOutput:
    """One engine step with the position-only fake runner; invariants checked on both sides."""
    out = s.schedule()
    s.check_invariants()
    tokens = tokens or {}
    sampled = {
        c.request_id: (tokens.get(c.request_id, 1000 + c.end_pos), -0.5) for c in out.chunks if c.needs_sample
    }
    s.update(StepOutput(sampled))
    s.check_invariants()
    return out


def shape(out: SchedulerOutput) -> list[tuple]:
    """(id, start, length, is_prefill, needs_sample) per chunk."""
    return [(c.request_id, c.start_pos, c.num_tokens, c.is_prefill, c.needs_sample) for c in out.chunks]


def test_request_state_machine():
    r = req("a", 3)
    assert r.status is S.WAITING and r.finish_reason is None
    for new in (S.RUNNING, S.PREEMPTED, S.RUNNING, S.FINISHED_LENGTH):
        r.transition(new)
    assert r.is_finished and r.finish_reason == "length"
    with pytest.raises(IllegalTransition, match="FINISHED_LENGTH -> RUNNING"):
        r.transition(S.RUNNING)
    with pytest.raises(IllegalTransition):
        req("b", 3).transition(S.FINISHED_STOPPED)  # a waiting request never sampled
    with pytest.raises(IllegalTransition):
        req("c", 3).append_output(5, 0.0)
    rej = req("d", 3)
    rej.transition(S.REJECTED)
    with pytest.raises(IllegalTransition):
        rej.transition(S.FINISHED_ABORTED)


def test_request_token_views():
    r = req("a", 3)
    r.transition(S.RUNNING)
    r.append_output(7, -1.0)
    r.append_output(8, -2.0)
    assert r.all_token_ids == [100, 101, 102, 7, 8] and r.num_tokens == 5
    assert (
        r.token_slice(2, 4) == [102, 7] and r.token_slice(4, 5) == [8] and r.token_slice(0, 2) == [100, 101]
    )


def test_first_step_exact_blocks_and_slots():
    s = make(num_blocks=10, block_size=4)
    s.add(req("A", 6))
    s.add(req("B", 9))
    out = s.schedule()
    a, b = out.chunks
    assert a.block_table == (0, 1) and a.slot_mapping == (0, 1, 2, 3, 4, 5)
    assert b.block_table == (2, 3, 4) and b.slot_mapping == tuple(range(8, 17))
    assert a.token_ids == tuple(range(100, 106)) and a.is_prefill and a.needs_sample
    assert out.num_batched_tokens == 15 and s.kv.num_free_blocks == 5
    s.update(StepOutput({"A": (7, -0.1), "B": (9, -0.2)}))
    assert s.get("A").output_token_ids == [7] and s.get("A").num_computed_tokens == 6


def test_chunked_prefill_split_sizes_under_budget():
    s = make(num_blocks=20, block_size=4, budget=8)
    s.add(req("A", 20, max_tokens=3))
    s.add(req("B", 5, max_tokens=2))
    steps = [step(s) for _ in range(5)]
    assert [shape(o) for o in steps] == [
        [("A", 0, 8, True, False)],
        [("A", 8, 8, True, False)],
        [("A", 16, 4, True, True), ("B", 0, 4, True, False)],  # B gets the leftover budget
        [("A", 20, 1, False, True), ("B", 4, 1, True, True)],  # decode first, then B's last chunk
        [("A", 21, 1, False, True), ("B", 5, 1, False, True)],
    ]
    assert steps[2].chunks[0].block_table == (0, 1, 2, 3, 4) and steps[2].chunks[1].block_table == (5,)
    assert steps[3].chunks[0].block_table == (0, 1, 2, 3, 4, 6) and steps[3].chunks[1].block_table == (5, 7)
    assert [o.num_batched_tokens for o in steps] == [8, 8, 8, 2, 2]
    assert not s.has_unfinished() and s.kv.num_free_blocks == 20


def test_decode_grows_across_block_boundary():
    s = make(num_blocks=10, block_size=4)
    s.add(req("A", 4, max_tokens=3))
    s.add(req("B", 4, max_tokens=3))
    first = step(s)
    assert [c.block_table for c in first.chunks] == [(0,), (1,)]
    second = step(s)
    a, b = second.chunks
    assert (a.token_ids, a.start_pos, a.block_table, a.slot_mapping) == ((1004,), 4, (0, 2), (8,))
    assert (b.token_ids, b.start_pos, b.block_table, b.slot_mapping) == ((1004,), 4, (1, 3), (12,))
    assert not a.is_prefill and a.needs_sample
    third = step(s)
    assert [c.slot_mapping for c in third.chunks] == [(9,), (13,)]  # same blocks, next offset
    assert s.get("A") is None and not s.has_unfinished() and s.kv.num_free_blocks == 10


def test_preemption_latest_arrival_first_and_resumed_first():
    s = make(num_blocks=4, block_size=2)
    a, b, c = (req(r, 2, max_tokens=4) for r in "ABC")
    for r in (a, b, c):
        s.add(r)
    assert [ch.block_table for ch in step(s).chunks] == [(0,), (1,), (2,)]
    out = step(s)  # B needs a block: the newest running request, C, is preempted, not B
    assert shape(out) == [("A", 2, 1, False, True), ("B", 2, 1, False, True)]
    assert out.preempted_ids == ("C",) and [ch.block_table for ch in out.chunks] == [(0, 3), (1, 2)]
    assert c.status is S.PREEMPTED and c.num_computed_tokens == 0 and c.output_token_ids == [1002]
    out = step(s)  # C needs 2 blocks, none free: it waits at the front
    assert [ch.request_id for ch in out.chunks] == ["A", "B"] and list(s.waiting) == [c]
    out = step(s)  # A needs a block: now B is the newest running
    assert shape(out) == [("A", 4, 1, False, True)] and out.preempted_ids == ("B",)
    assert out.chunks[0].block_table == (0, 3, 1) and list(s.waiting) == [b, c]
    assert a.status is S.FINISHED_LENGTH and a.output_token_ids == [1002, 1003, 1004, 1005]
    out = step(s)  # B resumes before C; its recompute prefills prompt + its 3 outputs
    assert shape(out) == [("B", 0, 5, True, True)] and out.finished_ids == ("A",)
    assert out.chunks[0].token_ids == (100, 101, 1002, 1003, 1004) and out.chunks[0].block_table == (0, 1, 2)
    out = step(s)
    assert shape(out) == [("C", 0, 3, True, True)] and out.chunks[0].token_ids == (100, 101, 1002)
    while s.has_unfinished():
        step(s)
    for r in (a, b, c):  # preemption changed nothing a request sees
        assert r.status is S.FINISHED_LENGTH and r.output_token_ids == [1002, 1003, 1004, 1005]
    assert (a.num_preemptions, b.num_preemptions, c.num_preemptions) == (0, 1, 1)
    assert s.kv.num_free_blocks == 4


def test_min_tokens_masks_stop_tokens_by_outputs_through_preemption():
    """A chunk that samples output number k (counted from its end position, so a recompute after
    preemption counts the outputs it re-reads) masks the request's stop tokens while k < min_tokens."""
    s = make(num_blocks=4, block_size=2)
    rs = [req(r, 2, max_tokens=4, eos=2, stop_token_ids=(7,), min_tokens=3) for r in "ABC"]
    for r in rs:
        s.add(r)
    seen = []
    while s.has_unfinished():
        for c in step(s).chunks:
            if c.needs_sample:
                k = c.end_pos - 2
                seen.append((c.is_prefill and c.start_pos == 0 and k > 0, k))
                assert c.suppress_ids == ((7, 2) if k < 3 else ()), (c.request_id, k, c.suppress_ids)
    assert (True, 1) in seen and (True, 3) in seen  # recomputes before and after min_tokens were checked
    assert all(r.output_token_ids == [1002, 1003, 1004, 1005] for r in rs)


def test_fifo_admission_with_max_num_seqs():
    s = make(max_num_seqs=2)
    for rid, max_tokens in (("A", 1), ("B", 3), ("C", 2), ("D", 1)):
        s.add(req(rid, 2, max_tokens=max_tokens))
    firsts: list[str] = []
    while s.has_unfinished():
        out = step(s)
        assert len(out.chunks) <= 2
        firsts += [c.request_id for c in out.chunks if c.start_pos == 0]
    assert firsts == ["A", "B", "C", "D"]


def test_head_of_line_request_is_not_overtaken():
    s = make(num_blocks=6, block_size=4)
    s.add(req("A", 12, max_tokens=4))  # 3 blocks now, 4 at most
    s.add(req("B", 16, max_tokens=1))  # 4 blocks: waits for A
    s.add(req("C", 2, max_tokens=1))  # would fit now, but arrived after B
    order: list[str] = []
    while s.has_unfinished():
        order += [c.request_id for c in step(s).chunks if c.start_pos == 0]
    assert order == ["A", "B", "C"]


def test_rejects_requests_that_can_never_fit():
    s = make(num_blocks=4, block_size=4, max_model_len=32)
    too_long = req("L", 30, max_tokens=3)
    with pytest.raises(RequestRejected, match="30 tokens \\+ max_tokens 3 exceeds the model's context of 32"):
        s.add(too_long)
    assert (
        too_long.status is S.REJECTED and too_long.finish_reason == "rejected" and "context" in too_long.error
    )
    too_big = req("K", 10, max_tokens=8)  # 17 K/V slots: 5 blocks of a 4-block cache
    with pytest.raises(RequestRejected, match="needs 5 KV blocks of 4 tokens but the whole cache has 4"):
        s.add(too_big)
    with pytest.raises(RequestRejected, match="empty"):
        s.add(req("E", 0))
    assert not s.has_unfinished()
    exact = req("X", 10, max_tokens=7)  # 16 slots: exactly the whole cache
    s.add(exact)
    with pytest.raises(ValueError, match="already in use"):
        s.add(req("X", 1))
    while s.has_unfinished():
        step(s)
    assert exact.status is S.FINISHED_LENGTH and exact.num_output_tokens == 7 and s.kv.num_free_blocks == 4


def test_abort_frees_blocks_and_is_reported():
    s = make(num_blocks=10, block_size=4)
    a, b, c = req("A", 6), req("B", 9), req("C", 3)
    for r in (a, b, c):
        s.add(r)
    s.max_num_seqs = 2  # C stays waiting
    step(s)
    assert s.kv.num_free_blocks == 5
    assert s.abort("B") and b.status is S.FINISHED_ABORTED and b.finish_reason == "abort"
    assert s.kv.num_free_blocks == 8 and "B" not in s.kv
    assert s.abort("C") and c.status is S.FINISHED_ABORTED and not s.waiting
    assert not s.abort("B") and not s.abort("nope")
    out = s.schedule()
    assert out.finished_ids == ("B", "C") and [ch.request_id for ch in out.chunks] == ["A"]
    s.abort("A")  # between schedule and update: its sample is dropped, even if the id is reused
    s.add(reused := req("A", 2))
    assert s.update(StepOutput({"A": (5, 0.0)})) == [] and a.output_token_ids == [1006]
    assert reused.status is S.WAITING and not reused.output_token_ids
    assert s.abort("A") and s.kv.num_free_blocks == 10 and not s.has_unfinished()
    s.check_invariants()


def test_stop_token_ids_eos_and_ignore_eos():
    s = make()
    stop = req("S", 3, max_tokens=10, stop_token_ids=(42,))
    eos = req("E", 3, max_tokens=10, eos=2)
    ign = req("I", 3, max_tokens=2, eos=2, ignore_eos=True)
    for r in (stop, eos, ign):
        s.add(r)
    step(s)
    out = step(s, {"S": 42, "E": 2, "I": 2})
    assert [c.request_id for c in out.chunks] == ["S", "E", "I"]
    assert stop.status is S.FINISHED_STOPPED and stop.stop_token_id == 42 and stop.output_token_ids == [1003]
    assert eos.status is S.FINISHED_STOPPED and eos.stop_token_id == 2 and eos.output_token_ids == [1003]
    assert ign.status is S.FINISHED_LENGTH and ign.output_token_ids == [1003, 2]
    assert ign.output_logprobs == [-0.5, -0.5] and s.kv.num_free_blocks == 10


def test_engine_can_finish_on_a_stop_string():
    s = make()
    r = req("A", 3, max_tokens=10)
    s.add(r)
    step(s)
    s.finish_request("A", S.FINISHED_STOPPED)
    assert r.finish_reason == "stop" and s.kv.num_free_blocks == 10 and s.schedule().finished_ids == ("A",)


def test_schedule_update_contract():
    s = make()
    with pytest.raises(RuntimeError, match="without a preceding schedule"):
        s.update(StepOutput({}))
    s.add(req("A", 12))
    s.max_num_batched_tokens = 8
    s.schedule()
    with pytest.raises(RuntimeError, match="twice"):
        s.schedule()
    with pytest.raises(ValueError, match="needed no sample"):
        s.update(StepOutput({"A": (1, 0.0)}))  # the first chunk of A's prefill samples nothing
    s.update(StepOutput({}))
    s.schedule()
    with pytest.raises(ValueError, match="no sample for requests \\['A'\\]"):
        s.update(StepOutput({}))


def test_hold_schedule_ahead_update_contract():
    """Async scheduling: hold() puts the scheduled step in flight, the next schedule() comes before
    its update(); decodes carry PLACEHOLDER; updates go oldest first; a request whose last token is
    in flight is not scheduled again; a request with a token in flight is never preempted."""
    from cometserve.engine.interfaces import PLACEHOLDER

    s = make(num_blocks=4, block_size=4)
    with pytest.raises(RuntimeError, match="hold"):
        s.hold()
    s.add(req("A", 3, max_tokens=2))
    s.add(req("B", 2, max_tokens=5))
    first = s.schedule()
    s.hold()
    assert s.get("A").num_inflight == 1 and s.get("A").num_tokens == 4 and s.can_schedule_ahead()
    ahead = s.schedule()  # before the first step's update
    assert [(c.request_id, c.token_ids, c.start_pos, c.is_prefill) for c in ahead.chunks] == [
        ("A", (PLACEHOLDER,), 3, False), ("B", (PLACEHOLDER,), 2, False)]
    with pytest.raises(RuntimeError, match="no other step in flight"):
        s.hold()  # one step in flight at a time
    assert s.update(StepOutput({"A": (7, -0.1), "B": (8, -0.2)})) == []  # the held (first) step
    assert [c.request_id for c in first.chunks] == ["A", "B"]
    assert s.get("A").output_token_ids == [7] and s.get("A").num_inflight == 0
    s.hold()  # the step scheduled ahead is now in flight
    s.check_invariants()
    assert [c.request_id for c in s.schedule().chunks] == ["B"]  # A's last token is in flight
    done = s.update(StepOutput({"A": (9, -0.3), "B": (10, -0.4)}))
    assert [r.request_id for r in done] == ["A"] and s.get("B").output_token_ids == [8, 10]
    s.update(StepOutput({"B": (11, -0.5)}))
    s.check_invariants()
    b = s.get("B")
    s.schedule()
    s.hold()
    assert b.num_inflight == 1
    with pytest.raises(RuntimeError, match="in flight"):
        s._preempt(b)


@pytest.mark.parametrize("field", ["max_num_seqs", "max_num_batched_tokens", "max_model_len"])
def test_scheduler_validates(field):
    kwargs = {"max_num_seqs": 4, "max_num_batched_tokens": 16, "max_model_len": 64, field: 0}
    with pytest.raises(ValueError, match=field):
        Scheduler(KVBlockManager(4, 4), **kwargs)


def test_bookkeeping_modules_do_not_import_torch():
    code = (
        "import sys; import cometserve.engine.scheduler, cometserve.engine.interfaces; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- randomized stress -----------------------------------------------------------------------

VOCAB = 64


def next_token(context: list[int]) -> int:
    """The fake model: a hash of the whole context, so a lost or misplaced K/V changes the output."""
    h = 17
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


def reference_outputs(r: Request) -> tuple[list[int], int | None]:
    """What the request generates alone, one token at a time: (outputs, stop token or None)."""
    ctx, outs = list(r.prompt_token_ids), []
    while True:
        t = next_token(ctx)
        if r.is_stop_token(t):
            return outs, t
        outs.append(t)
        ctx.append(t)
        if len(outs) == r.sampling_params.max_tokens:
            return outs, None


class PagedFakeModel:
    """Writes each chunk's tokens into a fake paged cache at its slots, then samples from the context
    read back through the block table; every cached entry is tagged (request, incarnation, position)
    so reading a stale, foreign or never-written slot fails at once. With prefix caching (`sched`
    given) a request legitimately reads another's entries, so an entry is tagged with its position
    and a hash of the writer's whole context up to it instead, checked against the reader's."""

    def __init__(self, block_size: int, sched: Scheduler | None = None) -> None:
        self.block_size = block_size
        self.sched = sched
        self.cache: dict[int, tuple[str, int, int, int]] = {}
        self.incarnation: dict[str, int] = {}
        self.last: dict[str, int] = {}  # the token each request sampled in the last run (PLACEHOLDER's)

    def run(self, out: SchedulerOutput) -> StepOutput:
        from cometserve.engine.interfaces import PLACEHOLDER

        for rid in out.preempted_ids:  # its old K/V is dead from now on
            self.incarnation[rid] = self.incarnation.get(rid, 0) + 1
        sampled = {}
        for c in out.chunks:
            inc, bs = self.incarnation.get(c.request_id, 0), self.block_size
            tokens = [self.last[c.request_id] if t == PLACEHOLDER else t for t in c.token_ids]
            if self.sched is not None:  # the context up to the chunk is the request's known tokens
                known = self.sched.get(c.request_id).token_slice(0, c.start_pos) + tokens
                tags = [hash(tuple(known[: p + 1])) for p in range(c.end_pos)]
            for i, (tok, slot) in enumerate(zip(tokens, c.slot_mapping)):
                pos = c.start_pos + i
                self.cache[slot] = (c.request_id, inc, pos, tok) if self.sched is None else (pos, tags[pos], tok)
            if c.needs_sample:
                ctx = []
                for pos in range(c.end_pos):
                    entry = self.cache[c.block_table[pos // bs] * bs + pos % bs]
                    if self.sched is None:
                        assert entry[:3] == (c.request_id, inc, pos)
                    else:
                        assert entry[:2] == (pos, tags[pos]), (c.request_id, pos)
                    ctx.append(entry[-1])
                sampled[c.request_id] = (next_token(ctx), -1.0)
        self.last = {rid: t for rid, (t, _) in sampled.items()}
        return StepOutput(sampled)


def check_step(s: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_batched_tokens <= s.max_num_batched_tokens and len(out.chunks) <= s.max_num_seqs
    assert not {c.request_id for c in out.chunks} & set(out.preempted_ids)
    kinds = [c.is_prefill for c in out.chunks]
    assert kinds == sorted(kinds)  # decodes first


@pytest.mark.parametrize("cache", [False, True], ids=["plain", "prefix_cache"])
@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed, num_blocks, budget", [(0, 24, 32), (1, 40, 16), (2, 18, 64), (3, 64, 7)])
def test_randomized_stress_nothing_leaked_nothing_corrupted(seed, num_blocks, budget, ahead, cache):
    """Random arrivals, aborts, stops, preemption; `ahead`: the engine's async scheduling (each step
    scheduled and run before the previous one's update, whenever can_schedule_ahead()); `cache`:
    prefix caching, with prompts drawn from a few shared stems so that prefixes repeat."""
    import random

    rng = random.Random(seed)
    block_size = 4
    s = make(num_blocks=num_blocks, block_size=block_size, max_num_seqs=8, budget=budget, max_model_len=100,
             cache=cache)
    model = PagedFakeModel(block_size, s if cache else None)
    stems = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 40))] for _ in range(4)]
    todo = []
    for i in range(150):
        params = SamplingParams(max_tokens=rng.randint(1, 40), stop_token_ids=(3,) if i % 5 == 0 else ())
        stem = rng.choice(stems) if cache else []
        prompt = stem + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 70 - len(stem)))]
        todo.append(Request(f"r{i}", prompt, params, eos_token_id=rng.choice([None, 5])))
    added, rejected, admitted, num_preemptions = [], [], [], 0
    in_flight, ahead_steps = None, 0
    for _ in range(20_000):
        for _ in range(rng.randint(0, 3)):
            if todo:
                r = todo.pop(0)
                try:
                    s.add(r)
                    added.append(r)
                except RequestRejected:
                    rejected.append(r)
        if s.requests and rng.random() < 0.01:
            s.abort(rng.choice(sorted(s.requests)))
        if in_flight is None or (s.has_unfinished() and s.can_schedule_ahead()):
            was_running = {r.request_id for r in s.running}
            out = s.schedule()
            s.check_invariants()
            check_step(s, out)
            num_preemptions += len(out.preempted_ids)
            admitted += [s.get(c.request_id).arrival for c in out.chunks if c.request_id not in was_running]
            result = model.run(out)  # "launched": runs before the step in flight is updated
            if in_flight is not None:
                s.update(in_flight)
                ahead_steps += 1
            in_flight = result
            if ahead:
                s.hold()
            else:
                s.update(in_flight)
                in_flight = None
        else:
            s.update(in_flight)
            in_flight = None
        s.check_invariants()
        if not todo and not s.has_unfinished() and in_flight is None:
            break
    assert not todo and not s.has_unfinished(), "the scheduler stopped making progress"
    assert (ahead_steps > 100) == ahead
    assert s.kv.num_free_blocks == num_blocks and s.kv.usage == 0.0
    assert num_preemptions > 0 and len(rejected) > 0  # the scenarios exercise both paths
    assert (s.prefix_hit_tokens > 0) == cache
    first = list(dict.fromkeys(admitted))
    assert first == sorted(first)  # FIFO: first admissions in arrival order
    for r in rejected:
        assert r.status is S.REJECTED and r.error
    for r in added:
        ref, stop = reference_outputs(r)
        if r.status is S.FINISHED_ABORTED:
            assert r.output_token_ids == ref[: r.num_output_tokens]
        elif r.status is S.FINISHED_STOPPED:
            assert (r.output_token_ids, r.stop_token_id) == (ref, stop) and stop is not None
        else:
            assert r.status is S.FINISHED_LENGTH and stop is None
            assert r.output_token_ids == ref and r.num_output_tokens == r.sampling_params.max_tokens


def test_prefix_cache_admission_exact_blocks_and_last_token_left():
    s = make(num_blocks=10, block_size=4, cache=True)
    a = req("a", 10)  # prompt 100..109: blocks [0, 1, 2], 0 and 1 full
    s.add(a)
    assert shape(step(s)) == [("a", 0, 10, True, True)]
    assert s.kv.num_cached_blocks == 2  # registered once the step is updated
    b = Request("b", a.prompt_token_ids[:8] + [7, 7, 7], SamplingParams(max_tokens=2))
    c = Request("c", a.prompt_token_ids[:8], SamplingParams(max_tokens=2))  # all cached: recompute block 1
    s.add(b)
    s.add(c)
    out = step(s)
    assert shape(out) == [("a", 10, 1, False, True), ("b", 8, 3, True, True), ("c", 4, 4, True, True)]
    assert s.kv.block_table("b")[:2] == [0, 1] and s.kv.block_table("c")[0] == 0
    assert s.kv.block_table("c")[1] not in (0, 1)  # block 1 is shared and full: c writes its own
    assert (s.prefix_queried_tokens, s.prefix_hit_tokens) == (10 + 11 + 8, 8 + 4)
    while s.has_unfinished():
        step(s)
    assert s.kv.num_free_blocks == 10 and s.kv.num_cached_blocks >= 2


def test_prefix_cache_not_matched_before_the_writing_step_is_updated():
    s = make(num_blocks=10, block_size=4, cache=True)
    s.add(req("a", 9))
    out = s.schedule()  # a's blocks are being written by this step
    s.hold()
    s.add(req("b", 9))  # the same prompt, admitted while a's step is in flight
    assert s.can_schedule_ahead()
    out2 = s.schedule()
    assert ("b", 0, 9, True, True) in shape(out2)  # no hit: nothing is registered yet
    s.update(StepOutput({c.request_id: (1000 + c.end_pos, -0.5) for c in out.chunks if c.needs_sample}))
    assert s.kv.num_cached_blocks == 2


def test_an_id_reused_while_its_aborted_step_is_in_flight_gets_only_its_own_samples():
    s = make()
    s.add(req("a", 4, max_tokens=3))
    first = s.schedule()  # a's prefill, launched
    s.hold()
    s.abort("a")
    s.add(req("a", 6, max_tokens=2))  # a new request under the same id
    assert s.can_schedule_ahead()
    assert shape(s.schedule()) == [("a", 0, 6, True, True)]  # admitted while the old step is in flight
    s.update(StepOutput({"a": (1000 + first.chunks[0].end_pos, -0.5)}))  # the aborted request's sample
    assert s.get("a").output_token_ids == []
    s.update(StepOutput({"a": (1006, -0.5)}))
    assert s.get("a").output_token_ids == [1006]
    s.check_invariants()
