"""Piecewise CUDA graphs: a forward's every kernel but attention's, for the steps the decode graphs
do not take (prefill chunks, mixed prefill + decode steps, decodes past the largest decode graph).

An eager Llama-3-8B forward launches ~350 kernels at ~90 us of host time each: ~30 ms whatever the
step's size (benchmarks/e2e/NOTES-serving.md), the floor of every request's time to first token. Here
the forward is captured once per padded token count, cut at the attention calls into num_layers + 1
graphs (attention is the one part whose work depends on the step's sequences and not only on its
token count; vLLM cuts its piecewise graphs there too). A step replays the pieces and runs each
layer's attention eagerly between them, with the step's metadata.

Pieces and attention meet in static buffers: piece i ends by copying layer i's q, k, v into one
[T, (Hq + 2 Hkv) * D] staging buffer; attention's output goes into another, which piece i + 1 reads.
Rows past the step's tokens are padding: every op inside a piece works row by row (embedding, norms,
activation quantization, GEMMs, SiLU), so padding never reaches a real row.
"""

from __future__ import annotations

import contextlib

import torch


def graph_sizes(max_tokens: int) -> list[int]:
    """Padded token counts 16, 32, 48, 64, 96, 128, 192, ... (powers of two and 1.5x them: at most a
    third of a step's rows are padding above 32 tokens), below max_tokens, then max_tokens."""
    sizes, p = [16], 32
    while p < max_tokens:
        sizes += [p, p * 3 // 2]
        p *= 2
    return [s for s in sizes if s < max_tokens] + [max_tokens]


def capture_or_clear(capture, *captured: dict) -> str | None:
    """Run `capture` (a graph class's capture of all its sizes); on any failure empty what it filled
    and return the error, so the caller runs eagerly (shared by the decode and piecewise graphs)."""
    try:
        capture()
    except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
        for d in captured:
            d.clear()
        return f"{type(e).__name__}: {e}"
    return None


class PiecewiseGraphs:
    """Capture failure is not fatal: `ok` stays False and steps run eagerly (`error` says why)."""

    def __init__(self, runner, max_tokens: int) -> None:
        self.runner = runner
        cfg = runner.model.config
        dev, dt = runner.device, runner.dtype
        self.sizes = graph_sizes(max_tokens)
        n = self.sizes[-1]
        self.heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.qkv = torch.zeros(n, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, dtype=dt, device=dev)
        self.attn_out = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=dt, device=dev)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[float, object]] = []  # each layer's (scale, rotary), as its attend() passed them
        self.error = capture_or_clear(self._capture_all, self.graphs, self.hidden)

    @property
    def ok(self) -> bool:
        return bool(self.graphs)

    def _views(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hq, hkv, d = self.heads
        q, k, v = self.qkv[:t].split((hq * d, hkv * d, hkv * d), dim=-1)
        return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)

    def _stage(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy a layer's q, k, v into the staging buffer: one copy when they are the column slices of
        one [T, width] tensor (the fused QKV projection's output), else three."""
        t, width = q.shape[0], self.qkv.shape[1]
        step = q.element_size()
        joint = (q.dtype == k.dtype == v.dtype == self.qkv.dtype and q.stride(0) == k.stride(0) == v.stride(0) == width
                 and k.data_ptr() == q.data_ptr() + q[0].numel() * step
                 and v.data_ptr() == k.data_ptr() + k[0].numel() * step)
        if joint:
            self.qkv[:t].copy_(torch.as_strided(q, (t, width), (width, 1)))
            return
        for dst, src in zip(self._views(t), (q, k, v)):
            dst.copy_(src)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        model, pool = self.runner.model, torch.cuda.graph_pool_handle()  # one memory pool for every piece
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-ups on the capture stream too (cuBLAS sets up per stream)
            for t in reversed(self.sizes):
                ids, pos = self.input_ids[:t], self.positions[:t]
                for _ in range(2):  # compiles the kernels and tunes the GEMMs for this M outside capture
                    model(ids, pos, _Cut(self, t))
                stream.synchronize()
                cut = _Cut(self, t, pool)
                try:
                    cut.begin()
                    hidden = model(ids, pos, cut)
                except BaseException:
                    if torch.cuda.is_current_stream_capturing():  # leave the stream out of capture mode
                        with contextlib.suppress(Exception):
                            cut.pieces[-1].capture_end()
                    raise
                cut.pieces[-1].capture_end()
                self.graphs[t], self.hidden[t] = cut.pieces, hidden
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor | None:
        """The forward's final hidden states [T, hidden] through the smallest size that fits, or None."""
        t = input_ids.shape[0]
        size = next((s for s in self.sizes if s >= t), None)
        if size is None or size not in self.graphs:
            return None
        self.input_ids[:t].copy_(input_ids)
        pieces, (q, k, v), out = self.graphs[size], self._views(t), self.attn_out[:t]
        attn = self.runner.attn
        pieces[0].replay()
        for cache, (scale, rotary), piece in zip(self.runner.storage.layers, self.calls, pieces[1:]):
            out.copy_(attn.attend(cache, meta, q, k, v, positions, scale, rotary))
            piece.replay()
        return self.hidden[size][:t]


class _Cut:
    """The cache the model sees while one size is captured (into `pool`) or warmed up (None): every
    layer's attend() stages q, k, v, ends the running piece, starts the next and returns the static
    attention output (stale during warm-up: only the kernels' compilation and tuning matter there)."""

    def __init__(self, owner: PiecewiseGraphs, t: int, pool=None) -> None:
        self.owner, self.t, self.pool = owner, t, pool
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.layers = [self] * len(owner.runner.storage.layers)
        self.index = 0

    def begin(self) -> None:
        g = torch.cuda.CUDAGraph()
        self.pieces.append(g)
        g.capture_begin(pool=self.pool)

    def attend(self, q, k, v, positions, scale: float, rotary) -> torch.Tensor:
        o = self.owner
        o._stage(q, k, v)
        if self.pool is not None:
            self.pieces[-1].capture_end()
            self.begin()
            if len(o.calls) <= self.index:
                o.calls.append((scale, rotary))
        self.index += 1
        return o.attn_out[: self.t]
