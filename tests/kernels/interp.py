"""Running a test module's small cases through the Triton interpreter in a subprocess:
TRITON_INTERPRET must be set before triton is first imported, and other test modules of the same
pytest process import it first. The child runs the module as a script and prints one REPORT line."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def report_cases(cases, run_case) -> None:
    """In the child: run each (name, *args) case, print {name: "ok" | error}."""
    report = {}
    for name, *args in cases:
        try:
            run_case(*args)
            report[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the parent test by name
            report[name] = f"{type(e).__name__}: {e}"
    print("REPORT" + json.dumps(report))


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def interpreted_json(args: list[str], prefix: str) -> dict:
    """In the parent: run `python ARGS` under the interpreter; return the JSON of its last line
    that starts with `prefix`."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
    assert lines, f"interpreter subprocess failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len(prefix):])


def interpreted_report(test_file: str) -> dict:
    """Run `test_file` as a script (its report_cases) under the interpreter."""
    return interpreted_json([os.path.abspath(test_file)], "REPORT")
