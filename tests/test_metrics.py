"""Prometheus endpoints scraped over HTTP on 127.0.0.1, and structured log lines."""

from __future__ import annotations

import io
import json
import logging
import secrets
import urllib.request

import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from scheduler.core import jobs, keys, worker_metrics, worker_registry
from scheduler.core.keys import Stage
from scheduler.core.logging_setup import configure_logging, log_context
from scheduler.core.settings import FarmSettings
from scheduler.intake.submit import submit
from scheduler.ops import metrics

TINY = {"prompt": "a paper boat", "width": 64, "height": 48, "frames": 17, "steps": 2}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # No proxies: a proxy from the environment must never see a loopback scrape.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_farm_metrics_endpoint(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    settings = FarmSettings(redis_url=redis_url, secret=secrets.token_hex(8))
    done = submit(conn, settings, TINY)
    submit(conn, settings, {**TINY, "seed": 1})
    submit(conn, settings, {**TINY, "seed": 2, "priority": "high"})
    worker_registry.register_worker(conn, "encode-a", {"stage": "encode", "state": "busy"}, ttl_seconds=30)
    worker_registry.register_worker(conn, "encode-b", {"stage": "encode", "state": "idle"}, ttl_seconds=30)
    jobs.mark_stage_started(conn, done, Stage.ENCODE, "encode-a", 1)
    conn.hset(keys.job_key(done), "state", "succeeded")

    port = metrics.serve_farm_metrics(conn, 0)
    samples = scrape(port)
    assert samples[("reelfarm_up", ())] == 1
    assert samples[("reelfarm_queue_depth", (("model", "default"), ("priority", "default"), ("stage", "encode")))] == 2
    assert samples[("reelfarm_queue_depth", (("model", "default"), ("priority", "high"), ("stage", "encode")))] == 1
    assert samples[("reelfarm_jobs", (("state", "queued"),))] == 2
    assert samples[("reelfarm_jobs", (("state", "succeeded"),))] == 1
    assert samples[("reelfarm_workers_live", (("stage", "encode"),))] == 2
    assert samples[("reelfarm_workers_busy", (("stage", "encode"),))] == 1
    assert samples[("reelfarm_worker_busy_ratio", (("stage", "encode"),))] == 0.5
    assert samples[("reelfarm_workers_live", (("stage", "decode"),))] == 0
    assert samples[("reelfarm_inflight", (("stage", "encode"),))] == 1
    assert ("reelfarm_worker_heartbeat_age_seconds", (("stage", "encode"), ("worker", "encode-a"))) in samples
    assert samples[("reelfarm_delayed_retries", ())] == 0


def test_farm_metrics_say_when_redis_is_down() -> None:
    conn = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    registry = metrics.farm_registry(conn)
    port = worker_metrics.start_metrics_server(0, registry=registry)
    assert scrape(port)[("reelfarm_up", ())] == 0


def test_worker_metrics_endpoint() -> None:
    # The module-level metrics live in the default registry; serve that, as a worker process does.
    worker_metrics.observe_stage(Stage.TRANSFORM, 2.0, "done")
    worker_metrics.observe_stage("decode", 0.3, "failed: RuntimeError: boom")
    worker_metrics.observe_handoff(Stage.DECODE, 4096, 0.004)
    worker_metrics.observe_upload(25_000)
    worker_metrics.count_retry(Stage.ENCODE)
    port = worker_metrics.start_metrics_server(0)
    samples = scrape(port)
    assert samples[("reelfarm_stage_seconds_count", (("outcome", "done"), ("stage", "transform")))] >= 1
    assert samples[("reelfarm_stage_seconds_count", (("outcome", "failed"), ("stage", "decode")))] >= 1
    assert samples[("reelfarm_handoff_bytes_total", (("stage", "decode"),))] >= 4096
    assert samples[("reelfarm_handoff_seconds_count", (("stage", "decode"),))] >= 1
    assert samples[("reelfarm_upload_bytes_total", ())] >= 25_000
    assert samples[("reelfarm_retries_total", (("stage", "encode"),))] >= 1


def test_log_lines_carry_job_and_stage() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("INFO", stream=stream)  # a StringIO is not a TTY: JSON lines
        log = logging.getLogger("reelfarm.test")
        with log_context(job_id="b-dusk-0123", stage=Stage.TRANSFORM):
            log.info("step %d of %d", 3, 4)
        log.warning("between jobs")
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        assert (first["job_id"], first["stage"], first["message"]) == ("b-dusk-0123", "transform", "step 3 of 4")
        assert (second["job_id"], second["stage"], second["level"]) == ("-", "-", "WARNING")

        text = io.StringIO()
        configure_logging("INFO", stream=text, json_lines=False)
        with log_context(job_id="j1", stage="decode"):
            log.info("uploaded")
        assert "[job=j1 stage=decode] uploaded" in text.getvalue()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
