"""Farm-wide Prometheus metrics, read from Redis at scrape time, so they are never stale and nothing has to
keep them up to date: ``reelfarm_queue_depth{stage,priority,model}``, ``reelfarm_jobs{state}``,
``reelfarm_workers_live{stage}``, ``reelfarm_workers_busy{stage}``, ``reelfarm_worker_busy_ratio{stage}``,
``reelfarm_worker_heartbeat_age_seconds{worker,stage}``, ``reelfarm_inflight{stage}``,
``reelfarm_delayed_retries``, ``reelfarm_dit_recomputed_seconds``, ``reelfarm_replication_wait_timeouts{write}``,
``reelfarm_refused_calls{reason}`` (rq jobs workers refused to run),
``reelfarm_up`` (0 when Redis did not answer), and per API key ``reelfarm_key_*`` (``scheduler.ops.usage``).
``reelfarm metrics --port P`` serves them. What each
worker measures itself is ``scheduler.core.worker_metrics``.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.core import durability, keys, stage_calls, worker_registry
from scheduler.core.keys import Stage
from scheduler.core.worker_metrics import start_metrics_server
from scheduler.ops import job_admin

# --------------------------------------------------------------------------- farm side


class FarmCollector(Collector):
    """Reads the farm's state from Redis at every scrape.

    ``reelfarm_jobs`` counts the newest ``max_jobs_scanned`` jobs (one
    pipelined HGET per job): enough for a dashboard without making a scrape of
    a farm with months of history expensive.
    """

    def __init__(self, conn: redis.Redis, models: list[str] | None = None, max_jobs_scanned: int = 100_000) -> None:
        self.conn = conn
        self.models = models or [keys.DEFAULT_MODEL]
        self.max_jobs_scanned = max_jobs_scanned

    def describe(self) -> list[Metric]:
        # Describing by collecting would hit Redis at registration time; an empty description is allowed.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("reelfarm_up", "1 when Redis answered this scrape")
        try:
            families = list(self._collect())
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "reelfarm_queue_depth", "Stage jobs waiting in each rq queue", labels=["stage", "priority", "model"]
        )
        for row in job_admin.queue_rows(self.conn, self.models):
            for priority, count in row.depths.items():
                depth.add_metric([row.stage, priority, row.model], count)
        yield depth

        states = GaugeMetricFamily(
            "reelfarm_jobs", "Jobs by state (newest jobs, see max_jobs_scanned)", labels=["state"]
        )
        for state, count in sorted(self._job_states().items()):
            states.add_metric([state], count)
        yield states

        now = time.time()
        live = worker_registry.live_workers(self.conn)
        live_by_stage = Tally(w.get("stage", "?") for w in live)
        busy_by_stage = Tally(w.get("stage", "?") for w in live if w.get("state") == "busy")
        live_g = GaugeMetricFamily("reelfarm_workers_live", "Workers with an unexpired heartbeat", labels=["stage"])
        busy_g = GaugeMetricFamily("reelfarm_workers_busy", "Live workers running a stage job now", labels=["stage"])
        ratio_g = GaugeMetricFamily(
            "reelfarm_worker_busy_ratio", "Busy share of a stage's live workers at scrape time", labels=["stage"]
        )
        for stage in Stage:
            n_live, n_busy = live_by_stage.get(stage.value, 0), busy_by_stage.get(stage.value, 0)
            live_g.add_metric([stage.value], n_live)
            busy_g.add_metric([stage.value], n_busy)
            ratio_g.add_metric([stage.value], n_busy / n_live if n_live else 0.0)
        yield live_g
        yield busy_g
        yield ratio_g

        age = GaugeMetricFamily(
            "reelfarm_worker_heartbeat_age_seconds",
            "Seconds since a live worker's last heartbeat",
            labels=["worker", "stage"],
        )
        for worker in live:
            last = float(worker.get("last_heartbeat", now) or now)
            age.add_metric([worker.get("worker_id", "?"), worker.get("stage", "?")], max(0.0, now - last))
        yield age

        inflight = GaugeMetricFamily(
            "reelfarm_inflight", "Stage executions in flight (watched by the reaper)", labels=["stage"]
        )
        members: list[bytes] = self.conn.zrange(keys.inflight_key(), 0, -1)  # type: ignore[assignment]
        by_stage = Tally(keys.parse_inflight_member(m.decode())[1].value for m in members)
        for hop in keys.all_hops():  # labelled by hop: a split loop's parts apart
            if hop.part is None or hop.value in by_stage:
                inflight.add_metric([hop.value], by_stage.get(hop.value, 0))
        yield inflight

        delayed = GaugeMetricFamily("reelfarm_delayed_retries", "Stage retries waiting out their backoff")
        delayed.add_metric([], int(self.conn.zcard(keys.delayed_key())))  # type: ignore[arg-type]
        yield delayed
        recomputed = GaugeMetricFamily(
            "reelfarm_dit_recomputed_seconds",
            "Seconds of finished DiT work recovery redid because its latents checkpoint was gone, since the farm began",
        )
        recomputed.add_metric([], float(self.conn.get(keys.dit_recomputed_key()) or 0.0))  # type: ignore[arg-type]
        yield recomputed
        waits = GaugeMetricFamily(
            "reelfarm_replication_wait_timeouts",
            "Acknowledged writes no replica confirmed in time (redis_durability replica), by kind, since the farm began",
            labels=["write"],
        )
        for write, count in sorted(durability.timeout_counts(self.conn).items()):
            waits.add_metric([write], count)
        yield waits
        refused = GaugeMetricFamily(
            "reelfarm_refused_calls", "rq jobs stage workers refused to run, since the farm began", labels=["reason"]
        )
        for reason, count in sorted(stage_calls.refusal_counts(self.conn).items()):
            refused.add_metric([reason], count)
        yield refused

    def _job_states(self) -> dict[str, int]:
        ids: list[bytes] = self.conn.zrevrange(keys.jobs_index_key(), 0, self.max_jobs_scanned - 1)  # type: ignore[assignment]
        counts: Tally[str] = Tally()
        for offset in range(0, len(ids), 1000):
            pipe = self.conn.pipeline(transaction=False)
            for raw in ids[offset : offset + 1000]:
                pipe.hget(keys.job_key(raw.decode()), "state")
            counts.update(v.decode() for v in pipe.execute() if v is not None)
        return dict(counts)


def farm_registry(conn: redis.Redis, **options: Any) -> CollectorRegistry:
    """A registry holding the farm and per-key usage collectors (the scheduler process's own metrics stay out)."""
    from scheduler.core.jobs import JOB_RETENTION_SECONDS
    from scheduler.ops.usage import UsageCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(conn, **options))
    registry.register(UsageCollector(conn, JOB_RETENTION_SECONDS))
    return registry


def serve_farm_metrics(conn: redis.Redis, port: int, addr: str = "127.0.0.1", models: list[str] | None = None) -> int:
    return start_metrics_server(port, addr, farm_registry(conn, models=models))
