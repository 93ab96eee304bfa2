"""Time to first token of a lone request: the engine's prefill step (plus scheduling and the first
sample), with the piecewise CUDA graphs (engine/piecewise.py) and without (eager forward).

    PYTHONPATH=. python3 benchmarks/e2e/ttft.py --random-weights llama-3-8b --modes bf16,w4axkv4 \
        --lengths 16,128,512,1024,2048 --hf

For each mode (random weights of the real shape on the GPU) and each setting of the graphs, an engine
is built and warmed up (`LLMEngine.warm_up`), then for each prompt length --reps + 1 requests of fresh
random ids (prefix caching off) are run one at a time with max_tokens=1, from add_request to the
finished request, synchronised; the first is dropped, the median kept. `--hf`: Hugging Face
transformers in bf16 (same shape), one forward of the prompt and the argmax of its last row, timed
the same way. Writes ttft.json, a dated markdown table and ttft.png into --out-dir.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cometserve.engine.engine import EngineConfig, LLMEngine
from cometserve.engine.random_model import build_hf_model, build_random_model
from cometserve.kernels.timing import run_meta
from cometserve.sampling_params import SamplingParams


def timed(fn, reps: int) -> list[float]:
    """ms of reps + 1 synchronised calls, the first one (a warm-up) dropped."""
    ts = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts[1:]


def lone_request(engine: LLMEngine, vocab: int, n: int, g: torch.Generator) -> None:
    engine.add_request(f"ttft-{time.perf_counter_ns()}", torch.randint(0, vocab, (n,), generator=g).tolist(),
                       SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


def hf_first_token(model, vocab: int, n: int, g: torch.Generator) -> int:
    ids = torch.randint(0, vocab, (1, n), generator=g).cuda()
    return model(ids, logits_to_keep=1).logits[0, -1].argmax().item()


def bench_engine(args, mode: str, lengths: list[int], rows: list[dict]) -> None:
    loaded = build_random_model(args.random_weights, mode, device="cuda")
    vocab = loaded.model.config.vocab_size
    for pieces in (0, args.max_piecewise_tokens):
        engine = LLMEngine(loaded.model, loaded.scheme, EngineConfig(
            max_num_seqs=16, memory_fraction=args.memory_fraction, enable_prefix_caching=False,
            max_piecewise_tokens=pieces))
        if pieces and engine.runner.pieces is None:
            raise RuntimeError(f"piecewise graphs failed: {engine.runner.pieces_error}")
        engine.warm_up()
        g = torch.Generator().manual_seed(0)
        for n in lengths:
            add(rows, args, mode, bool(pieces), n, timed(partial(lone_request, engine, vocab, n, g), args.reps))
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    del loaded
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def bench_hf(args, lengths: list[int], rows: list[dict]) -> None:
    model = build_hf_model(args.random_weights)
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        add(rows, args, "hf_bf16", False, n,
            timed(partial(hf_first_token, model, model.config.vocab_size, n, g), args.reps))
    del model
    gc.collect()
    torch.cuda.empty_cache()


def add(rows: list[dict], args, mode: str, pieces: bool, n: int, ts: list[float]) -> None:
    rows.append({"model": Path(str(args.random_weights)).stem, "mode": mode, "piecewise_graphs": pieces,
                 "prompt_len": n, "ttft_ms": statistics.median(ts), "ttft_ms_runs": [round(t, 2) for t in ts]})
    print(f"[{mode}{' piecewise' if pieces else ''}] {n:>5} tokens: {rows[-1]['ttft_ms']:.1f} ms", flush=True)


def column(r: dict) -> str:
    return r["mode"] + (" graphs" if r["piecewise_graphs"] else (" eager" if r["mode"] != "hf_bf16" else ""))


def write(doc: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ttft.json").write_text(json.dumps(doc, indent=1) + "\n")
    rows = doc["rows"]
    cols = list(dict.fromkeys(column(r) for r in rows))
    lengths = sorted({r["prompt_len"] for r in rows})
    by = {(column(r), r["prompt_len"]): r["ttft_ms"] for r in rows}
    ratios = [(a, b) for a, b in (("w4axkv4 eager", "w4axkv4 graphs"), ("bf16 graphs", "w4axkv4 graphs"),
                                  ("hf_bf16", "w4axkv4 graphs")) if a in cols and b in cols]
    lines = [f"# Time to first token, lone request ({doc['date'][:10]})", "",
             (f"{doc['gpu']}, driver {doc['driver']}, torch {doc['torch']}, triton {doc['triton']}, commit "
              f"{doc['commit'][:7]}."), f"Command: `{doc['command']}`", "",
             ("Median ms (add_request to the finished 1-token request, synchronised; `graphs`: piecewise CUDA "
              "graphs, `eager`: none)."), "",
             "| prompt tokens | " + " | ".join(cols) + " | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |",
             "|---" * (1 + len(cols) + len(ratios)) + "|"]
    for n in lengths:
        cells = [f"{by[(c, n)]:.1f}" if (c, n) in by else "-" for c in cols]
        cells += [f"{by[(a, n)] / by[(b, n)]:.2f}x" if (a, n) in by and (b, n) in by else "-" for a, b in ratios]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    (out_dir / f"{doc['date'][:10]}-ttft.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in cols:
        xs = [n for n in lengths if (c, n) in by]
        ax.plot(xs, [by[(c, n)] for n in xs], marker="o", label=c)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token, ms")
    ax.set_title(f"{rows[0]['model']}, lone request ({doc['gpu']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "ttft.png", dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", default="llama-3-8b")
    p.add_argument("--modes", default="bf16,w4axkv4")
    p.add_argument("--lengths", default="16,128,512,1024,2048")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hf", action="store_true", help="also Hugging Face transformers bf16")
    p.add_argument("--max-piecewise-tokens", type=int, default=EngineConfig.max_piecewise_tokens)
    p.add_argument("--memory-fraction", type=float, default=0.4)
    p.add_argument("--commit", default=None, help="recorded commit (default: git HEAD)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows: list[dict] = []
    for mode in args.modes.split(","):
        bench_engine(args, mode, lengths, rows)
    if args.hf:
        bench_hf(args, lengths, rows)
    doc = {**run_meta(" ".join(["benchmarks/e2e/ttft.py", *sys.argv[1:]]), args.commit), "rows": rows}
    write(doc, Path(args.out_dir))
    print((Path(args.out_dir) / f"{doc['date'][:10]}-ttft.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
