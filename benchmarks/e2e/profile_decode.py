"""Where a decode step's time goes: host phases of `LLMEngine.step` and the GPU kernels of one forward.

    PYTHONPATH=. python3 benchmarks/e2e/profile_decode.py --random-weights llama-3-8b --modes bf16,w4axkv4 \
        --batch 1,64 --context 128

For each mode and batch size: B requests of `--context` prompt tokens are prefilled, then decode
steps are timed phase by phase (schedule, prepare, forward, logits + sample, update), each phase
closed by a device sync so the wall times add up; then the forward alone (graph replay or eager)
with CUDA events; then a torch.profiler table of the kernels of a few eager forwards, grouped by
name. Prints the tables; writes nothing (a diagnostic, not a benchmark of record).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.interfaces import StepOutput
from cometserve.engine.random_model import build_random_model
from cometserve.sampling_params import SamplingParams


def sample(runner, out, inputs, logits, greedy) -> StepOutput:
    params = {c.request_id: c.sampling_params for c in out.chunks if c.needs_sample}
    return StepOutput(runner.sample(logits, greedy, inputs.sample_ids, params))


def timed_steps(engine: LLMEngine, n: int) -> dict[str, float]:
    """Median ms per phase over n decode steps (each phase synchronised). "forward" includes the
    LM head (and the greedy pick, inside the decode graph). On CPU (host_overhead.py, with a
    fabricated `runner.logits`) there is nothing to sync."""
    engine.sync()  # no step in flight (async scheduling): the phases below drive the scheduler directly
    sched, runner = engine.scheduler, engine.runner
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    phases: dict[str, list[float]] = {k: [] for k in ("schedule", "prepare", "forward", "sample", "update", "total")}
    for _ in range(n):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        inputs = runner.prepare(out)
        sync()
        t2 = time.perf_counter()
        logits, greedy = runner.logits(inputs)
        sync()
        t3 = time.perf_counter()
        step_out = sample(runner, out, inputs, logits, greedy)
        t4 = time.perf_counter()
        sched.update(step_out)
        t5 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
            phases[k].append(v * 1e3)
    return {k: statistics.median(v) for k, v in phases.items()}


def engine_step_ms(engine: LLMEngine, n: int) -> float:
    """Median ms of the real `engine.step()` (no extra syncs; with async scheduling each call
    launches the next step and waits for the previous one)."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def forward_ms(engine: LLMEngine, n: int):
    """(eager forward ms without the LM head, graph replay ms with it, the step's inputs) of one
    decode step, CUDA events; the step is then sampled and updated like a real one."""
    runner = engine.runner
    engine.sync()
    out = engine.scheduler.schedule()
    inputs = runner.prepare(out)

    def time_it(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    eager = time_it(lambda: runner.forward(inputs.input_ids, inputs.positions, inputs.meta))
    graph = time_it(lambda: runner.graphs.run(inputs)) if runner.graphs is not None else None
    engine.scheduler.update(sample(runner, out, inputs, *runner.logits(inputs)))
    return eager, graph, inputs


def prefill_ms(engine: LLMEngine, n_req: int, length: int, reps: int, vocab: int, top: int) -> float:
    """Median ms of one engine step that prefills n_req fresh prompts of `length` tokens (one chunk
    of n_req * length tokens when the token budget allows); prints the kernel table of one more."""
    from torch.profiler import ProfilerActivity, profile

    ts = []
    for rep in range(reps + 2):
        prof = profile(activities=[ProfilerActivity.CUDA]) if rep == reps + 1 else None
        ids = [f"prefill-{rep}-{i}" for i in range(n_req)]
        for rid in ids:
            engine.add_request(rid, torch.randint(0, vocab, (length,)).tolist(),
                               SamplingParams(max_tokens=2, ignore_eos=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if prof is not None:
            with prof:
                engine.step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))
        else:
            engine.step()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        for rid in ids:
            engine.abort(rid)
        engine.step()
    return statistics.median(ts[1:])


def kernel_table(engine: LLMEngine, inputs, top: int, use_pdl: bool = True) -> str:
    """Kernel times of 3 eager forwards. A kernel launched with programmatic dependent launch starts
    while the one before runs, and its profiled time includes that wait: use_pdl False launches
    them without it (one forward first, to compile those variants), for times that add up."""
    from torch.profiler import ProfilerActivity, profile

    from cometserve.kernels import pdl

    runner = engine.runner
    pdl.ENABLED, was = use_pdl, pdl.ENABLED
    try:
        if not use_pdl:
            runner.forward(inputs.input_ids, inputs.positions, inputs.meta)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                runner.forward(inputs.input_ids, inputs.positions, inputs.meta)
            torch.cuda.synchronize()
    finally:
        pdl.ENABLED = was
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", default="llama-3-8b")
    p.add_argument("--modes", default="bf16,w4axkv4")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--memory-fraction", type=float, default=0.5)
    p.add_argument("--max-num-seqs", type=int, default=0, help="0: the largest --batch")
    p.add_argument("--no-pdl", action="store_true",
                   help="kernel table without programmatic dependent launch (PDL kernels' times include their wait)")
    p.add_argument("--prefill", default="", help="N:L: also time one step prefilling N prompts of L tokens")
    p.add_argument("--warm-prefill", type=int, default=0,
                   help="first run 8 requests of this many prompt tokens (4 output tokens) through the engine")
    args = p.parse_args()
    summary = []
    for mode in args.modes.split(","):
        loaded = build_random_model(args.random_weights, mode, device="cuda")
        batches = [int(b) for b in args.batch.split(",")]
        seqs = args.max_num_seqs or max(batches)
        engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(
            max_num_seqs=seqs, memory_fraction=args.memory_fraction))
        vocab = loaded.model.config.vocab_size
        if args.warm_prefill:
            for i in range(8):
                engine.add_request(f"warm-{i}", torch.randint(0, vocab, (args.warm_prefill,)).tolist(),
                                   SamplingParams(max_tokens=4, ignore_eos=True))
            while engine.has_unfinished():
                engine.step()
        if args.prefill:
            n_req, length = (int(x) for x in args.prefill.split(":"))
            ms = prefill_ms(engine, n_req, length, 5, vocab, args.top)
            print(f"\n=== {mode} prefill step {n_req} x {length} tokens: {ms:.1f} ms "
                  f"({n_req * length / ms:.0f} k tok/s)", flush=True)
        for b in batches:
            params = SamplingParams(max_tokens=4096, ignore_eos=True)
            g = torch.Generator().manual_seed(0)
            ids = [f"{mode}-{b}-{i}" for i in range(b)]
            for rid in ids:
                engine.add_request(rid, torch.randint(0, vocab, (args.context,), generator=g).tolist(), params)
            while engine.scheduler.num_waiting or any(
                    r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
                engine.step()
            engine.step()
            step = engine_step_ms(engine, args.steps)
            phases = timed_steps(engine, args.steps)
            eager, graph, inputs = forward_ms(engine, args.steps)
            print(f"\n=== {mode} batch {b} context {args.context}: engine.step {step:.2f} ms; phases (synced) "
                  + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
                  + f"; forward eager {eager:.2f} ms, graph {graph if graph is None else round(graph, 2)} ms",
                  flush=True)
            print(kernel_table(engine, inputs, args.top, not args.no_pdl), flush=True)
            summary.append((mode, b, step, phases, eager, graph))
            for rid in ids:
                engine.abort(rid)
            engine.step()
        del engine, loaded
        torch.cuda.empty_cache()
    print("\n| mode | batch | engine.step ms | forward (graph) ms | forward eager ms | prepare | sample | sched+update |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, b, step, ph, eager, graph in summary:
        print(f"| {mode} | {b} | {step:.2f} | {graph if graph is None else f'{graph:.2f}'} | {eager:.2f} | "
              f"{ph['prepare']:.2f} | {ph['sample']:.2f} | {ph['schedule'] + ph['update']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
