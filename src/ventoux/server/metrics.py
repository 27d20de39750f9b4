"""Prometheus metrics of one server (prometheus-client, its own registry so several apps can coexist).

    metrics = Metrics(); metrics.prompt_tokens.inc(12)
    timer = metrics.timer(); timer.token()  # per generated token: TTFT first, then inter-token latency
    body = metrics.render(engine.stats())   # text format; gauges read from the engine at scrape time
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("ventoux_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("ventoux_requests_waiting", "Sequences waiting for a batch row", registry=r)
        self.kv_usage = Gauge("ventoux_kv_cache_usage_ratio", "Fraction of the KV cache in use", registry=r)
        self.prompt_tokens = Counter("ventoux_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("ventoux_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("ventoux_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ventoux_inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("ventoux_requests", "Finished requests by endpoint and outcome",
                                ["endpoint", "finish_reason"], registry=r)

    def timer(self) -> TokenTimer:
        return TokenTimer(self)

    def render(self, stats) -> bytes:
        """stats: the engine's EngineStats (None while loading)."""
        if stats is not None:
            self.running.set(stats.running)
            self.waiting.set(stats.waiting)
            self.kv_usage.set(stats.usage_ratio)
        return generate_latest(self.registry)


class TokenTimer:
    """One sequence's clock: the first token observes time-to-first-token, each next one the gap since the last."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start, self.last = metrics, time.perf_counter(), None

    def token(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.metrics.generation_tokens.inc()
