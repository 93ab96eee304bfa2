"""End-to-end offline throughput of the engine: fixed input/output lengths, all requests queued at
once, greedy with EOS ignored (every request runs to its output length).

    PYTHONPATH=. python3 benchmarks/e2e/throughput.py --random-weights llama-3-8b \
        --modes bf16,w4axkv4 --cases 1024x512:128,128x128:256,b1:128x256

A case `IxO:N` runs N requests of I prompt tokens (random ids) and O output tokens; `b1:IxO` is one
request alone (batch-1 decode). Each mode builds its model (random weights of the real shape, on
the GPU), sizes its KV cache from the free memory, captures decode CUDA graphs, warms up on a few
short requests, then times each case. Writes throughput.json (schema of issue 6) and a dated
markdown table into --out-dir.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.random_model import build_random_model
from cometserve.sampling_params import SamplingParams


def parse_cases(spec: str) -> list[tuple[str, int, int, int]]:
    """'1024x512:128,b1:128x256' -> [(label, input_len, output_len, num_requests)]."""
    cases = []
    for item in spec.split(","):
        if item.startswith("b1:"):
            i, o = map(int, item[3:].split("x"))
            cases.append(("batch1", i, o, 1))
        else:
            lens, n = item.split(":")
            i, o = map(int, lens.split("x"))
            cases.append((f"{i}/{o}", i, o, int(n)))
    return cases


def run_case(engine: LLMEngine, input_len: int, output_len: int, num_requests: int, vocab: int, seed: int,
             tag: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    for i in range(num_requests):
        engine.add_request(f"{tag}-{i}", torch.randint(0, vocab, (input_len,), generator=g).tolist(), params)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    max_batch, out_tokens, steps = 0, 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for d in engine.step():
            out_tokens += len(d.new_token_ids)
        steps += 1
        max_batch = max(max_batch, engine.scheduler.num_running)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "input_len": input_len, "output_len": output_len, "num_requests": num_requests, "max_batch": max_batch,
        "output_tokens_per_s": out_tokens / dt, "total_tokens_per_s": (out_tokens + input_len * num_requests) / dt,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": dt, "steps": steps,
        "output_tokens": out_tokens,
    }


def bench_mode(args, mode: str, cases, rows: list[dict]) -> None:
    """Append one row per case to `rows`, rewriting the result files after each (a run cut off
    by a time limit keeps what it measured)."""
    t0 = time.perf_counter()
    loaded = build_random_model(args.random_weights, mode, device="cuda", rotate=False if args.no_rotation else None)
    t_build = time.perf_counter() - t0
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       memory_fraction=args.memory_fraction, use_cuda_graphs=not args.no_cuda_graphs)
    t0 = time.perf_counter()
    engine = LLMEngine(loaded.model, loaded.scheme, cfg)
    t_engine = time.perf_counter() - t0
    runner = engine.runner
    print(f"[{mode}] built in {t_build:.1f} s; engine (KV {engine.storage.num_pages} pages of "
          f"{engine.storage.page_size} = {engine.storage.num_bytes / 2**30:.1f} GiB, graphs "
          f"{'on' if runner.graphs else 'off: ' + str(runner.graphs_error)}, attention: {runner.attn.reason}) "
          f"in {t_engine:.1f} s", flush=True)
    vocab = loaded.model.config.vocab_size
    for _label, i, o, _n in cases:  # warm-up: compiles and tunes every kernel at these shapes
        run_case(engine, i, min(o, 4), min(8, args.max_num_seqs), vocab, 1, f"warm{i}")
    for label, i, o, n in cases:
        r = run_case(engine, i, o, n, vocab, 0, f"{label}")
        r = {"model": Path(str(args.random_weights)).stem, "mode": mode, "case": label,
             "rotation": loaded.scheme.a_rotation == "hadamard" and not args.no_rotation and mode != "bf16",
             "cuda_graphs": runner.graphs is not None, **r}
        rows.append(r)
        print(f"[{mode}] {label:>9} x{n:<4} max_batch {r['max_batch']:4d}  {r['output_tokens_per_s']:9.1f} out tok/s  "
              f"{r['total_tokens_per_s']:9.1f} total tok/s  {r['seconds']:6.1f} s  peak {r['peak_mem_gib']:.1f} GiB",
              flush=True)
        write_results(args, rows, Path(args.out_dir))
    del engine, runner, loaded
    gc.collect()
    torch.cuda.empty_cache()


def write_results(args, rows: list[dict], out_dir: Path) -> None:
    import triton

    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": commit, "command": " ".join(["benchmarks/e2e/throughput.py", *sys.argv[1:]]), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# End-to-end throughput ({datetime.date.today()})", "",
             f"GPU {doc['gpu']}, torch {doc['torch']}, triton {doc['triton']}, commit {commit}.",
             f"Command: `{doc['command']}`", "",
             "| model | mode | case | requests | max batch | output tok/s | total tok/s | seconds | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['case']} | {r['num_requests']} | {r['max_batch']} | "
                     f"{r['output_tokens_per_s']:.0f} | {r['total_tokens_per_s']:.0f} | {r['seconds']:.1f} | "
                     f"{r['peak_mem_gib']:.1f} |")
    by = {(r["mode"], r["case"]): r["output_tokens_per_s"] for r in rows}
    for (mode, case), v in sorted(by.items()):
        if mode != "bf16" and ("bf16", case) in by:
            lines.append(f"\n{mode} / bf16 at {case}: {v / by[('bf16', case)]:.2f}x output tokens/s")
    (out_dir / f"{datetime.date.today()}-throughput.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", required=True, help="llama-2-7b | llama-3-8b | llama-2-13b | llama-3-70b | config.json")
    p.add_argument("--modes", default="bf16,w4axkv4")
    p.add_argument("--cases", default="1024x512:128,128x128:256,b1:128x256")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--memory-fraction", type=float, default=0.9)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-rotation", action="store_true", help="w4axkv4 without the Hadamard rotation of INT4 blocks")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse; copies without .git)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("throughput.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cases = parse_cases(args.cases)
    rows: list[dict] = []
    failed = []
    for mode in args.modes.split(","):
        try:
            bench_mode(args, mode, cases, rows)
        except Exception as e:  # noqa: BLE001 - report, free the GPU, measure the next mode
            traceback.print_exc()
            failed.append(f"{mode}: {type(e).__name__}: {e}")
            gc.collect()
            torch.cuda.empty_cache()
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
