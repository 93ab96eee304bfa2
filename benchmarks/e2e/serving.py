"""Online serving benchmark: requests arrive at a given rate (Poisson) over HTTP, streamed through
the OpenAI-compatible server (`cometserve serve`); reports throughput and TTFT/TPOT p50/p99.

    PYTHONPATH=. python3 benchmarks/e2e/serving.py --random-weights llama-3-8b --mode w4axkv4 \
        --input-len 1024 --output-len 128 --num-prompts 200 --rates 4,16,inf

The script starts the server itself (`--random-weights NAME` or `--model CHECKPOINT`, extra server
flags through `--server-args`) on a free loopback port and waits for /health, or measures a running
one (`--url http://host:port`). Every request is `/v1/completions` with `stream: true`, a prompt of
`--input-len` random token ids, `max_tokens = --output-len`, greedy, EOS ignored, so each request
generates exactly `--output-len` tokens. A few short requests warm the server up first (kernel
compilation, CUDA graphs). For each rate (requests/s; `inf` sends all at once) it records:

- TTFT: request sent -> first streamed chunk; TPOT: (latency - TTFT) / (output tokens - 1), per request;
- ITL: gaps between consecutive chunks; throughput: requests, output tokens, and all tokens per second
  over the wall time from the first request sent to the last response finished.

Writes serving.json and a dated <date>-serving.md into --out-dir (GPU, driver, torch, triton,
commit, command). The client uses httpx2 (the openai client's transport) and no GPU itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import httpx2 as httpx  # the openai client's transport
except ImportError:  # the same API under its older name (GPU machine image)
    import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PROMPT_VOCAB = 32000  # random prompt ids below this are valid for every LLaMA-family vocabulary


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunk_times, usage, error = [], None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    error = data["error"].get("message")
                elif data.get("choices"):
                    chunk_times.append(time.perf_counter())
                if data.get("usage"):
                    usage = data["usage"]
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if error or usage is None or not chunk_times:
        return {"ok": False, "error": error or "stream ended without usage or tokens"}
    out = usage["completion_tokens"]
    ttft = chunk_times[0] - t0
    return {"ok": True, "ttft": ttft, "latency": end - t0, "output_tokens": out,
            "prompt_tokens": usage["prompt_tokens"], "tpot": (end - t0 - ttft) / (out - 1) if out > 1 else None,
            "itl": np.diff(chunk_times).tolist(), "start": t0, "end": end}


async def run_rate(url: str, model: str, prompts: list[list[int]], output_len: int, rate: float,
                   seed: int) -> list[dict]:
    """All prompts, each sent after an exponential gap of mean 1/rate (Poisson arrivals)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600), limits=limits) as client:
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(client, model, prompt, output_len)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def summarize(results: list[dict], rate: float, input_len: int, output_len: int) -> dict:
    ok = [r for r in results if r["ok"]]
    row = {"rate": "inf" if rate == float("inf") else rate, "input_len": input_len, "output_len": output_len,
           "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
           "errors": sorted({r["error"] for r in results if not r["ok"]})[:5]}
    if not ok:
        return row
    wall = max(r["end"] for r in ok) - min(r["start"] for r in ok)
    out_tokens = sum(r["output_tokens"] for r in ok)
    row.update(seconds=wall, request_throughput=len(ok) / wall, output_tokens_per_s=out_tokens / wall,
               total_tokens_per_s=(out_tokens + sum(r["prompt_tokens"] for r in ok)) / wall)
    series = {"ttft": [r["ttft"] for r in ok], "tpot": [r["tpot"] for r in ok if r["tpot"] is not None],
              "itl": [x for r in ok for x in r["itl"]], "latency": [r["latency"] for r in ok]}
    for name, xs in series.items():
        if xs:
            row[f"{name}_ms"] = {"mean": 1e3 * float(np.mean(xs)), "p50": 1e3 * float(np.percentile(xs, 50)),
                                 "p99": 1e3 * float(np.percentile(xs, 99))}
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    source = [args.model] if args.model else ["--random-weights", args.random_weights, "--mode", args.mode]
    cmd = [sys.executable, "-m", "cometserve.cli", "serve", *source, "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(max(256, args.num_prompts)),
           "--log-level", "warning", *shlex.split(args.server_args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}", cmd


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float, log_path: str | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log_path).read_text()[-4000:] if log_path else ""
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server at {url} was not healthy within {timeout} s")


def environment(args) -> dict:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:  # nvidia-smi, not torch.cuda: the client must not take GPU memory from the server
        q = subprocess.check_output(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                    text=True, stderr=subprocess.DEVNULL).splitlines()[0]
        gpu, driver = (s.strip() for s in q.split(","))
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        gpu, driver = "none (CPU)", "none"
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {"gpu": gpu, "driver": driver, "torch": version("torch"), "triton": version("triton"), "commit": commit,
            "command": " ".join(["benchmarks/e2e/serving.py", *map(shlex.quote, args.argv)])}


def write_results(doc: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Online serving ({datetime.date.today()})", "",
             (f"GPU {doc['gpu']} (driver {doc['driver']}), torch {doc['torch']}, triton {doc['triton']}, "
              f"commit {doc['commit']}."), f"Model: {doc['model']}. Server: `{doc['server_command']}`",
             f"Command: `{doc['command']}`", "",
             ("| rate (req/s) | in/out | done/sent | req/s | out tok/s | total tok/s | TTFT p50 / p99 ms | "
              "TPOT p50 / p99 ms | ITL p50 / p99 ms |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if not r["completed"]:
            lines.append(f"| {r['rate']} | {r['input_len']}/{r['output_len']} | 0/{r['num_requests']} | "
                         f"failed: {'; '.join(r['errors'])} |||||")
            continue
        pct = {k: f"{r[k]['p50']:.1f} / {r[k]['p99']:.1f}" if k in r else "-" for k in ("ttft_ms", "tpot_ms", "itl_ms")}
        lines.append(f"| {r['rate']} | {r['input_len']}/{r['output_len']} | {r['completed']}/{r['num_requests']} | "
                     f"{r['request_throughput']:.2f} | {r['output_tokens_per_s']:.0f} | {r['total_tokens_per_s']:.0f} | "
                     f"{pct['ttft_ms']} | {pct['tpot_ms']} | {pct['itl_ms']} |")
    (out_dir / f"{datetime.date.today()}-serving.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--random-weights", help="start `cometserve serve --random-weights NAME` (llama-3-8b, ...)")
    src.add_argument("--model", help="start `cometserve serve MODEL` (a checkpoint or model directory)")
    src.add_argument("--url", help="measure the server already running here")
    p.add_argument("--mode", default="w4axkv4", choices=("bf16", "w4a8kv4", "w4axkv4"), help="with --random-weights")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--server-args", default="", help="more `cometserve serve` flags, e.g. '--device cpu --num-pages 64'")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--rates", default="4,16,inf", help="comma-separated request rates (req/s); inf = all at once")
    p.add_argument("--num-warmup", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse; copies without .git)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    return p


def measure(args, url: str, server: str, proc: subprocess.Popen | None, log_path: str | None) -> int:
    """Warm up, run every rate, write the results after each; 0 if no request failed."""
    wait_healthy(url, proc, args.startup_timeout, log_path)
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    rng = random.Random(args.seed)
    warm = [[rng.randrange(PROMPT_VOCAB) for _ in range(args.input_len)] for _ in range(args.num_warmup)]
    if warm:
        asyncio.run(run_rate(url, model, warm, min(args.output_len, 8), float("inf"), args.seed))
    doc = {**environment(args), "model": model, "server_command": server, "rows": []}
    for rate in (float(r) for r in args.rates.split(",")):
        prompts = [[rng.randrange(PROMPT_VOCAB) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        row = summarize(asyncio.run(run_rate(url, model, prompts, args.output_len, rate, args.seed)), rate,
                        args.input_len, args.output_len)
        doc["rows"].append(row)
        write_results(doc, Path(args.out_dir))
        if row["completed"]:
            print(f"rate {row['rate']}: {row['completed']}/{row['num_requests']} done, "
                  f"{row['request_throughput']:.2f} req/s, {row['output_tokens_per_s']:.0f} out tok/s, "
                  f"TTFT p50 {row['ttft_ms']['p50']:.1f} p99 {row['ttft_ms']['p99']:.1f} ms, "
                  f"TPOT p50 {row.get('tpot_ms', {}).get('p50', float('nan')):.1f} "
                  f"p99 {row.get('tpot_ms', {}).get('p99', float('nan')):.1f} ms", flush=True)
        else:
            print(f"rate {row['rate']}: every request failed: {row['errors']}", flush=True)
    return 0 if all(r["failed"] == 0 for r in doc["rows"]) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.url:
        return measure(args, args.url.rstrip("/"), f"external, at {args.url}", None, None)
    fd, log_path = tempfile.mkstemp(prefix="cometserve-serve-", suffix=".log")
    with os.fdopen(fd, "w+") as log:
        proc, url, cmd = start_server(args, log)
        server = " ".join(["cometserve", *cmd[3:]])
        print(f"server: {server} (log {log_path})", flush=True)
        try:
            return measure(args, url, server, proc, log_path)
        finally:
            proc.terminate()  # SIGTERM: the server drains and exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
