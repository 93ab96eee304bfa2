"""End-to-end offline throughput of the engine: fixed input/output lengths, all requests queued at
once, greedy (or `--temperature T`, unseeded) with EOS ignored (every request runs to its output length).

    PYTHONPATH=. python3 benchmarks/e2e/throughput.py --random-weights llama-3-8b \
        --modes bf16,w4axkv4,hf --cases 1024x512:512,1024x512:32,128x128:1024,mixed:512,b1:128x512

A case `IxO:N` runs N requests of I prompt tokens (random ids) and O output tokens; `b1:IxO` is one
request alone (batch-1 decode); `mixed:N` runs N requests of input lengths uniform in [64, 2048] and
output lengths uniform in [32, 1024] (seeded). Each mode builds its model (random weights of the real shape, on
the GPU), sizes its KV cache from the free memory, captures decode CUDA graphs, warms up on a few
short requests, then times each case. Writes throughput.json (schema of issue 6) and a dated
markdown table and a bar plot (throughput.png) into --out-dir. Mode `hf` is Hugging Face
transformers `generate` in bf16 on the batch-1 case and on cases of at most --hf-max-batch requests.
`--gpu-memory-gib N` runs each mode as on a GPU of N GiB: a ballast tensor holds the rest of the
device's memory while the mode runs, so weights, working memory and the KV cache (hence the largest
batch) fit as they would there; bandwidth and compute stay this GPU's. Its rows' cases carry the cap.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
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
from cometserve.model.layers.lm_head import LM_HEADS
from cometserve.sampling_params import SamplingParams

MIXED = (64, 2048, 32, 1024)  # `mixed:N`: input lengths uniform in [64, 2048], outputs in [32, 1024]


def parse_cases(spec: str) -> list[tuple[str, int, int, int]]:
    """'1024x512:128,b1:128x256,mixed:256' -> [(label, input_len, output_len, num_requests)]
    (mixed: input_len = output_len = 0, lengths drawn per request by `lengths`)."""
    cases = []
    for item in spec.split(","):
        if item.startswith("b1:"):
            i, o = map(int, item[3:].split("x"))
            cases.append(("batch1", i, o, 1))
        elif item.startswith("mixed:"):
            cases.append((f"mixed x{item[6:]}", 0, 0, int(item[6:])))
        else:
            lens, n = item.split(":")
            i, o = map(int, lens.split("x"))
            cases.append((f"{i}/{o} x{n}", i, o, int(n)))
    return cases


def lengths(input_len: int, output_len: int, num_requests: int, seed: int) -> list[tuple[int, int]]:
    """(input, output) length of each request: fixed, or drawn uniformly from MIXED (seeded)."""
    if input_len:
        return [(input_len, output_len)] * num_requests
    g = torch.Generator().manual_seed(seed + 1)
    lo_i, hi_i, lo_o, hi_o = MIXED
    ins = torch.randint(lo_i, hi_i + 1, (num_requests,), generator=g).tolist()
    outs = torch.randint(lo_o, hi_o + 1, (num_requests,), generator=g).tolist()
    return list(zip(ins, outs))


def run_case(engine: LLMEngine, input_len: int, output_len: int, num_requests: int, vocab: int, seed: int,
             tag: str, temperature: float = 0.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = lengths(input_len, output_len, num_requests, seed)
    for i, (n_in, n_out) in enumerate(lens):
        engine.add_request(f"{tag}-{i}", torch.randint(0, vocab, (n_in,), generator=g).tolist(),
                           SamplingParams(max_tokens=n_out, ignore_eos=True, temperature=temperature))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    max_batch, out_tokens, steps = 0, 0, 0
    step_ms = []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        ts = time.perf_counter()
        for d in engine.step():
            out_tokens += len(d.new_token_ids)
        step_ms.append((time.perf_counter() - ts) * 1e3)
        steps += 1
        max_batch = max(max_batch, engine.scheduler.num_running)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    slowest = max(range(len(step_ms)), key=step_ms.__getitem__)
    step_ms.sort()
    return {
        "input_len": input_len, "output_len": output_len, "num_requests": num_requests, "max_batch": max_batch,
        "output_tokens_per_s": out_tokens / dt, "total_tokens_per_s": (out_tokens + sum(i for i, _ in lens)) / dt,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": dt, "steps": steps,
        "output_tokens": out_tokens, "step_ms_p50": step_ms[len(step_ms) // 2],
        "step_ms_p99": step_ms[min(len(step_ms) - 1, int(0.99 * len(step_ms)))], "step_ms_max": step_ms[-1],
        "slowest_step": slowest, "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries,
    }


def ballast(gib: float | None) -> torch.Tensor | None:
    """A tensor holding this GPU's memory above `gib` GiB (None without a cap): the memory a GPU of
    that size would not have."""
    if not gib:
        return None
    extra = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory - int(gib * 2**30)
    if extra <= 0:
        raise SystemExit(f"--gpu-memory-gib {gib}: this GPU has no more than that")
    return torch.empty(extra, dtype=torch.uint8, device="cuda")


def case_label(label: str, gib: float | None) -> str:
    return f"{label} @{gib:g}GiB" if gib else label


def bench_mode(args, mode: str, cases, rows: list[dict]) -> None:
    """Append one row per case to `rows`, rewriting the result files after each (a run cut off
    by a time limit keeps what it measured)."""
    held = ballast(args.gpu_memory_gib)  # before the model: everything after sizes itself from what is left
    t0 = time.perf_counter()
    # no prefix caching: cases share the seed, so a later case's prompts repeat an earlier one's
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       memory_fraction=args.memory_fraction, use_cuda_graphs=not args.no_cuda_graphs,
                       enable_prefix_caching=False, max_piecewise_tokens=args.max_piecewise_tokens,
                       lm_head=args.lm_head)
    if args.tp is None:
        loaded = build_random_model(args.random_weights, mode, device="cuda", rotate=False if args.no_rotation else None)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = LLMEngine(loaded.model, loaded.scheme, cfg)
    else:  # every rank builds its shard and its engine; rank 0 (this process) schedules
        from cometserve.distributed.engine import ModelSpec, create_engine

        spec = ModelSpec(random_weights=str(args.random_weights), mode=mode, rotate=False if args.no_rotation else None)
        engine, t_build = create_engine(args.tp, spec, cfg), 0.0
        loaded = engine.loaded
    engine.warm_up()  # one process or a tensor-parallel driver alike
    t_engine = time.perf_counter() - t0
    runner = engine.runner
    print(f"[{mode}] built in {t_build:.1f} s; engine (KV {engine.storage.num_pages} pages of "
          f"{engine.storage.page_size} = {engine.storage.num_bytes / 2**30:.1f} GiB, graphs "
          f"{'on' if runner.graphs else 'off: ' + str(runner.graphs_error)}, attention: {runner.attn.reason}) "
          f"in {t_engine:.1f} s", flush=True)
    vocab = loaded.model.config.vocab_size
    for _label, i, o, n in cases:  # warm-up: compiles and tunes every kernel at these step shapes
        run_case(engine, i or 1024, 4, min(8, n, args.max_num_seqs), vocab, 1, f"warm{i}-{n}")
    for label, i, o, n in cases:
        r = run_case(engine, i, o, n, vocab, 0, f"{label}", args.temperature)
        case = case_label(label, args.gpu_memory_gib) + (f" T={args.temperature:g}" if args.temperature else "")
        r = {"model": Path(str(args.random_weights)).stem, "mode": mode, "lm_head": args.lm_head,
             "case": case, "gpu_memory_gib": args.gpu_memory_gib, "temperature": args.temperature,
             "rotation": loaded.scheme.a_rotation == "hadamard" and not args.no_rotation and mode != "bf16",
             "cuda_graphs": runner.graphs is not None, "piecewise_graphs": runner.pieces is not None,
             "tensor_parallel": args.tp.world_size if args.tp else 1, **r}
        rows.append(r)
        print(f"[{mode}] {label:>9} x{n:<4} max_batch {r['max_batch']:4d}  {r['output_tokens_per_s']:9.1f} out tok/s  "
              f"{r['total_tokens_per_s']:9.1f} total tok/s  {r['seconds']:6.1f} s  peak {r['peak_mem_gib']:.1f} GiB  "
              f"step ms p50 {r['step_ms_p50']:.2f} p99 {r['step_ms_p99']:.2f} max {r['step_ms_max']:.0f} (step {r['slowest_step']}, alloc retries {r['alloc_retries']})",
              flush=True)
        write_results(args, rows, Path(args.out_dir))
    del engine, runner, loaded, held
    if args.tp is not None:
        from cometserve.distributed.engine import free_engine

        free_engine(args.tp)
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def bench_hf(args, cases, rows: list[dict]) -> None:
    """Hugging Face transformers `generate` in bf16 (random weights of the same shape, eager, its
    default dynamic cache): the batch-1 case and every case of at most --hf-max-batch requests, run
    as one batch of equal-length prompts."""
    from cometserve.engine.random_model import build_hf_model

    torch.manual_seed(0)
    model = build_hf_model(args.random_weights)
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    for label, i, o, n in cases:
        if not i or n > args.hf_max_batch:
            continue
        ids = torch.randint(0, vocab, (n, i), generator=torch.Generator().manual_seed(0)).cuda()
        kw = {"do_sample": False, "pad_token_id": 0}
        warm = ids[:, :16]
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, min_new_tokens=4, **kw)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=o, min_new_tokens=o, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out_tokens = (out.shape[1] - i) * n
        r = {"model": Path(str(args.random_weights)).stem, "mode": "hf_bf16", "case": case_label(label, args.gpu_memory_gib), "rotation": False,
             "cuda_graphs": False, "input_len": i, "output_len": o, "num_requests": n, "max_batch": n,
             "output_tokens_per_s": out_tokens / dt, "total_tokens_per_s": (out_tokens + i * n) / dt,
             "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": dt, "steps": out.shape[1] - i,
             "output_tokens": out_tokens}
        rows.append(r)
        print(f"[hf_bf16] {label:>9} x{n:<4} {r['output_tokens_per_s']:9.1f} out tok/s  {dt:6.1f} s", flush=True)
        write_results(args, rows, Path(args.out_dir))
    del model
    gc.collect()
    torch.cuda.empty_cache()


def write_plot(rows: list[dict], path: Path) -> None:
    """Output tokens/s per case, one bar per mode (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    label = (lambda r: f"{r['model']} {r['case']}") if len(models) > 1 else (lambda r: r["case"])
    cases = list(dict.fromkeys(label(r) for r in rows))
    def series(r: dict) -> str:
        tp = r.get("tensor_parallel", 1)
        return mode_label(r) + (f" on {tp} GPUs" if tp > 1 else "")

    modes = list(dict.fromkeys(series(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        vals = {label(r): r["output_tokens_per_s"] for r in rows if series(r) == mode}
        xs = [c + j * width for c, case in enumerate(cases) if case in vals]
        ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=mode)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases)
    ax.set_yscale("log")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{', '.join(models)}: end-to-end throughput")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(args, rows: list[dict], out_dir: Path) -> None:
    from cometserve.kernels.timing import run_meta

    meta = run_meta(" ".join(["benchmarks/e2e/throughput.py", *sys.argv[1:]]), args.commit)
    write_doc({**meta, "rows": [{**r, "commit": meta["commit"], "command": meta["command"]} for r in rows]},
              out_dir, args.name)


def mode_label(r: dict) -> str:
    """A row's mode as tables, plots and merges tell rows apart: the schema's `mode`, plus the LM
    head where it is the INT8 one (a row field of its own, EngineConfig.lm_head)."""
    return r["mode"] + ("+int8-head" if r.get("lm_head") == "int8" else "")


def merge(paths: list[str], out_dir: Path, name: str) -> None:
    """One document from --out-dir's NAME.json and several runs' throughput.json (same GPU and
    versions): rows keep their own commit and command; a later file's row replaces an earlier one of
    the same model, mode, case and tensor-parallel size."""
    current = out_dir / f"{name}.json"  # the rows already there stay unless a run replaces them
    paths = [current] * (current.is_file() and all(Path(p).resolve() != current.resolve() for p in paths)) + paths
    docs = [json.loads(Path(p).read_text()) for p in paths]
    rows: dict[tuple, dict] = {}
    for d in docs:
        for r in d["rows"]:
            key = (r["model"], mode_label(r), r["case"], r.get("tensor_parallel", 1))
            rows[key] = {**r, "commit": r.get("commit", d["commit"]), "command": r.get("command", d["command"])}
    last = docs[-1]
    commands = list(dict.fromkeys(r["command"] for r in rows.values()))
    write_doc({**{k: last.get(k) for k in ("gpu", "driver", "torch", "triton", "commit")}, "command": " ; ".join(commands),
               "rows": list(rows.values())}, out_dir, name)


def write_doc(doc: dict, out_dir: Path, name: str) -> None:
    """NAME.json, the dated markdown table and NAME.png."""
    rows = doc["rows"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    commands = list(dict.fromkeys(r.get("command", doc["command"]) for r in rows))
    lines = [f"# End-to-end throughput{'' if name == 'throughput' else ', ' + name} ({datetime.date.today()})", "",
             (f"GPU {doc['gpu']} (driver {doc.get('driver') or 'not recorded'}), torch {doc['torch']}, triton "
              f"{doc['triton']}. Commands (each row's commit in "
             f"{name}.json):"), "", *[f"- `{c}`" for c in commands], "",
             ("| model | mode | GPUs | case | requests | max batch | output tok/s | total tok/s | seconds | "
             "step ms p50 | peak GiB | commit |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p50 = f"{r['step_ms_p50']:.2f}" if "step_ms_p50" in r else "-"
        lines.append(f"| {r['model']} | {mode_label(r)} | {r.get('tensor_parallel', 1)} | {r['case']} | "
                     f"{r['num_requests']} | {r['max_batch']} | {r['output_tokens_per_s']:.0f} | {r['total_tokens_per_s']:.0f} | {r['seconds']:.1f} | {p50} | "
                     f"{r['peak_mem_gib']:.1f} | {r.get('commit', doc['commit'])} |")
    lines.append("")
    by = {(r["model"], mode_label(r), r["case"], r.get("tensor_parallel", 1)): r["output_tokens_per_s"] for r in rows}
    for (model, mode, case, tp), v in sorted(by.items()):
        for base in ("bf16", "hf_bf16"):
            if mode not in ("bf16", "hf_bf16") and (model, base, case, tp) in by:
                lines.append(f"- {model} {mode} / {base} at {case}{f' on {tp} GPUs' if tp > 1 else ''}: "
                             f"{v / by[(model, base, case, tp)]:.2f}x output tokens/s")
        if tp > 1 and (model, mode, case, 1) in by:
            lines.append(f"- {model} {mode} at {case}: {tp} GPUs / 1 GPU {v / by[(model, mode, case, 1)]:.2f}x "
                         "output tokens/s")
    dated = sorted(out_dir.glob(f"????-??-??-{name}.md"))  # the newest table's hand-written Notes are kept
    notes = dated[-1].read_text().partition("\n## Notes")[2] if dated else ""
    (out_dir / f"{datetime.date.today()}-{name}.md").write_text(
        "\n".join(lines) + "\n" + ("\n## Notes" + notes if notes else ""))
    write_plot(rows, out_dir / f"{name}.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", help="llama-2-7b | llama-3-8b | llama-2-13b | llama-3-70b | config.json")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these runs' throughput.json into --out-dir")
    p.add_argument("--modes", default="bf16,w4axkv4", help="of bf16, w4a8kv4, w4axkv4, hf (transformers generate)")
    p.add_argument("--hf-max-batch", type=int, default=64, help="hf mode runs cases of at most this many requests")
    p.add_argument("--cases", default="1024x512:128,128x128:256,b1:128x256")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature, unseeded (0: greedy, the default); the case label says T=")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--memory-fraction", type=float, default=0.9)
    p.add_argument("--lm-head", choices=LM_HEADS, default="16bit", help="EngineConfig.lm_head")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="run as on a GPU of this many GiB (a ballast tensor holds the rest; one process only)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--max-piecewise-tokens", type=int, default=EngineConfig.max_piecewise_tokens,
                   help="piecewise CUDA graphs for steps up to this many tokens (0: those steps run eagerly)")
    p.add_argument("--no-rotation", action="store_true", help="w4axkv4 without the Hadamard rotation of INT4 blocks")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse; copies without .git)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="throughput", help="result files: NAME.json, DATE-NAME.md, NAME.png")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N GPUs (one process each, spawned here or started by torchrun)")
    p.add_argument("--distributed", action="store_true",
                   help="use the tensor-parallel engine even for N = 1 (NCCL collectives, CUDA graphs around them)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, Path(args.out_dir), args.name)
        return 0
    if not args.random_weights:
        parser.error("--random-weights is required")
    if not torch.cuda.is_available():
        print("throughput.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.tensor_parallel > 1 or args.distributed:
        if args.gpu_memory_gib:
            parser.error("--gpu-memory-gib takes one process (no tensor parallel)")
        from cometserve.distributed.launch import run_tensor_parallel

        return run_tensor_parallel(args.tensor_parallel, lambda tp: run_modes(args, tp)) or 0
    return run_modes(args, None)


def run_modes(args, tp) -> int:
    """Every mode in turn; `tp`: rank 0's ParallelContext, or None for one process."""
    args.tp = tp
    cases = parse_cases(args.cases)
    rows: list[dict] = []
    failed = []
    for mode in args.modes.split(","):
        try:
            bench_hf(args, cases, rows) if mode == "hf" else bench_mode(args, mode, cases, rows)
        except Exception as e:  # one process: report, free the GPU, measure the next mode
            if tp is not None:  # the other ranks may be stuck in a collective: stop everything
                raise
            traceback.print_exc()
            failed.append(f"{mode}: {type(e).__name__}: {e}")
            gc.collect()
            torch.cuda.empty_cache()
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
