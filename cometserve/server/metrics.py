"""/metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Gauges and counters come from the engine (`AsyncEngine.stats()`); the latency histograms are
observed by the server as deltas reach the HTTP handlers, so they measure what clients see:
time to first token from the request's arrival, and the gap between consecutive tokens.
"""

from __future__ import annotations

import bisect
import threading
import time

from cometserve.engine.async_engine import EngineStats

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def lines(self) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for le, c in zip([*map(repr, self.buckets), "+Inf"], counts):
            cumulative += c
            out.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{self.name}_sum {total}", f"{self.name}_count {cumulative}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.ttft = Histogram("cometserve_time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("cometserve_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one sequence.", ITL_BUCKETS)

    def tracker(self, num_choices: int, arrival: float) -> LatencyTracker:
        return LatencyTracker(self, num_choices, arrival)

    def render(self, stats: EngineStats) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value, labels: str = "") -> None:
            if not any(line.startswith(f"# TYPE {name} ") for line in lines):
                lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.append(f"{name}{labels} {value}")

        metric("cometserve_num_requests_running", "gauge", "Sequences in the running batch.", stats.num_running)
        metric("cometserve_num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", stats.num_waiting)
        metric("cometserve_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.", stats.kv_usage)
        metric("cometserve_kv_cache_free_blocks", "gauge", "Free KV cache blocks.", stats.num_free_blocks)
        metric("cometserve_kv_cache_blocks", "gauge", "KV cache blocks in all.", stats.num_blocks)
        metric("cometserve_prompt_tokens_total", "counter", "Prompt tokens admitted.", stats.num_prompt_tokens)
        metric("cometserve_generation_tokens_total", "counter", "Tokens generated.", stats.num_generated_tokens)
        metric("cometserve_prefix_cache_queries_total", "counter",
               "Prompt tokens looked up in the prefix cache.", stats.prefix_queried_tokens)
        metric("cometserve_prefix_cache_hits_total", "counter",
               "Prompt tokens whose K/V came from the prefix cache.", stats.prefix_hit_tokens)
        for reason, n in sorted(stats.num_finished.items()):
            metric("cometserve_request_finished_total", "counter", "Sequences finished, by reason.", n,
                   f'{{finish_reason="{reason}"}}')
        metric("cometserve_request_rejected_overload_total", "counter",
               "Requests refused because the waiting queue was full.", stats.num_rejected_overload)
        lines += self.ttft.lines() + self.itl.lines()
        return "\n".join(lines) + "\n"


class LatencyTracker:
    """Per API request: observes TTFT once per choice and the gaps between its later tokens."""

    def __init__(self, metrics: Metrics, num_choices: int, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.last: list[float | None] = [None] * num_choices

    def observe(self, index: int, num_tokens: int) -> None:
        if not num_tokens:
            return
        now = time.perf_counter()
        last = self.last[index]
        if last is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            for _ in range(num_tokens):
                self.metrics.itl.observe((now - last) / num_tokens)
        self.last[index] = now
