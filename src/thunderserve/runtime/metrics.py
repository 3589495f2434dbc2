"""Prometheus metrics of a running deployment (one registry per server, never the global one).

Request latencies (TTFT, TPOT, end-to-end) are observed from the router's `RequestRecord`s; worker state
(liveness, role, queue depths, KV memory, KV bytes sent) is read from the router's latest heartbeats at
scrape time by a custom collector, so /metrics always shows the current picture.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from thunderserve.runtime.frontend import Frontend
from thunderserve.runtime.router_records import RequestRecord

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _WorkerCollector(Collector):
    def __init__(self, router: Frontend) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("thunderserve_worker_up", "1 if the worker is alive", labels=["group", "role"])
        depth = GaugeMetricFamily("thunderserve_worker_queue_depth", "Requests queued or running at a worker",
                                  labels=["group", "queue"])
        kv_used = GaugeMetricFamily("thunderserve_worker_kv_used_tokens", "KV tokens reserved", labels=["group"])
        kv_cap = GaugeMetricFamily("thunderserve_worker_kv_capacity_tokens", "KV tokens a worker may reserve",
                                   labels=["group"])
        hb_age = GaugeMetricFamily("thunderserve_worker_heartbeat_age_seconds", "Time since the last heartbeat",
                                   labels=["group"])
        kv_sent = CounterMetricFamily("thunderserve_kv_bytes_sent", "KV cache bytes shipped between workers",
                                      labels=["src", "dst"])
        kv_recv = CounterMetricFamily("thunderserve_kv_bytes_received", "KV cache bytes received",
                                      labels=["group"])
        gen = CounterMetricFamily("thunderserve_worker_generated_tokens", "Tokens sampled by a worker",
                                  labels=["group"])
        restarts = CounterMetricFamily("thunderserve_worker_restarts", "Times a group's dead worker was "
                                       "restarted and re-admitted", labels=["group"])
        for w in self._router.workers():
            up.add_metric([w.group_id, w.role], 1.0 if w.alive else 0.0)
            restarts.add_metric([w.group_id], w.restarts)
            hb_age.add_metric([w.group_id], w.heartbeat_age_s)
            s = w.state
            if s is None:
                continue
            depth.add_metric([w.group_id, "prefill"], s.queued_prefill)
            depth.add_metric([w.group_id, "decode_waiting"], s.waiting_decode)
            depth.add_metric([w.group_id, "decode_running"], s.running_decode)
            kv_used.add_metric([w.group_id], s.kv_used_tokens)
            kv_cap.add_metric([w.group_id], s.kv_capacity_tokens)
            kv_recv.add_metric([w.group_id], s.kv_bytes_received)
            gen.add_metric([w.group_id], s.generated_tokens_total)
            for dst, nbytes in sorted(s.kv_bytes_sent.items()):
                kv_sent.add_metric([w.group_id, dst], nbytes)
        pending = GaugeMetricFamily("thunderserve_router_pending_requests", "Requests in flight at the router")
        pending.add_metric([], self._router.num_pending)
        yield from (up, depth, kv_used, kv_cap, hb_age, kv_sent, kv_recv, gen, restarts, pending)


class RuntimeMetrics:
    """The deployment's metrics; `observe` is a router observer, `render` the /metrics body."""

    def __init__(self, router: Frontend, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("thunderserve_ttft_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS_S)
        self.tpot = Histogram("thunderserve_tpot_seconds", "Mean time per output token after the first",
                              registry=r, buckets=TPOT_BUCKETS_S)
        self.e2e = Histogram("thunderserve_e2e_seconds", "Request latency, arrival to last token", registry=r,
                             buckets=LATENCY_BUCKETS_S)
        self.requests = Counter("thunderserve_requests", "Requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("thunderserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("thunderserve_completion_tokens", "Tokens generated for clients",
                                         registry=r)
        r.register(_WorkerCollector(router))
        router.add_observer(self.observe)

    def observe(self, record: RequestRecord) -> None:
        self.requests.labels(record.outcome).inc()
        if record.outcome != "finished":
            return
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.completion_tokens)
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)
        if record.tpot_s is not None:
            self.tpot.observe(record.tpot_s)
        self.e2e.observe(record.e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
