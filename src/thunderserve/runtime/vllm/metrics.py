"""Our /metrics over vLLM groups: every instance's Prometheus metrics, relabelled with its plan group.

The router scrapes each live instance's /metrics every few seconds (`VllmRouter.instance_metrics`); this
collector re-exports those families with a `group` label added, so one scrape of our server shows every
instance (vLLM's `vllm:*` families: queue lengths, KV cache usage, token counters, latency histograms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class InstanceMetricsCollector(Collector):
    """Yields the instances' metric families (latest scrape), each sample labelled with `group`."""

    def __init__(self, scrapes: Callable[[], Mapping[str, str]]) -> None:
        self._scrapes = scrapes

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for group, text in sorted(self._scrapes().items()):
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError:  # a malformed scrape is skipped, never breaks our /metrics
                continue
            for fam in families:
                if fam.name.startswith(("python_", "process_")):
                    continue  # per-process runtime metrics of the instance, not serving state
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "group": group}, s.value, s.timestamp, s.exemplar)
        yield from merged.values()
