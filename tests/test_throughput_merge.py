"""benchmarks/e2e/throughput.py's result files: runs merged into one document keep a row per model,
mode, LM head, case and GPU count, and the table's ratio lines compare each mode with bf16."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "e2e" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(mode, tok_s, lm_head="16bit", case="batch1"):
    return {"model": "llama-3-8b", "mode": mode, "lm_head": lm_head, "case": case, "num_requests": 1,
            "max_batch": 1, "output_tokens_per_s": tok_s, "total_tokens_per_s": tok_s, "seconds": 1.0,
            "peak_mem_gib": 1.0}


def test_merge_keeps_the_int8_head_rows_apart(tmp_path):
    t = _throughput()
    meta = {"gpu": "GPU", "driver": "1", "torch": "2", "triton": "3", "commit": "abc"}
    runs = [{**meta, "command": "a", "rows": [_row("bf16", 100.0), _row("w4axkv4", 240.0)]},
            {**meta, "command": "b", "rows": [_row("w4axkv4", 255.0, "int8")]},
            {**meta, "command": "c", "rows": [_row("w4axkv4", 241.0)]}]  # replaces run a's w4axkv4 row
    paths = []
    for i, doc in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(doc))
    t.merge([str(p) for p in paths], tmp_path / "out", "tp-test")
    doc = json.loads((tmp_path / "out" / "tp-test.json").read_text())
    assert sorted((r["mode"], r["lm_head"], r["output_tokens_per_s"]) for r in doc["rows"]) == [
        ("bf16", "16bit", 100.0), ("w4axkv4", "16bit", 241.0), ("w4axkv4", "int8", 255.0)]
    table = next((tmp_path / "out").glob("*-tp-test.md")).read_text()
    assert "| w4axkv4+int8-head |" in table
    assert "w4axkv4 / bf16 at batch1: 2.41x" in table and "w4axkv4+int8-head / bf16 at batch1: 2.55x" in table


def test_rows_run_under_a_memory_cap_stay_apart(tmp_path):
    """--gpu-memory-gib rows carry the cap in their case: they sit beside the uncapped rows, and the
    ratio lines compare modes under the same cap only."""
    t = _throughput()
    cap = t.case_label("1024/512 x512", 79.5)
    assert cap == "1024/512 x512 @79.5GiB" and t.case_label("batch1", None) == "batch1"
    assert t.ballast(None) is None and t.build_parser().parse_args(["--gpu-memory-gib", "80"]).gpu_memory_gib == 80.0
    meta = {"gpu": "GPU", "driver": "1", "torch": "2", "triton": "3", "commit": "abc", "command": "a"}
    rows = [_row("bf16", 100.0, case="1024/512 x512"), _row("w4axkv4", 130.0, case="1024/512 x512"),
            _row("bf16", 60.0, case=cap), _row("w4axkv4", 129.0, case=cap)]
    (tmp_path / "run.json").write_text(json.dumps({**meta, "rows": rows}))
    t.merge([str(tmp_path / "run.json")], tmp_path / "out", "cap-test")
    doc = json.loads((tmp_path / "out" / "cap-test.json").read_text())
    assert len(doc["rows"]) == 4
    table = next((tmp_path / "out").glob("*-cap-test.md")).read_text()
    assert "w4axkv4 / bf16 at 1024/512 x512: 1.30x" in table
    assert "w4axkv4 / bf16 at 1024/512 x512 @79.5GiB: 2.15x" in table
