"""Benchmark of the W4Ax GEMM (issue 4) against cuBLAS bf16, cuBLAS FP8 (per-row scales) and
torch._int_mm, plus the fused activation quantization against the copy ceiling.

    PYTHONPATH=. python benchmarks/kernels/bench_gemm.py [--quick] [--out DIR]
    python benchmarks/kernels/bench_gemm.py --render benchmarks/results/gemm.json  # md + png only

Timings (kernels/timing.py): every peer and the W4Ax kernel alike run back to back from a CUDA graph,
each call on its own copy of the weights (copies spanning ROTATE_BYTES, 4x the 50 MB L2), so weights
come from DRAM as they would in a model and no launch gap or L2 flush enters the figure; medians of
9 replays. The ablation tables (--variants, --sweep) use do_bench (L2 flushed by a write before each
call): compare them only among themselves.
The GEMM reads activation codes in int8 containers whatever the block map, so its time does not
depend on the INT4 fraction; the other fractions are timed at a subset of M to show that.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from datetime import date
from pathlib import Path

SHAPES = {  # name: (N, K)
    "llama3-8b qkv": (6144, 4096), "llama3-8b o": (4096, 4096),
    "llama3-8b gate_up": (28672, 4096), "llama3-8b down": (4096, 14336),
    "llama3-70b qkv": (10240, 8192), "llama3-70b o": (8192, 8192),
    "llama3-70b gate_up": (57344, 8192), "llama3-70b down": (8192, 28672),
    "llama2-7b qkv": (12288, 4096), "llama2-7b gate_up": (22016, 4096), "llama2-7b down": (4096, 11008),
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
MS_ACT = [1, 16, 256, 4096, 8192]
FRACTIONS = [0.84, 0.75, 1.0, 0.0]
SUBSET_M = [1, 16, 256, 4096]  # where the non-default fractions are timed
FP8_FROM_M = 128  # the FP8 path is timed from here (the layer uses it from gemm_fp8.MIN_M)
BUCKETS = [("M<=16", 1, 16), ("M 32-256", 32, 256), ("M 512", 512, 512), ("M>=1024", 1024, 1 << 30)]


ROTATE_BYTES = 200e6  # > 4x the 50 MB L2: rotating weight copies makes every call read from DRAM


def _bench(fn) -> float:
    """do_bench median (flushes L2 before each call); used for the register-trick ablations."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # us


def _copies(nbytes: int) -> int:
    from cometserve.kernels import timing

    return timing.copies_for(nbytes, ROTATE_BYTES)


def _time_calls(calls) -> float:
    """Median us per call, graph-replayed over rotating copies (kernels/timing.py, module doc)."""
    from cometserve.kernels import timing

    return timing.graph_us(calls)


def _operands(m, n, k, frac, dev, copies=1):
    """Activation codes of one [m, k] input quantized with an INT4 fraction `frac`, and `copies`
    prepared weight sets."""
    import torch

    from cometserve.kernels import gemm_w4ax, quant_act

    nb = k // 128
    bits = torch.full((nb,), 4, dtype=torch.uint8, device=dev)
    bits[: round(nb * (1 - frac))] = 8
    bits = bits[torch.randperm(nb, device=dev)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    codes, scales = quant_act.quant_act(x, torch.randperm(k, device=dev), bits)
    weights = []
    for _ in range(copies):
        qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
        ws = (torch.rand(n, nb, device=dev) * 0.01 + 1e-3).half()
        weights.append(gemm_w4ax.prepare_weights(qw, ws))
    return x, (codes, scales) + weights[0], weights, bits


def _peers(x, n, k, dev):
    """cuBLAS bf16, FP8 per-row, int_mm times (us) for this M; None where a peer cannot run."""
    import torch
    import torch.nn.functional as F

    m = x.shape[0]
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(_copies(n * k * 2))]
    out = {"cublas_bf16": _time_calls([lambda w=w: F.linear(x, w) for w in ws])}
    try:
        xa = x.to(torch.float8_e4m3fn)
        w8 = [w.to(torch.float8_e4m3fn) for w in ws[: _copies(n * k)]]
        w8 += [torch.randn(n, k, device=dev).to(torch.float8_e4m3fn) for _ in range(_copies(n * k) - len(w8))]
        sa, sb = torch.rand(m, 1, device=dev), torch.rand(1, n, device=dev)
        out["cublas_fp8"] = _time_calls([
            lambda w=w: torch._scaled_mm(xa, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            for w in w8])
    except RuntimeError:
        out["cublas_fp8"] = None
    try:
        xi = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
        wis = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev) for _ in range(_copies(n * k))]
        out["int_mm"] = _time_calls([lambda w=w: torch._int_mm(xi, w.t()) for w in wis])
    except RuntimeError:
        out["int_mm"] = None
    return out


def _progress(it, total):
    try:
        from tqdm import tqdm

        return tqdm(it, total=total, file=sys.stderr, mininterval=5)
    except ImportError:
        return it


def run_gemm(shapes, ms, fractions, dev, dump=None):
    import torch

    from cometserve.kernels import gemm_fp8, gemm_w4ax

    fp8 = gemm_fp8.can_implement(4096, 4096, 4, torch.bfloat16, torch.device(dev))[0]
    rows = []
    pts = [(s, m) for s in shapes for m in ms]
    for name, m in _progress(pts, len(pts)):
        n, k = SHAPES[name]
        torch.manual_seed(m)
        peers = None
        for frac in fractions:
            if frac != fractions[0] and m not in SUBSET_M:
                continue
            x, ops, weights, bits = _operands(m, n, k, frac, dev, _copies(n * k // 2))
            if peers is None:
                peers = _peers(x, n, k, dev)
            gemm_w4ax.w4ax_gemm(*ops, None, torch.bfloat16)  # first call of a bucket tunes it
            us = {"w4ax_tuned": _time_calls([lambda w=w, a=ops[:2]: gemm_w4ax.w4ax_gemm(*a, *w, None, torch.bfloat16)
                                             for w in weights])}
            if fp8 and m >= FP8_FROM_M:
                plan = gemm_fp8.plan(bits)
                us["w4ax_fp8"] = _time_calls([lambda w=w, a=ops[:2], p=plan: gemm_fp8.w4ax_gemm(
                    *a, *w, None, torch.bfloat16, p) for w in weights])
            # what a layer runs (model/layers/linear.py): the FP8 path from gemm_fp8.MIN_M rows
            us["w4ax"] = us["w4ax_fp8"] if fp8 and m >= gemm_fp8.MIN_M else us["w4ax_tuned"]
            cfg = gemm_w4ax._config_for(*ops, None, torch.empty(m, n, device=dev, dtype=torch.bfloat16))
            rows.append({"shape": name, "N": n, "K": k, "M": m, "int4_fraction": frac,
                         "us": {**peers, **us}, "config": cfg.__dict__})
        if dump is not None and m == ms[-1]:
            dump(rows)  # partial results survive a time limit
    return rows


# Act-quant inputs: (name, K, residual, RMSNorm, permutation, gated). The served ones: every layer
# input of an FMPQ model (qkv and gate_up read x + residual, write the sum, RMSNorm, gather; o gathers;
# down's permutation is folded into gate_up's rows, so it reads [gate | up] and fuses SiLU-and-multiply);
# then the bare RMSNorm + gather and plain inputs that this table had before (fewer bytes per row).
ACT_INPUTS = [
    ("8B qkv/gate_up", 4096, True, True, True, False), ("8B o", 4096, False, False, True, False),
    ("8B down", 14336, False, False, False, True), ("70B qkv/gate_up", 8192, True, True, True, False),
    ("70B o", 8192, False, False, True, False), ("70B down", 28672, False, False, False, True),
    ("norm+perm", 4096, False, True, True, False), ("norm+perm", 8192, False, True, True, False),
    ("plain", 14336, False, False, False, False),
]


def run_act(ms, dev):
    """Fused act-quant GB/s over the bytes each input moves, and the copy ceiling (both directions);
    `fp8` rows: the form a served input takes from gemm_fp8.MIN_M rows (the FP8 GEMM's operand)."""
    import torch

    from cometserve.kernels import gemm_fp8, quant_act

    big = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    copy_gbs = 2 * big.numel() / _time_calls([lambda: big.clone()]) / 1e3
    out = {"copy_GBps": copy_gbs, "rows": []}
    for (name, k, res, norm, has_perm, gated), rot in itertools.product(ACT_INPUTS, (False, True)):
        nb = k // 128
        bits = (torch.rand(nb, device=dev) < 0.16).to(torch.uint8) * 4 + 4
        plan = gemm_fp8.plan(bits)
        perm = torch.randperm(k, device=dev).int() if has_perm else None
        nw = torch.rand(k, device=dev, dtype=torch.bfloat16) if norm else None
        for m in ms:
            width = 2 * k if gated else k
            x = torch.randn(m, width, device=dev, dtype=torch.bfloat16)
            r = torch.randn(m, k, device=dev, dtype=torch.bfloat16) if res else None
            # from MIN_M rows a served layer input is written as the FP8 GEMM's operand (K' codes, nb' scales)
            for fp8 in (None, plan) if m >= gemm_fp8.MIN_M and name[0].isdigit() else (None,):
                kq, nbq = (k, nb) if fp8 is None else (plan.num_blocks * 128, plan.num_blocks)
                moved = m * width * 2 + (4 * m * k if res else 0) + m * kq + m * nbq * 4
                xs = [x] + [torch.randn_like(x) for _ in range(_copies(moved) - 1)]
                us = _time_calls([lambda x=x, perm=perm, bits=bits, nw=nw, rot=rot, r=r, gated=gated, fp8=fp8:
                                  quant_act.quant_act(x, perm, bits, nw, 1e-6, rot, gated, r, fp8) for x in xs])
                out["rows"].append({"input": name, "M": m, "K": k, "residual": res, "norm": nw is not None,
                                    "perm": perm is not None, "gated": gated, "rotate": rot, "fp8": fp8 is not None,
                                    "us": us, "GBps": moved / us / 1e3, "of_copy": moved / us / 1e3 / copy_gbs})
    return out


def run_variants(dev):
    """Ablation of the 32-bit packed mask widening against byte ops, at a decode and a prefill point."""
    import torch

    from cometserve.kernels import gemm_w4ax as g

    res = []
    for name, m in (("llama3-8b gate_up", 16), ("llama3-8b gate_up", 4096), ("llama3-8b qkv", 4096)):
        n, k = SHAPES[name]
        _, ops, _w, _bits = _operands(m, n, k, 0.84, dev)
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        cfg = g._config_for(*ops, None, y)
        for asm in (True, False):
            t = _bench(lambda cfg=cfg, ops=ops, y=y, asm=asm: g._launch(cfg, *ops, None, y, use_asm=asm))
            res.append({"shape": name, "M": m, "asm_masks": asm, "us": t, "config": cfg.__dict__})
    return res


def run_diag(dev):
    """Compiler report per candidate config: registers, spills, and which MMA the PTX uses."""
    import torch

    from cometserve.kernels import gemm_w4ax as g

    out = []
    for name, m in (("llama3-8b gate_up", 16), ("llama3-8b gate_up", 256), ("llama3-8b gate_up", 4096)):
        n, k = SHAPES[name]
        _, ops, _w, _bits = _operands(m, n, k, 0.84, dev)
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        for cfg in g.candidates(m, n, k // 128, dev):
            h = g._launch(cfg, *ops, None, y)
            ptx = h.asm.get("ptx", "")
            out.append({"M": m, "config": cfg.__dict__, "regs": h.n_regs, "spills": h.n_spills,
                        "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx,
                        "cvt_rn_f32_s32": ptx.count("cvt.rn.f32.s32")})
            print(out[-1])
    return out


def run_sweep(dev):
    """Every candidate config (and a few extra) at chosen points."""
    import torch

    from cometserve.kernels import gemm_w4ax as g

    C = g.GemmConfig
    big = [C(64, 128, 1, 8, 4, 3, True, 1), C(128, 128, 1, 8, 8, 3, True, 2), C(128, 128, 1, 8, 8, 3, False, 2),
           C(128, 128, 1, 8, 8, 4, True, 2), C(256, 64, 1, 8, 8, 4, True, 2), C(256, 64, 1, 8, 8, 3, False, 2),
           C(128, 64, 1, 8, 4, 4, True, 2), C(128, 64, 1, 8, 4, 3, False, 2), C(256, 128, 1, 8, 8, 3, False, 2),
           C(128, 128, 1, 16, 8, 3, True, 2)]
    res = []
    small = [C(64, 16, 8, 8, 4, 3), C(128, 16, 6, 8, 8, 3), C(128, 16, 6, 8, 4, 4, True, 2)]
    for name, m in (("llama3-8b qkv", 1), ("llama3-8b gate_up", 1),
                    ("llama3-8b gate_up", 4096), ("llama3-8b qkv", 4096), ("llama3-8b gate_up", 256),
                    ("llama3-8b o", 1024)):
        n, k = SHAPES[name]
        _, ops, _w, _bits = _operands(m, n, k, 0.84, dev)
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        for cfg in small if m <= 16 else big:
            t = _bench(lambda cfg=cfg, ops=ops, y=y: g._launch(cfg, *ops, None, y))
            h = g._launch(cfg, *ops, None, y)
            res.append({"shape": name, "M": m, "config": cfg.__dict__, "us": t,
                        "regs": h.n_regs, "spills": h.n_spills, "smem": h.metadata.shared})
            print(f"{name:18s} M={m:5d} {cfg} {t:8.1f} us regs={h.n_regs} "
                  f"spills={h.n_spills} smem={h.metadata.shared}", flush=True)
    return res


def _env(args):
    from cometserve.kernels.timing import run_meta

    meta = run_meta("python " + " ".join(sys.argv), os.environ.get("BENCH_COMMIT"))
    return {**meta, "commit": meta["commit"][:7], "date": str(date.today())}


def _geo(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(res) -> str:
    rows = [r for r in res["rows"] if r["int4_fraction"] == 0.84]
    lines = [(f"GPU {res['gpu']}, driver {res['driver']}, torch {res['torch']}, triton {res['triton']}, "
              f"commit {res['commit']}"), f"command: `{res['command']}`"]
    lines += [f"Rows at M {', '.join(map(str, r['M']))} re-timed at commit {r['commit']} on {r['date']} with their "
              f"peers in that run: `{r['command']}`" for r in res.get("reruns", [])]
    lines += ["",
             "| bucket | W4Ax vs bf16 (geomean) | W4Ax vs FP8 (geomean) | min vs FP8 |", "|---|---|---|---|"]
    for label, lo, hi in BUCKETS:
        sel = [r for r in rows if lo <= r["M"] <= hi]
        vb = [r["us"]["cublas_bf16"] / r["us"]["w4ax"] for r in sel]
        vf = [r["us"]["cublas_fp8"] / r["us"]["w4ax"] for r in sel if r["us"]["cublas_fp8"]]
        if vb:
            lines.append(f"| {label} | {_geo(vb):.2f}x | {_geo(vf) or 0:.2f}x | {min(vf or [0]):.2f}x |")
    lines += ["", ("W4Ax = what a layer runs: the tuned kernel (the Triton kernel, or from 65 rows the wgmma "
              "CUDA kernel where the tuner picks it: config column), or from gemm_fp8.MIN_M rows the cuBLAS "
              "block-scaled FP8 path (both columns shown where timed)."), "",
              ("| shape | M | bf16 us | fp8 us | int_mm us | W4Ax us | vs bf16 | vs fp8 | tuned kernel us | "
               "FP8 path us | config |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u = r["us"]
        f = lambda v: f"{v:.1f}" if v else "-"
        c = r.get("config") or {}
        cs = (f"{c.get('backend', 'triton')} {c.get('block_n')}x{c.get('block_m')} s{c.get('split_k')} "
              f"w{c.get('num_warps')} st{c.get('num_stages')}") if c else ""
        lines.append(f"| {r['shape']} | {r['M']} | {f(u['cublas_bf16'])} | {f(u['cublas_fp8'])} | "
                     f"{f(u['int_mm'])} | {f(u['w4ax'])} | {u['cublas_bf16'] / u['w4ax']:.2f}x | "
                     f"{(u['cublas_fp8'] or 0) / u['w4ax']:.2f}x | {f(u.get('w4ax_tuned', u.get('w4ax_triton')))} | "
                     f"{f(u.get('w4ax_fp8'))} | {cs} |")
    other = [r for r in res["rows"] if r["int4_fraction"] != 0.84]
    if other:
        lines += ["", "Other INT4 fractions (W4Ax us): " + ", ".join(
            f"{r['shape']} M={r['M']} f={r['int4_fraction']}: {r['us']['w4ax']:.1f}" for r in other)]
    if res.get("act"):
        a = res["act"]
        when = f", commit {a['commit']}{', ' + a['date'] if a.get('date') else ''}, `{a['command']}`" if a.get("commit") else ""
        lines += ["", f"Fused act-quant (copy ceiling {a['copy_GBps']:.0f} GB/s{when}):", "",
                  "| input | K | fused | rotate | M | us | GB/s | of copy |", "|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            fused = "+".join(f for f in ("residual", "norm", "perm", "gated", "fp8") if r.get(f)) or "-"
            lines.append(f"| {r.get('input', '')} | {r['K']} | {fused} | {r['rotate']} | {r['M']} | {r['us']:.1f} | "
                         f"{r['GBps']:.0f} | {r['of_copy']:.0%} |")
    if res.get("variants"):
        lines += ["", "| variant shape | M | asm masks | us |", "|---|---|---|---|"]
        lines += [f"| {v['shape']} | {v['M']} | {v['asm_masks']} | {v['us']:.1f} |"
                  for v in res["variants"]]
    return "\n".join(lines)


def render(res, md_path: Path, png_path: Path) -> None:
    md_path.write_text("# W4Ax GEMM benchmark\n\n" + summarize(res) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.cm.tab20(range(len(SHAPES)))
    for color, name in zip(colors, SHAPES):
        rs = sorted((r for r in res["rows"] if r["shape"] == name and r["int4_fraction"] == 0.84),
                    key=lambda r: r["M"])
        if rs:
            ax.plot([r["M"] for r in rs], [r["us"]["cublas_bf16"] / r["us"]["w4ax"] for r in rs],
                    marker="o", ms=3, label=name, color=color,
                    ls={"llama3-8b": "-", "llama3-70b": "--"}.get(name.split()[0], ":"))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup over cuBLAS bf16")
    ax.set_title(f"W4Ax (84% INT4 blocks) on {res['gpu']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 shapes, 6 M values, 84%% only")
    p.add_argument("--variants", action="store_true", help="also time the register-trick ablations")
    p.add_argument("--sweep", action="store_true", help="only time every config at a few points")
    p.add_argument("--diag", action="store_true", help="also print the compiler report per config")
    p.add_argument("--out", default="benchmarks/results", help="folder for gemm.json / md / png")
    p.add_argument("--render", help="only render md + png from this gemm.json")
    p.add_argument("--ms", help="only re-time these M values (comma-separated), every shape and fraction as "
                   "usual, and replace their rows in the existing gemm.json (the run is listed under 'reruns')")
    p.add_argument("--act-only", action="store_true",
                   help="only re-time the fused act-quant and replace that part of an existing gemm.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.act_only:
        import torch

        res = json.loads((out / "gemm.json").read_text())
        env = _env(args)
        res["act"] = {**run_act(MS_ACT, torch.device("cuda")), "commit": env["commit"], "command": env["command"],
                      "date": env["date"]}
        (out / "gemm.json").write_text(json.dumps(res, indent=1))
        render(res, out / f"{env['date']}-gemm.md", out / "gemm.png")  # named by this run, as --ms does
        print(summarize(res))
        return
    if args.ms:
        import torch

        res = json.loads((out / "gemm.json").read_text())
        ms = [int(v) for v in args.ms.split(",")]
        env = _env(args)
        assert env["gpu"] == res["gpu"], f"gemm.json is from {res['gpu']}, this GPU is {env['gpu']}"
        new = run_gemm(list(SHAPES), ms, FRACTIONS, torch.device("cuda"))
        res["rows"] = [r for r in res["rows"] if r["M"] not in ms] + new
        res["rows"].sort(key=lambda r: (list(SHAPES).index(r["shape"]), r["M"], -r["int4_fraction"]))
        res.setdefault("reruns", []).append({"M": ms, "commit": env["commit"], "command": env["command"],
                                             "date": env["date"]})
        (out / "gemm.json").write_text(json.dumps(res, indent=1))
        render(res, out / f"{env['date']}-gemm.md", out / "gemm.png")
        print(summarize(res))
        return
    if args.render:
        res = json.loads(Path(args.render).read_text())
        render(res, out / f"{res.get('date', date.today())}-gemm.md", out / "gemm.png")
        return
    import torch

    dev = torch.device("cuda")
    shapes = list(SHAPES)[:4] if args.quick else list(SHAPES)
    ms = [1, 16, 64, 256, 1024, 4096] if args.quick else MS
    fr = [0.84] if args.quick else FRACTIONS
    res = _env(args)
    if args.sweep:
        res["sweep"] = run_sweep(dev)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(res, indent=1))
        return
    if args.diag:
        res["diag"] = run_diag(dev)
    out.mkdir(parents=True, exist_ok=True)
    res["act"] = run_act([1, 16, 256, 4096] if args.quick else MS_ACT, dev)

    def dump(rows):
        (out / "gemm.json").write_text(json.dumps({**res, "rows": rows}, indent=1))

    res["rows"] = run_gemm(shapes, ms, fr, dev, dump)
    if args.variants:
        res["variants"] = run_variants(dev)
    (out / "gemm.json").write_text(json.dumps(res, indent=1))
    print(summarize(res))
    try:
        render(res, out / f"{res['date']}-gemm.md", out / "gemm.png")
    except ImportError:
        (out / f"{res['date']}-gemm.md").write_text("# W4Ax GEMM benchmark\n\n" + summarize(res) + "\n")


if __name__ == "__main__":
    main()
