"""The server's Prometheus metrics, in a registry of their own (never prometheus_client's global one,
so two servers in one process, or a test, never mix their counts)."""

from __future__ import annotations

from typing import Any

# Seconds: a tiny model on a CPU answers in milliseconds, a large one on a busy queue in tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class ServerMetrics:
    """Counters, gauges and histograms of one server; `render()` is the body of GET /metrics."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llmctl_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("llmctl_prompt_tokens", "Prompt tokens of accepted generation requests.", registry=r)
        self.completion_tokens = Counter("llmctl_completion_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram(
            "llmctl_time_to_first_token_seconds", "From a request's arrival to its first generated token (seconds).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.time_per_output_token = Histogram(
            "llmctl_time_per_output_token_seconds", "Between two consecutive tokens of one sequence (seconds).",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.request_latency = Histogram(
            "llmctl_request_duration_seconds", "From a generation request's arrival to its last token (seconds).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "llmctl_queue_depth", "Sequences waiting for a batch slot (a classifier: requests waiting for a forward).",
            registry=r,
        )
        self.batch_size = Gauge(
            "llmctl_batch_size", "Sequences in the running batch (a classifier: texts in the running forward).",
            registry=r,
        )
        self.step_batch_size = Histogram(
            "llmctl_decode_batch_size", "Sequences in each decode step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.ready = Gauge("llmctl_model_ready", "1 once the model is loaded and serving, else 0.", registry=r)
        # A classifier's (POST /v1/classify); its requests by status are in llmctl_requests_total.
        self.classified_texts = Counter("llmctl_classified_texts", "Texts classified.", registry=r)
        self.classified_tokens = Counter(
            "llmctl_classified_tokens", "Tokens the classifier read (each text cut to the model's max_len).", registry=r
        )
        self.classify_latency = Histogram(
            "llmctl_classify_duration_seconds", "From a classify request's arrival to its answer (seconds).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.forward_batch_size = Histogram(
            "llmctl_classify_batch_size", "Texts in each classifier forward (requests waiting together share one).",
            buckets=BATCH_BUCKETS, registry=r,
        )

    def bind_engine(self, engine: Any) -> None:
        """Read the queue depth and batch size from `engine` (the generation engine or the classifier
        runner) at each scrape."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.batch_size.set_function(lambda: engine.batch_size)
        self.ready.set(1)

    def on_step(self, batch_size: int) -> None:
        """The engine's per-decode-step callback (called from its own thread)."""
        self.step_batch_size.observe(batch_size)

    def on_forward(self, texts: int) -> None:
        """The classifier runner's per-forward callback (called from its own thread)."""
        self.forward_batch_size.observe(texts)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) in the Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
