"""The accuracy table: perplexity (and MMLU for the 1.5B model) of every quantization method against
the same model's 16-bit weights, on text the calibration never saw.

    python benchmarks/accuracy.py                     # SmolLM2-135M, all methods
    python benchmarks/accuracy.py --sweep             # + outlier-threshold sweep (ppl vs INT8 blocks)
    python benchmarks/accuracy.py --methods --sweep 3,2 --no-smollm2 --qwen GGUF --mmlu-methods fmpq_w4ax@t=2
    python benchmarks/accuracy.py --qwen GGUF_FILE    # + Qwen2.5-Coder-1.5B (opt-in: ~7 GB RAM, slow)

Writes benchmarks/results/accuracy.json and benchmarks/results/<date>-accuracy.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cometserve import assets
from cometserve.engine.llm import LLM
from cometserve.evaluate import mmlu_accuracy, mmlu_questions, perplexity
from cometserve.model.layers.lm_head import use_lm_head
from cometserve.quant.calib_data import CalibSpec
from cometserve.quant.quantize import quantize
from cometserve.scheme import get_scheme

INT8_HEAD = "+int8-head"
METHODS = ("fp16", "w8a8", "w4a16_gptq", "w4a4_rtn", "w4a8kv4", "fmpq_w4ax", "fmpq_w4axkv4")
RESULTS = Path(__file__).parent / "results"


def evaluate(path, args, eval_source: str, eval_text: str, mmlu_rows, kv=None, lm_head: str = "16bit") -> dict:
    """Perplexity (and MMLU) of a model or checkpoint; `kv` = (bits, group size) overrides the
    checkpoint's KV cache scheme (the KV cache is quantized at run time, so one checkpoint serves
    every KV setting); `lm_head` "int8": the serving option EngineConfig.lm_head, made the same way."""
    llm = LLM(path, device=args.device)
    use_lm_head(llm.model, lm_head)
    scheme = llm.scheme if kv is None else dataclasses.replace(llm.scheme, kv_bits=kv[0], kv_group_size=kv[1])
    ids = torch.tensor(llm.tokenizer(eval_text, add_special_tokens=False)["input_ids"])
    ppl = perplexity(llm.model, scheme, ids, ctx=args.ctx, max_windows=args.max_windows)
    qcfg = llm.loaded.quant_config
    row = {
        "dataset": f"{eval_source}[{args.max_windows} windows]" if args.max_windows else eval_source,
        "ctx": args.ctx,
        "ppl": round(ppl, 4),
        "int8_block_fraction": round(qcfg["int8_block_fraction"], 4) if qcfg else None,
        "mmlu": round(100 * mmlu_accuracy(llm.model, scheme, llm.tokenizer, mmlu_rows), 2) if mmlu_rows else None,
    }
    del llm
    return row


def run_model(name: str, src: Path, methods, args, work: Path, mmlu_rows, prov: dict) -> None:
    """Quantize and evaluate each method; each row is merged into the results as soon as it exists."""
    eval_source, eval_text = assets.default_eval_text()
    calib = CalibSpec(assets.default_calibration_text()[0], args.samples, args.seq_len, 0)
    for method in methods:
        t0 = time.time()
        scheme = method if isinstance(method, str) else method[1]
        label = method if isinstance(method, str) else method[0]
        head = "16bit"
        if isinstance(scheme, str) and scheme.endswith(INT8_HEAD):  # METHOD+int8-head: that checkpoint, INT8 LM head
            scheme, head = scheme[: -len(INT8_HEAD)], "int8"
        path = src if scheme == "fp16" else _quantized(src, work / label.removesuffix(INT8_HEAD), scheme, calib, args.device)
        mmlu = mmlu_rows if label in args.mmlu_methods else None
        row = {"model": name, "method": label, **evaluate(path, args, eval_source, eval_text, mmlu, lm_head=head)}
        print(f"{name:14s} {label:28s} ppl {row['ppl']:9.3f}  int8 {row['int8_block_fraction']}  "
              f"mmlu {row['mmlu']}  ({time.time() - t0:.0f} s)", flush=True)
        merge_results(row, prov)


def _quantized(src: Path, out: Path, scheme, calib: CalibSpec, device: str) -> Path:
    """Quantize `src` into `out`, or reuse a checkpoint already there (--keep) whose scheme, source
    model and calibration are the ones asked for (GPTQ on the 1.5B model takes ~30 min on a CPU)."""
    cfg_path = out / "quant_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        want = get_scheme(scheme) if isinstance(scheme, str) else scheme
        prov = cfg.get("provenance", {})
        same_calib = {k: v for k, v in (prov.get("calibration") or {}).items() if k != "tokens"} == calib.to_dict()
        if cfg.get("scheme") == dataclasses.asdict(want) and prov.get("source_model") == str(src) and same_calib:
            print(f"reusing {out}", flush=True)
            return out
    return quantize(src, out, scheme=scheme, calib=calib, device=device)


def kv_sweep(name: str, src: Path, args, work: Path, prov: dict) -> None:
    """One fmpq_w4ax checkpoint (16-bit KV) evaluated with the INT4 KV cache at several group sizes
    (tokens per (scale, zero) of each head and channel) and with 16-bit KV."""
    eval_source, eval_text = assets.default_eval_text()
    calib = CalibSpec(assets.default_calibration_text()[0], args.samples, args.seq_len, 0)
    path = quantize(src, work / "kv_sweep", scheme="fmpq_w4ax", calib=calib, device=args.device)
    for group in [0, *args.kv_sweep]:
        t0 = time.time()
        kv = (16, 64) if group == 0 else (4, group)
        label = "fmpq_w4ax@kv16" if group == 0 else f"fmpq_w4ax@kv4g{group}"
        row = {"model": name, "method": label, **evaluate(path, args, eval_source, eval_text, None, kv)}
        print(f"{name:14s} {label:28s} ppl {row['ppl']:9.3f}  ({time.time() - t0:.0f} s)", flush=True)
        merge_results(row, prov)


def sweep_methods(thresholds) -> list[tuple[str, object]]:
    base = get_scheme("fmpq_w4ax")
    return [(f"fmpq_w4ax@t={t:g}", dataclasses.replace(base, outlier_threshold=t)) for t in thresholds]


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Perplexity against the fraction of INT8 activation blocks: the outlier-threshold sweep
    (fmpq_w4ax@t=T, 16-bit KV) of each model, with its fp16, w4a16_gptq and w4a8kv4 levels as lines."""
    swept = {}
    for r in rows:
        if r["method"].startswith("fmpq_w4ax@t=") or r["method"] == "fmpq_w4ax":
            t = r["method"].partition("@t=")[2] or f"{get_scheme('fmpq_w4ax').outlier_threshold:g}"
            swept.setdefault(r["model"], {})[t] = (100 * r["int8_block_fraction"], r["ppl"])
    swept = {m: pts for m, pts in swept.items() if len(pts) > 2}
    if not swept:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(swept), figsize=(6 * len(swept), 4.2), squeeze=False)
    for ax, (model, pts) in zip(axes[0], sorted(swept.items())):
        xy = sorted(pts.values())
        ax.plot([x for x, _ in xy], [y for _, y in xy], "o-", label="fmpq_w4ax (16-bit KV)")
        for t, (x, y) in pts.items():
            ax.annotate(f"t={t}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for r in rows:
            if r["model"] == model and r["method"] in ("fp16", "w4a16_gptq", "w4a8kv4"):
                ax.axhline(r["ppl"], ls="--", lw=1, color={"fp16": "k", "w4a16_gptq": "g", "w4a8kv4": "r"}[r["method"]],
                           label=r["method"] + (" (INT4 KV)" if r["method"] == "w4a8kv4" else ""))
        ax.set(title=model, xlabel="INT8 activation blocks (%)", ylabel="perplexity (held-out Austen)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_results(row: dict, prov: dict) -> None:
    """Replace (or add) the row of the same model and method in accuracy.json, each row keeping the
    commit and command that measured it (`prov`, taken when the run started), and rewrite the
    markdown table. Runs of one model do not erase the other model's rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "accuracy.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    row = {**row, **prov}
    commit = prov["commit"]
    key = (row["model"], row["method"])
    rows = [r for r in old if (r["model"], r["method"]) != key] + [row]
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["model"] != "smollm2-135m", r["model"], order.get(r["method"], len(order)),
                             [int(t) if t.isdigit() else t for t in re.findall(r"\d+|\D+", r["method"])]))
    commands = sorted({r.get("command", "") for r in rows} - {""})
    out = {"commit": commit, "command": " ; ".join(commands), "torch": torch.__version__, "device": "cpu", "rows": rows}
    path.write_text(json.dumps(out, indent=1))
    base = {r["model"]: r["ppl"] for r in rows if r["method"] == "fp16"}
    head = f"torch {torch.__version__}, CPU. Commands (each row names its own commit and command in accuracy.json):"
    lines = [f"# Accuracy ({time.strftime('%Y-%m-%d')})", "", head, "", *[f"- `{c}`" for c in commands], "",
             "| model | method | dataset | ctx | ppl | vs fp16 | INT8 blocks | MMLU % |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{100 * (r['ppl'] / base[r['model']] - 1):+.1f}%" if r["model"] in base else "-"
        frac = "-" if r["int8_block_fraction"] is None else f"{100 * r['int8_block_fraction']:.1f}%"
        lines.append(f"| {r['model']} | {r['method']} | {r['dataset']} | {r['ctx']} | {r['ppl']:.3f} | {rel} | "
                     f"{frac} | {'-' if r['mmlu'] is None else r['mmlu']} |")
    plot_sweep(rows, RESULTS / "accuracy.png")
    md = RESULTS / f"{time.strftime('%Y-%m-%d')}-accuracy.md"
    dated = sorted(RESULTS.glob("????-??-??-accuracy.md"))  # the newest table's hand-written Notes are kept
    notes = dated[-1].read_text().partition("\n## Notes")[2] if dated else ""
    md.write_text("\n".join(lines) + "\n" + ("\n## Notes" + notes if notes else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40, help="windows per model (stride ctx/2); 0 = whole text")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sweep", nargs="?", const="8,6,4,3,2.5,2", type=lambda v: [float(t) for t in v.split(",")],
                   metavar="T,T,..", help="also sweep FMPQ's outlier threshold (fmpq_w4ax@t=T rows), every model")
    p.add_argument("--qwen", metavar="GGUF", help="also run Qwen2.5-Coder-1.5B from this GGUF file")
    p.add_argument("--mmlu", type=int, default=200, help="MMLU questions for the 1.5B model")
    p.add_argument("--mmlu-methods", default="fp16,w4a8kv4,fmpq_w4axkv4", help="methods that get MMLU (1.5B)")
    p.add_argument("--no-smollm2", action="store_true", help="only the --qwen model")
    p.add_argument("--kv-sweep", type=lambda v: [int(g) for g in v.split(",")], default=None, metavar="G,G,..",
                   help="SmolLM2: the INT4 KV cache at these group sizes on one fmpq_w4ax checkpoint")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="write quantized checkpoints under DIR (kept) and reuse matching ones found there")
    args = p.parse_args()
    args.max_windows = args.max_windows or None
    args.mmlu_methods = set(args.mmlu_methods.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    prov = {"commit": commit, "command": "python " + " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        methods = list(args.methods) + (sweep_methods(args.sweep) if args.sweep else [])
        if not args.no_smollm2 and methods:
            run_model("smollm2-135m", assets.smollm2_dir(), methods, args, work / "smollm2", None, prov)
        if args.kv_sweep:
            kv_sweep("smollm2-135m", assets.smollm2_dir(), args, work, prov)
        if args.qwen:
            from cometserve.model.loader import resolve_model_path

            run_model("qwen2.5-1.5b", resolve_model_path(args.qwen), methods, args, work / "qwen",
                      mmlu_questions(args.mmlu), prov)


if __name__ == "__main__":
    main()
