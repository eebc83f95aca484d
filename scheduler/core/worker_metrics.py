"""Worker-side Prometheus metrics: process-local counters and histograms a worker feeds as it works.

``observe_stage`` (``reelfarm_stage_seconds{stage,outcome}``), ``observe_handoff``
(``reelfarm_handoff_bytes_total{stage}``, ``reelfarm_handoff_seconds{stage}``),
``observe_upload`` (``reelfarm_upload_bytes_total``), ``count_retry``
(``reelfarm_retries_total{stage}``), ``count_refused_call``
(``reelfarm_refused_calls_total{stage,reason}``). Each worker process serves its
own ``/metrics`` with ``start_metrics_server(port)``; Prometheus aggregates across
workers, which is what it is for. The farm-wide view read from Redis is
``scheduler.ops.metrics``; both use one vocabulary (every name starts ``reelfarm_``).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

from scheduler.core.keys import Stage

# From a tiny CPU model's fraction of a second to a 720p DiT run of tens of minutes.
_STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400, 3600)
_HANDOFF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

STAGE_SECONDS = Histogram(
    "reelfarm_stage_seconds",
    "Wall time of one stage attempt on a worker, by outcome (done, failed, cancelled, superseded, ...)",
    ["stage", "outcome"],
    buckets=_STAGE_BUCKETS,
)
HANDOFF_BYTES = Counter("reelfarm_handoff_bytes", "Payload bytes pulled from the upstream worker", ["stage"])
HANDOFF_SECONDS = Histogram(
    "reelfarm_handoff_seconds", "Time to pull one payload from the upstream worker", ["stage"], buckets=_HANDOFF_BUCKETS
)
UPLOAD_BYTES = Counter("reelfarm_upload_bytes", "Bytes uploaded to object storage (video, poster, metadata)")
RETRIES = Counter(
    "reelfarm_retries", "Stage attempts restarted (backoff retry, lineage recompute, dead worker)", ["stage"]
)
REFUSED_CALLS = Counter(
    "reelfarm_refused_calls",
    "rq jobs this worker refused to run (not the signed stage entrypoint), by reason",
    ["stage", "reason"],
)


# run_stage's outcome texts ("failed: <reason>", "restarted at encode attempt 2", ...) -> a few label values:
# free text as a label would create a new time series per reason.
_OUTCOME_LABELS = {
    "done": "done",
    "failed": "failed",
    "cancelled": "cancelled",
    "restarted": "retried",
    "quarantined": "quarantined",
    "superseded": "superseded",
    "already": "superseded",
    "job already finished": "superseded",
    "skipped": "skipped",
}


def outcome_label(outcome: str) -> str:
    text = outcome.strip().lower()
    for prefix, label in _OUTCOME_LABELS.items():
        if text.startswith(prefix):
            return label
    return "other"


def observe_stage(stage: Stage | str, seconds: float, outcome: str = "done") -> None:
    """One stage attempt ended; ``outcome`` may be run_stage's outcome text (it is reduced to a label)."""
    STAGE_SECONDS.labels(stage=str(stage), outcome=outcome_label(outcome)).observe(seconds)


def observe_handoff(stage: Stage | str, nbytes: int, seconds: float) -> None:
    """Called by the consuming stage after a pull (``stage`` is the consumer)."""
    HANDOFF_BYTES.labels(stage=str(stage)).inc(nbytes)
    HANDOFF_SECONDS.labels(stage=str(stage)).observe(seconds)


def observe_upload(nbytes: int) -> None:
    UPLOAD_BYTES.inc(nbytes)


def count_retry(stage: Stage | str) -> None:
    RETRIES.labels(stage=str(stage)).inc()


def count_refused_call(stage: Stage | str, reason: str) -> None:
    REFUSED_CALLS.labels(stage=str(stage), reason=reason).inc()


def start_metrics_server(port: int = 0, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> int:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread; returns the bound port.

    ``port=0`` picks a free one (several workers on one host); record it where
    Prometheus service discovery can find it. Loopback by default: metrics
    name jobs and workers, so exposing them is a deliberate ``addr``.
    """
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_port)
