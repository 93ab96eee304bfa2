"""One-shot GPU health check for the device machine: each W4Ax GEMM candidate config on engine-like
shapes in its own process (an illegal address poisons the CUDA context), so a crashing config is
named. Usage: PYTHONPATH=. python scripts/gpu_check.py [M ...]"""

from __future__ import annotations

import os
import subprocess
import sys

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}

CHILD = """
import sys, torch
from cometserve.kernels import gemm_w4ax as g, ref
m, n, k, i = map(int, sys.argv[1:5])
torch.manual_seed(0)
a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
s = torch.rand(m, k // 128, device="cuda") * 0.01
qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
ws = (torch.rand(n, k // 128, device="cuda") * 0.01).half()
pw, pws = g.prepare_weights(qw, ws)
cfg = g.candidates(m, n, k // 128, torch.device("cuda"))[i]
y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
g._launch(cfg, a, s, pw, pws, None, y)
torch.cuda.synchronize()
want = ref.w4ax_gemm(a, s, qw, ws, None, torch.float32)
err = ((y.float() - want).norm() / want.norm()).item()
print(f"OK {cfg} rel_err={err:.2e}")
"""


def main() -> None:
    import torch

    from cometserve.kernels import gemm_w4ax as g

    ms = [int(x) for x in sys.argv[1:]] or [1, 16, 48, 200, 1000]
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    bad = []
    for m in ms:
        for name, (n, k) in SHAPES.items():
            for i, cfg in enumerate(g.candidates(m, n, k // 128, torch.device("cuda"))):
                r = subprocess.run([sys.executable, "-c", CHILD, str(m), str(n), str(k), str(i)], env=env,
                                   capture_output=True, text=True, timeout=120, check=False)
                line = (r.stdout.strip().splitlines() or [""])[-1]
                ok = r.returncode == 0 and line.startswith("OK")
                print(f"M={m:5d} {name:8s} cand {i}: {'ok ' if ok else 'FAIL'} {line if ok else r.stderr[-300:]}",
                      flush=True)
                if not ok:
                    bad.append((m, name, i, cfg))
    print("FAILED:", bad if bad else "none")


if __name__ == "__main__":
    main()
