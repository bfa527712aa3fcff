"""Prometheus metrics, named after vLLM's (``vllm:...`` becomes ``llmctl:...``) where they mean the same.

Latency histograms are observed by the engine thread as tokens come out; counts and gauges (requests
running and waiting, KV-cache usage, prefix-cache queries and hits, prompt and generation tokens) are read
from the engine when ``/metrics`` is scraped. Each server has its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class ServeMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(
            "llmctl:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.itl = Histogram(
            "llmctl:inter_token_latency_seconds",
            "Time between two generated tokens of a sequence.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.e2e = Histogram(
            "llmctl:e2e_request_latency_seconds",
            "Time from arrival to the last token of a sequence.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.engine = None

    def attach(self, core) -> None:
        """Read counts and gauges from ``core`` (a ServeEngine) at scrape time."""
        self.engine = core
        self.registry.register(_EngineCollector(self))

    # Called by the engine thread.
    def on_token(self, seq, now: float, first: bool) -> None:
        if first:
            self.ttft.observe(now - seq.arrival)
        elif seq.last_token_at is not None:
            self.itl.observe(now - seq.last_token_at)

    def on_finish(self, seq, now: float) -> None:
        if seq.completion.finish_reason != "abort":
            self.e2e.observe(now - seq.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        core = self.metrics.engine
        if core is None:
            return
        stats = core.stats()
        name = self.metrics.model_name

        def gauge(metric, doc, value):
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric, doc, value):
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        yield gauge("llmctl:num_requests_running", "Sequences in the running batch.", stats["running"])
        yield gauge("llmctl:num_requests_waiting", "Sequences waiting to be scheduled.", stats["waiting"])
        yield gauge(
            "llmctl:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", stats["kv_cache_usage"]
        )
        yield gauge("llmctl:num_kv_cache_blocks", "KV-cache blocks in the pool.", stats["num_blocks"])
        yield counter(
            "llmctl:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats["prefix_cache_queries"],
        )
        yield counter(
            "llmctl:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats["prefix_cache_hits"]
        )
        yield counter(
            "llmctl:num_preemptions", "Sequences preempted (recomputed later).", stats["preemptions"]
        )
        yield counter("llmctl:prompt_tokens", "Prompt tokens of accepted requests.", stats["prompt_tokens"])
        yield counter("llmctl:generation_tokens", "Generated tokens.", stats["generation_tokens"])
        if "spec_decode_num_drafts" in stats:  # speculative decoding (a draft model)
            yield counter(
                "llmctl:spec_decode_num_drafts",
                "Speculative verification rounds (a sequence-step with draft tokens).",
                stats["spec_decode_num_drafts"],
            )
            yield counter(
                "llmctl:spec_decode_num_draft_tokens",
                "Draft tokens proposed.",
                stats["spec_decode_num_draft_tokens"],
            )
            yield counter(
                "llmctl:spec_decode_num_accepted_tokens",
                "Draft tokens accepted by the target.",
                stats["spec_decode_num_accepted_tokens"],
            )
            yield counter(
                "llmctl:spec_decode_num_emitted_tokens",
                "Tokens emitted by verification rounds (accepted drafts + one from the target each).",
                stats["spec_decode_num_emitted_tokens"],
            )
