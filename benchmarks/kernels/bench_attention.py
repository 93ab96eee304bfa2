"""Paged INT4-KV attention against its peers (issue 5), Llama-3-8B heads: 32 q, 8 kv, dim 128.

Decode, batch {1, 8, 32, 128} x context {512, 2048, 8192, 32768}: our KV4 kernel (CUDA on GPU,
decode_cuda.py) and its portable Triton version, PyTorch SDPA on contiguous bf16 K/V (enable_gqa),
and the bf16 paged version of our own (Triton) kernel. Prefill, prompt
{512, 2048, 8192}, without and with a cached prefix of the same length: our KV4 prefill kernel
(and, separately, the write of the prompt into the cache) vs SDPA bf16 causal. A whole prompt (no
prefix) attends over its own rows, dequantized in place by the write, as the engine runs it; the
gather path it replaced is timed beside it (kv4_gather).

Timing: CUDA graphs (triton.testing.do_bench_cudagraph, median), so launch overhead is out of
every peer alike. Decode inputs rotate over R copies (R x the bf16 footprint >= 256 MB) so no peer
is served from the 50 MB L2; the KV4 copies are 0.28x as large, so at the smallest sizes they may
still partly hit L2 (noted in the table). Effective TB/s = packed KV bytes read (codes, scales,
zeros, window) / time.

    PYTHONPATH=. python benchmarks/kernels/bench_attention.py [--quick] [--check] [--sweep]
    PYTHONPATH=. python benchmarks/kernels/bench_attention.py --render   # md + png from the json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import warnings

import torch

HQ, HKV, D, G = 32, 8, 128, 64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _bench(fn) -> float:
    """Median microseconds of fn under a CUDA graph."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def _sdpa(q, k, v, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


def _sdpa_best(make_fn) -> tuple[float, str]:
    """The fastest SDPA backend that takes the case (never the math fallback): (us, backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (float("inf"), "none")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                fn = make_fn()
                fn()
                torch.cuda.synchronize()
                us = _bench(fn)
        except RuntimeError as e:
            print(f"  sdpa {backend.name}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        best = min(best, (us, backend.name))
    return best


def _fill_kv4(k_all, v_all, bt_all, page, dtype):
    """KV4 cache holding every sequence of k_all [S, Hkv, L, D] (pages by bt_all [S, L/P])."""
    from cometserve.kernels import kv_cache, ref

    s, _, ctx, _ = k_all.shape
    cache = ref.PagedKVCache.allocate(bt_all.numel(), HKV, D, s, dtype, "cuda", page, G)
    i32 = {"dtype": torch.int32, "device": "cuda"}
    cu, cl = torch.tensor([0, ctx], **i32), torch.tensor([ctx], **i32)
    for i in range(s):
        kv_cache.write_kv(k_all[i].transpose(0, 1), v_all[i].transpose(0, 1), cache, bt_all[i:i + 1], cu, cl,
                          torch.tensor([i], **i32), max_seqlen_q=ctx)
    return cache


def _pages_bf16(x_all, bt_all, page):
    s, _, ctx, _ = x_all.shape
    pages = torch.empty(bt_all.numel(), HKV, page, D, dtype=x_all.dtype, device="cuda")
    src = x_all.view(s, HKV, ctx // page, page, D).permute(0, 2, 1, 3, 4).reshape(-1, HKV, page, D)
    pages[bt_all.view(-1).long()] = src
    return pages


def decode_row(batch: int, ctx: int, page: int = 64, splits=(None,), dtype=torch.bfloat16,
               peers: bool = True, variants: dict | None = None) -> dict:
    from cometserve.kernels import attention

    bf16_bytes = batch * ctx * HKV * D * 2 * 2
    rot = max(1, min(64, math.ceil(256e6 / bf16_bytes)))
    need = rot * bf16_bytes * (2 + 0.3) + bf16_bytes // 2  # sdpa K/V + bf16 pages + kv4 + staging
    free = torch.cuda.mem_get_info()[0]
    row = {"kind": "decode", "batch": batch, "context": ctx, "page": page, "rotation": rot}
    if need > 0.9 * free:
        return {**row, "skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    s = rot * batch
    k_all = torch.randn(s, HKV, ctx, D, device="cuda", dtype=dtype)
    v_all = torch.randn(s, HKV, ctx, D, device="cuda", dtype=dtype)
    bt_all = torch.randperm(s * (ctx // page), device="cuda").to(torch.int32).view(s, ctx // page)
    cache = _fill_kv4(k_all, v_all, bt_all, page, dtype)
    kp, vp = _pages_bf16(k_all, bt_all, page), _pages_bf16(v_all, bt_all, page)
    q_all = torch.randn(rot, batch, HQ, D, device="cuda", dtype=dtype)
    ctx_t = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    slots = torch.arange(s, dtype=torch.int32, device="cuda").view(rot, batch)
    bts = bt_all.view(rot, batch, -1)
    scale = D**-0.5
    kv4_bytes = cache.bytes_per_token() * batch * ctx  # windows are empty: ctx is a multiple of G
    torch.cuda.synchronize()  # do_bench_cudagraph runs on a side stream: the data must be ready

    def kv4(ns, cfg=None):
        return lambda: [attention.decode_attention(q_all[r], cache, bts[r], ctx_t, slots[r], scale,
                                                   max_context_len=ctx, num_splits=ns, config=cfg)
                        for r in range(rot)]

    us = {}
    for ns in splits:
        us[f"kv4_s{ns}" if ns else "kv4"] = _bench(kv4(ns)) / rot
    for name, (ns, cfg) in (variants or {}).items():
        us[name] = _bench(kv4(ns, cfg)) / rot
    if not peers:
        return {**row, "us": us}
    us["kv4_triton"] = _bench(kv4(None, {"impl": "triton"})) / rot  # the portable (previous) kernel
    us["bf16_paged"] = _bench(lambda: [attention.decode_attention_bf16(
        q_all[r], kp, vp, bts[r], ctx_t, scale, max_context_len=ctx) for r in range(rot)]) / rot
    kp = vp = None  # free the bf16 pages before SDPA runs
    kq = k_all.view(rot, batch, HKV, ctx, D)
    vq = v_all.view(rot, batch, HKV, ctx, D)
    qs = q_all.unsqueeze(3)  # [rot, B, Hq, 1, D]
    sdpa_us, row["sdpa_backend"] = _sdpa_best(lambda: lambda: [_sdpa(qs[r], kq[r], vq[r]) for r in range(rot)])
    us["sdpa_bf16"] = sdpa_us / rot
    # accuracy on the benchmark's data (first rotation): KV4 vs bf16 SDPA
    out = attention.decode_attention(q_all[0], cache, bts[0], ctx_t, slots[0], scale, max_context_len=ctx)
    exact = _sdpa(qs[0], kq[0], vq[0]).squeeze(2)
    err = float((out.float() - exact.float()).norm() / exact.float().norm())
    best = us.get("kv4", min(v for k_, v in us.items() if k_.startswith("kv4")))
    return {**row, "us": us, "kv_bytes": int(kv4_bytes), "kv_bytes_bf16": bf16_bytes,
            "tbps_kv4": kv4_bytes / best / 1e6, "tbps_sdpa": bf16_bytes / us["sdpa_bf16"] / 1e6,
            "speedup_vs_sdpa": us["sdpa_bf16"] / best, "rel_err_vs_bf16": err}


def prefill_row(prompt: int, prefix: int, dtype=torch.bfloat16, variants: dict | None = None) -> dict:
    from torch.nn.attention.bias import causal_lower_right

    from cometserve.kernels import attention, kv_cache, prefill_flash, ref

    ctx, page = prefix + prompt, 64
    i32 = {"dtype": torch.int32, "device": "cuda"}
    k = torch.randn(1, HKV, ctx, D, device="cuda", dtype=dtype)
    v = torch.randn(1, HKV, ctx, D, device="cuda", dtype=dtype)
    q = torch.randn(1, HQ, prompt, D, device="cuda", dtype=dtype)
    bt = torch.randperm(ctx // page, device="cuda").to(torch.int32)[None]
    cache = ref.PagedKVCache.allocate(ctx // page, HKV, D, 1, dtype, "cuda", page, G)
    slot = torch.zeros(1, **i32)
    if prefix:
        kv_cache.write_kv(k[0, :, :prefix].transpose(0, 1), v[0, :, :prefix].transpose(0, 1), cache, bt,
                          torch.tensor([0, prefix], **i32), torch.tensor([prefix], **i32), slot, prefix)
    # the new rows as the model's fused qkv projection leaves them: strided views of one [prompt, ...] tensor
    qkv = torch.cat([x[0, :, -prompt:].transpose(0, 1).reshape(prompt, -1) for x in (q, k, v)], dim=1)
    qt, kn, vn = (qkv[:, a * D:b * D].view(prompt, -1, D) for a, b in ((0, HQ), (HQ, HQ + HKV), (HQ + HKV, HQ + 2 * HKV)))
    cu, cl = torch.tensor([0, prompt], **i32), torch.tensor([ctx], **i32)
    # a whole prompt (no prefix) attends over its own rows, which the write dequantizes in place, as
    # the engine does (engine/attention.py); after a prefix, over the cache (gather + flash)
    into = None if prefix else prefill_flash.own_rows_into(kn, vn, 0, [0, prompt])

    def write():
        kv_cache.write_kv(kn, vn, cache, bt, cu, cl, slot, prompt, dequantize_into=into)

    write()
    scale = D**-0.5
    torch.cuda.synchronize()  # do_bench_cudagraph runs on a side stream: the data must be ready
    def run(cfg=None):
        return attention.prefill_attention(qt, cache, bt, cu, cl, slot, scale, prompt, ctx, config=cfg)

    def own():
        return prefill_flash.flash_own_rows(qt, *into, cu, prompt, scale)

    out = run() if prefix else own()
    own_diff = float((out.float() - run().float()).abs().max())  # 0: the same values, the same flash
    us = {"kv4": _bench(run if prefix else own), "kv4_fused": _bench(lambda: run({"impl": "fused"})),
          "kv4_write": _bench(write)}
    if not prefix:
        us["kv4_gather"] = _bench(run)
    for name, cfg in (variants or {}).items():
        us[name] = _bench(lambda cfg=cfg: run({"impl": "fused", **cfg}))
    mask = {"is_causal": True} if not prefix else {"attn_mask": causal_lower_right(prompt, ctx)}
    us["sdpa_bf16"], backend = _sdpa_best(lambda: lambda: _sdpa(q, k, v, **mask))
    exact = _sdpa(q, k, v, **mask)[0].transpose(0, 1)
    err = float((out.float() - exact.float()).norm() / exact.float().norm())
    flops = 4 * HQ * D * prompt * (prefix + (prompt + 1) / 2)
    return {"kind": "prefill", "batch": 1, "context": ctx, "prompt": prompt, "prefix": prefix, "us": us,
            "sdpa_backend": backend,
            "kv_bytes": int(cache.bytes_per_token() * ctx), "tflops_kv4": flops / us["kv4"] / 1e6,
            "tflops_sdpa": flops / us["sdpa_bf16"] / 1e6, "ratio_kv4_over_sdpa": us["kv4"] / us["sdpa_bf16"],
            "rel_err_vs_bf16": err, "own_rows_vs_gather_max_diff": own_diff}


def gpu_check() -> None:
    """The GPU cases of tests/kernels (for machines without pytest)."""
    for name in ("test_kv_cache", "test_attention"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tests", "kernels", name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for dtype in (torch.bfloat16, torch.float16):
            steps = [[1000, 1, 64, 300, 63], [1] * 5, [130, 64, 1, 2, 1], [1] * 5]
            if name == "test_kv_cache":
                for hd, page in ((128, 64), (64, 128)):
                    mod.run_write_case(8, hd, 64, page, steps, device="cuda", dtype=dtype)
            else:
                for hkv, rep, hd, page in ((8, 4, 128, 64), (4, 1, 64, 128), (2, 7, 128, 64)):
                    mod.run_attention_case(hkv, rep, hd, 64, page, steps, device="cuda", dtype=dtype,
                                           splits=(None, 1, 5))
                mod.run_attention_case(8, 4, 128, 64, 64, [[1000], [1], [130]], device="cuda", dtype=dtype)
        print(f"gpu check {name}: ok", flush=True)
    err = mod.quantization_error(device="cuda", length=4000, kv_heads=8, head_dim=128)
    print(f"KV4 vs bf16 attention on Gaussian K/V, relative error {err:.3f}", flush=True)


def md_name(res: dict) -> str:
    """The dated table of a run: <date of the run>-attention.md."""
    return f"{res['date'][:10]}-attention.md"


def render(res: dict) -> str:
    lines = [f"# Paged INT4-KV attention vs bf16 ({res['gpu']})", "",
             (f"torch {res['torch']}, triton {res['triton']}, driver {res['driver']}, commit {res['commit']}, "
              f"{res['date']}."), f"Command: `{res['command']}`", "",
             (f"KV bytes per token and layer (Llama-3-8B, 8 KV heads x 128): KV4 "
              f"{res['kv_bytes_per_token']['kv4']:.0f} (codes + fp16 scales/zeros per 64 tokens) vs bf16 "
              f"{res['kv_bytes_per_token']['bf16']:.0f}: {res['kv_bytes_per_token']['ratio']:.3f}x. The 16-bit "
              "window (64 tokens per sequence) is per-sequence overhead, excluded."), "",
             "## Decode (one query per sequence, CUDA-graph medians, us)", "",
             ("| batch | context | SDPA bf16 | bf16 paged (ours) | KV4 Triton | KV4 (ours) | speedup vs SDPA "
              "| KV4 TB/s | SDPA TB/s | rel err vs bf16 |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["kind"] != "decode":
            continue
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['context']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        u = r["us"]
        lines.append(f"| {r['batch']} | {r['context']} | {u['sdpa_bf16']:.1f} ({r['sdpa_backend']}) | "
                     f"{u['bf16_paged']:.1f} | {u.get('kv4_triton', float('nan')):.1f} | "
                     f"{u['kv4']:.1f} | {r['speedup_vs_sdpa']:.2f}x | {r['tbps_kv4']:.2f} | {r['tbps_sdpa']:.2f} | "
                     f"{r['rel_err_vs_bf16']:.3f} |")
    lines += ["", "## Prefill (batch 1, causal; the prefix is already in the KV4 cache)", "",
              ("| prompt | prefix | SDPA bf16 us (backend) | KV4 us (flash) | KV4 / SDPA | KV4 gather + flash us | "
               "KV4 fused Triton us | KV4 write us | KV4 TFLOP/s | SDPA TFLOP/s | rel err vs bf16 |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["kind"] != "prefill":
            continue
        u = r["us"]
        lines.append(f"| {r['prompt']} | {r['prefix']} | {u['sdpa_bf16']:.1f} ({r['sdpa_backend']}) | "
                     f"{u['kv4']:.1f} | {r['ratio_kv4_over_sdpa']:.2f} | {u.get('kv4_gather', u['kv4']):.1f} | "
                     f"{u['kv4_fused']:.1f} | {u['kv4_write']:.1f} | "
                     f"{r['tflops_kv4']:.0f} | {r['tflops_sdpa']:.0f} | {r['rel_err_vs_bf16']:.3f} |")
    lines += ["", ("KV4 (flash): without a prefix, flash over the prompt's own rows, which the write (KV4 write "
                   "column) leaves dequantized; after a prefix, the gather + flash path. Relative error: KV4 "
                   "output vs SDPA on the unquantized bf16 K/V (random Gaussian K/V, a hard case for 4 bits; "
                   "real K/V are smoother).")]
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["kind"] == "decode" and "us" in r]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for b in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == b]
        ax[0].plot([r["context"] for r in sel], [r["speedup_vs_sdpa"] for r in sel], marker="o", label=f"batch {b}")
        ax[1].plot([r["context"] for r in sel], [r["tbps_kv4"] for r in sel], marker="o", label=f"batch {b}")
    ax[0].axhline(2.5, color="gray", ls="--", label="target 2.5x")
    ax[1].axhline(2.5, color="gray", ls="--", label="target 2.5 TB/s")
    for a, title in zip(ax, ("KV4 decode speedup vs SDPA bf16", "KV4 decode effective TB/s (packed bytes)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("context")
        a.set_title(title)
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"Llama-3-8B heads (32q/8kv/128), {res['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _log(out_dir: str, line: str) -> None:
    print(line, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.log"), "a") as f:
        f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few sizes only")
    ap.add_argument("--check", action="store_true", help="run the GPU correctness cases first")
    ap.add_argument("--sweep", action="store_true", help="split counts and page sizes, printed only")
    ap.add_argument("--render", action="store_true", help="md and png from the json, no GPU")
    ap.add_argument("--prefill-only", action="store_true", help="skip the decode rows")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--commit", default=None, help="commit to record (the device copy has no .git)")
    args = ap.parse_args()
    json_path = os.path.join(args.out, "attention.json")
    if args.render:
        with open(json_path) as f:
            res = json.load(f)
        with open(os.path.join(args.out, md_name(res)), "w") as f:
            f.write(render(res))
        plot(res, os.path.join(args.out, "attention.png"))
        return
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explains each backend it skips
    torch.manual_seed(0)
    if args.check:
        gpu_check()
    if args.sweep:
        variants = {"triton": (None, {"impl": "triton"}), "ring2": (None, {"num_warps": 2, "stages": 2}),
                    "direct4": (None, {"num_warps": 4, "stages": 0}), "ring1w": (None, {"num_warps": 1, "stages": 2}),
                    "ring3w1": (None, {"num_warps": 1, "stages": 3}), "tpw2": (None, {"min_tiles_per_warp": 2})}
        for b, c in ((8, 2048), (8, 8192), (1, 32768), (128, 2048), (32, 8192)):
            r = decode_row(b, c, 64, splits=(None, 16), peers=False, variants=variants)
            _log(args.out, f"sweep b={b} ctx={c}: " + ", ".join(f"{k}={v:.1f}" for k, v in r["us"].items()))
        pv = {"r128_w8": {"rows": 128, "num_warps": 8}, "st3": {"num_stages": 3}}
        for p, prefix in ((2048, 0), (8192, 0), (2048, 2048)):
            r = prefill_row(p, prefix, variants=pv)
            _log(args.out, f"sweep prefill {p}+{prefix}: " + ", ".join(f"{k}={v:.1f}" for k, v in r["us"].items()))
    batches, contexts = ((8, 32), (2048, 8192)) if args.quick else ((1, 8, 32, 128), (512, 2048, 8192, 32768))
    prompts = (2048,) if args.quick else (512, 2048, 8192)
    rows = []
    for p in prompts:
        for prefix in (0, p):
            rows.append(prefill_row(p, prefix))
            print(json.dumps(rows[-1]), flush=True)
    for b in () if args.prefill_only else batches:
        for c in contexts:
            rows.append(decode_row(b, c))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    from cometserve.kernels import ref
    from cometserve.kernels.timing import run_meta

    kv4 = ref.PagedKVCache.allocate(1, HKV, D, 1, torch.bfloat16, "cpu", 64, G).bytes_per_token()
    meta = run_meta("PYTHONPATH=. python " + " ".join(sys.argv), args.commit)
    res = {**meta, "rows": rows,
           "kv_bytes_per_token": {"kv4": kv4, "bf16": 2 * HKV * D * 2, "ratio": kv4 / (2 * HKV * D * 2)}}
    os.makedirs(args.out, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    md = render(res)
    with open(os.path.join(args.out, md_name(res)), "w") as f:
        f.write(md)
    try:
        plot(res, os.path.join(args.out, "attention.png"))
    except ImportError:
        print("matplotlib missing: run --render where it is installed")
    print(md)


if __name__ == "__main__":
    main()
