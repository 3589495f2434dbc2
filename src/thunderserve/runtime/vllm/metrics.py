"""Our /metrics over vLLM groups: every instance's Prometheus metrics, relabelled with its plan group.

The router scrapes each live instance's /metrics every few seconds (`VllmRouter.instance_metrics`); this
collector re-exports those families with a `group` label added, so one scrape of our server shows every
instance (vLLM's `vllm:*` families: queue lengths, KV cache usage, token counters, latency histograms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class InstanceMetricsCollector(Collector):
    """Yields the instances' metric families (latest scrape), each sample labelled with `group`."""

    def __init__(self, scrapes: Callable[[], Mapping[str, str]],
                 steps: Callable[[], Mapping[tuple[str, str], int]] | None = None) -> None:
        self._scrapes = scrapes
        self._steps = steps

    def collect(self) -> Iterator[Metric]:
        if self._steps is not None:
            fam = CounterMetricFamily("thunderserve_group_steps", "Calls the router made to a group's instance, "
                                      "by step (prefill, decode from remote KV, generate without KV transfer)",
                                      labels=["group", "step"])
            for (group, step), n in sorted(self._steps().items()):
                fam.add_metric([group, step], n)
            yield fam
        merged: dict[str, Metric] = {}
        for group, text in sorted(self._scrapes().items()):
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError:  # a malformed scrape is skipped, never breaks our /metrics
                continue
            for family in families:
                if family.name.startswith(("python_", "process_")):
                    continue  # per-process runtime metrics of the instance, not serving state
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "group": group}, s.value, s.timestamp, s.exemplar)
        yield from merged.values()
