"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, stats: Callable[[], dict], labels: dict[str, str] | None = None):
        """`stats()` returns the engine's counts (`running`, `waiting`); `labels` are added to every series
        (a Ray replica names itself with them)."""
        self.registry = CollectorRegistry()
        names = tuple(labels or {})
        self._const = dict(labels or {})
        r = self.registry
        self.requests = Counter("phimm_requests", "Requests by route and outcome", ("route", "status") + names,
                                registry=r)
        self.prompt_tokens = Counter("phimm_prompt_tokens", "Prompt tokens of finished requests", names,
                                     registry=r)
        self.generation_tokens = Counter("phimm_generation_tokens", "Tokens generated", names, registry=r)
        self.ttft = Histogram("phimm_time_to_first_token_seconds", "Time from arrival to the first token",
                              names, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("phimm_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             names, buckets=_LATENCY_BUCKETS, registry=r)
        busy = Gauge("phimm_engine_busy_seconds", "Seconds the engine spent in steps since it started", names,
                     registry=r)
        (busy.labels(**self._const) if names else busy).set_function(lambda: stats().get("busy_s", 0.0))
        running = Gauge("phimm_running_requests", "Rows in the running batch", names, registry=r)
        waiting = Gauge("phimm_waiting_requests", "Requests queued for a place in the batch", names, registry=r)
        (running.labels(**self._const) if names else running).set_function(lambda: stats().get("running", 0))
        (waiting.labels(**self._const) if names else waiting).set_function(lambda: stats().get("waiting", 0))

    def _l(self, metric, **labels):
        labels.update(self._const)
        return metric.labels(**labels) if labels else metric

    def request(self, route: str, status: str) -> None:
        self._l(self.requests, route=route, status=status).inc()

    def tokens(self, prompt: int, generated: int) -> None:
        self._l(self.prompt_tokens).inc(prompt)
        self._l(self.generation_tokens).inc(generated)

    def first_token(self, seconds: float) -> None:
        self._l(self.ttft).observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._l(self.itl).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
