"""Farm settings: one typed object, read from a YAML file and ``REELFARM_*`` env vars.

Resolution order (later wins): built-in defaults, ``configs/farm.yaml`` (or the
file named by ``--config`` / ``REELFARM_CONFIG``), the embedded farm's state file
when ``reelfarm up`` is running and no Redis URL was configured, then env vars.
Secrets (Redis password, S3 keys, the HMAC farm secret) may come from any of
them; the embedded farm generates its own and keeps them in a 0600 file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scheduler.core.errors import UserError
from scheduler.core.keys import Stage
from scheduler.core.spec import SpecLimits

DEFAULT_HOME = Path(".reelfarm")
STATE_FILE_NAME = "farm.json"


class SettingsError(UserError, ValueError):
    """Settings that cannot work; the message says which and how to fix it."""


class S3Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None
    bucket: str = "reelfarm"
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"
    # Every object key starts with this; keys never contain raw user input.
    key_prefix: str = "renders"
    # How long one upload call keeps retrying a down or throttling store before the stage fails.
    retry_seconds: float = Field(default=30.0, ge=0)

    def client(self) -> Any:
        """A boto3 client for this store (boto3 is imported only by scheduler.core.object_store, and only here)."""
        from scheduler.core.object_store import S3Config, make_s3_client

        return make_s3_client(S3Config(self.endpoint_url, self.bucket, self.access_key, self.secret_key, self.region))


class TransferSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hostname: str = "127.0.0.1"
    protocol: str = "tcp"
    device_name: str = ""
    slots: int = Field(default=2, ge=1)
    # Bytes per slot; the pool registers slots x slot size once at start. None: sized from the
    # model configs and the resolution limits (the largest payload the farm can accept).
    slot_mb: int | None = Field(default=None, ge=1)
    # Mooncake: a read that takes longer fails (and the hand-off recomputes); None = engine default (30 s).
    transfer_timeout_seconds: int | None = Field(default=None, ge=5)
    # TCP: read payloads straight into private (never registered, never served) memory when the
    # engine's start-up self-test allows it -- no receive slot, no copy out. False: always a slot.
    direct_receive: bool = True


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heartbeat_seconds: float = Field(default=2.0, gt=0)
    # A worker whose heartbeat key is older than this is dead.
    worker_ttl_seconds: int = Field(default=15, ge=2)
    # A producer holds a slot for this long waiting for the consumer's ack.
    lease_seconds: int = Field(default=600, ge=1)
    # Restarts of a stage before the job is quarantined (FAILED with its history).
    max_attempts: int = Field(default=3, ge=1)
    # Backoff before retrying a stage that raised: base * 2^(attempt-1).
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    reaper_interval_seconds: float = Field(default=5.0, gt=0)
    # On SIGTERM a producer stays up this long for consumers to pull what it still holds.
    shutdown_grace_seconds: float = Field(default=60.0, ge=0)
    device: str = "cpu"
    dtype: str = "float32"
    # Models (by name) this worker loads and serves; empty = every model in the farm's settings.
    models: list[str] = Field(default_factory=list)
    # Decode workers: the VAE decode spread over a ROWSxCOLS grid of processes, each decoding its spatial
    # shard of every frame (per-process memory falls with the shard's area). Rank 0 is the worker itself,
    # the others start with it and stay up across jobs. "1x1": one process, no group.
    decode_grid: str = Field(default="1x1", pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")
    # A decode-group collective waiting longer than this fails the decode attempt (a rank died or hung).
    decode_group_timeout_seconds: float = Field(default=120.0, gt=0)


class FetchSettings(BaseModel):
    """What the farm may fetch on a submitter's behalf (conditioning image URLs); see ``scheduler.intake.fetch_policy``."""

    model_config = ConfigDict(extra="forbid")

    # Hosts (exact names) or CIDR ranges that may be fetched although they are loopback, private,
    # link-local or reserved -- e.g. an image server inside the farm's own network.
    allow: list[str] = Field(default_factory=list)
    max_redirects: int = Field(default=3, ge=0, le=10)
    # The whole fetch (every redirect hop, every byte) must finish within this.
    timeout_seconds: float = Field(default=20.0, gt=0)


class FarmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = None
    model_dir: Path = DEFAULT_HOME / "models" / "tiny-wan-t2v"
    # More models this farm serves, by name (jobs pick one with their `model` field).
    models: dict[str, Path] = Field(default_factory=dict)
    secret: str | None = None
    # Rotation: workers also accept calls and descriptors signed with this one (see README, Security).
    previous_secret: str | None = None
    home: Path = DEFAULT_HOME
    s3: S3Settings = S3Settings()
    transfer: TransferSettings = TransferSettings()
    worker: WorkerSettings = WorkerSettings()
    limits: SpecLimits = SpecLimits()
    fetch: FetchSettings = FetchSettings()
    # Spec fields applied when a submission leaves them out (e.g. small sizes for the tiny model).
    spec_defaults: dict[str, Any] = Field(default_factory=dict)
    # How many workers of each stage the embedded farm (`reelfarm up`) starts; a stage left out gets one.
    workers_per_stage: dict[str, int] = Field(default_factory=dict)

    @field_validator("workers_per_stage")
    @classmethod
    def _known_stages(cls, value: dict[str, int]) -> dict[str, int]:
        stages = [stage.value for stage in Stage]
        for stage, count in value.items():
            if stage not in stages:
                raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(stages)})")
            if not 1 <= count <= MAX_WORKERS_PER_STAGE:
                raise ValueError(f"{stage}={count}: between 1 and {MAX_WORKERS_PER_STAGE} workers per stage")
        return value

    def with_worker_counts(self, counts: dict[str, int]) -> FarmSettings:
        """These settings with ``counts`` over ``workers_per_stage``; a bad count is a one-line ``SettingsError``."""
        try:
            return FarmSettings.model_validate(
                {**self.model_dump(), "workers_per_stage": {**self.workers_per_stage, **counts}}
            )
        except ValidationError as exc:
            raise SettingsError(f"--workers: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None

    def worker_layout(self) -> dict[Stage, int]:
        """Workers per stage for the embedded farm, in pipeline order."""
        return {stage: self.workers_per_stage.get(stage.value, 1) for stage in Stage}

    def model_dirs(self) -> dict[str, Path]:
        return {"default": self.model_dir, **self.models}

    def served_models(self) -> dict[str, Path]:
        """The models a worker started with these settings loads."""
        every = self.model_dirs()
        unknown = [m for m in self.worker.models if m not in every]
        if unknown:
            raise SettingsError(f"worker models {', '.join(unknown)} are not configured (known: {', '.join(every)})")
        return {m: every[m] for m in self.worker.models} if self.worker.models else every

    @property
    def state_file(self) -> Path:
        return self.home / STATE_FILE_NAME

    def require_secret(self) -> bytes:
        if not self.secret:
            raise SettingsError(
                "no farm secret configured: set REELFARM_SECRET (the same on scheduler and workers) or run `reelfarm up`"
            )
        return self.secret.encode()

    def accepted_secrets(self) -> tuple[bytes, ...]:
        """The secrets a signature may be made with: the current one first, then the previous one (rotation)."""
        current = self.require_secret()
        return (current, self.previous_secret.encode()) if self.previous_secret else (current,)

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise SettingsError(
                "no Redis configured: set REELFARM_REDIS_URL, put redis_url in configs/farm.yaml, or start one with `reelfarm up`"
            )
        return self.redis_url


ENV_VARS: dict[str, tuple[str, ...]] = {
    "REELFARM_REDIS_URL": ("redis_url",),
    "REELFARM_MODEL_DIR": ("model_dir",),
    "REELFARM_SECRET": ("secret",),
    "REELFARM_PREVIOUS_SECRET": ("previous_secret",),
    "REELFARM_HOME": ("home",),
    "REELFARM_S3_ENDPOINT": ("s3", "endpoint_url"),
    "REELFARM_S3_BUCKET": ("s3", "bucket"),
    "REELFARM_S3_ACCESS_KEY": ("s3", "access_key"),
    "REELFARM_S3_SECRET_KEY": ("s3", "secret_key"),
    "REELFARM_S3_REGION": ("s3", "region"),
    "REELFARM_TRANSFER_HOSTNAME": ("transfer", "hostname"),
    "REELFARM_TRANSFER_PROTOCOL": ("transfer", "protocol"),
    "REELFARM_TRANSFER_DEVICE": ("transfer", "device_name"),
    "REELFARM_DEVICE": ("worker", "device"),
    "REELFARM_WORKER_MODELS": ("worker", "models"),
    "REELFARM_WORKERS": ("workers_per_stage",),
}

MAX_WORKERS_PER_STAGE = 16


def parse_worker_counts(text: str) -> dict[str, int]:
    """``"transform=2,decode=2"`` -> ``{"transform": 2, "decode": 2}`` (``reelfarm up --workers``, ``REELFARM_WORKERS``)."""
    counts: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        stage, sep, number = item.partition("=")
        if not sep or not number.strip().isdigit():
            raise SettingsError(f"workers {item!r}: write STAGE=COUNT, e.g. --workers transform=2,decode=2")
        counts[stage.strip()] = int(number)
    return counts


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, nested mappings merged rather than replaced (settings layers, batch defaults)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise SettingsError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise SettingsError(f"config {path} must be a mapping of settings, not {type(loaded).__name__}")
    return loaded


def load_settings(config: Path | None = None, env: dict[str, str] | None = None) -> FarmSettings:
    env = dict(os.environ if env is None else env)
    tree: dict[str, Any] = {}
    config = config or (Path(env["REELFARM_CONFIG"]) if env.get("REELFARM_CONFIG") else None)
    if config is not None:
        tree = read_yaml(config)
    from_env: dict[str, Any] = {}
    for var, path in ENV_VARS.items():
        if env.get(var):
            value: Any = env[var]
            if var == "REELFARM_WORKER_MODELS":
                value = [m.strip() for m in value.split(",") if m.strip()]
            elif var == "REELFARM_WORKERS":
                value = parse_worker_counts(value)
            _set_path(from_env, path, value)
    tree = deep_merge(tree, from_env)
    home = Path(tree.get("home", DEFAULT_HOME))
    state_file = home / STATE_FILE_NAME
    if not tree.get("redis_url") and state_file.exists():
        # The embedded farm (`reelfarm up`) is the fallback, never an override.
        tree = deep_merge(json.loads(state_file.read_text())["settings"], tree)
    try:
        return FarmSettings.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SettingsError(
            f"bad setting {where}: {first['msg']} (check configs/farm.yaml and REELFARM_* env vars)"
        ) from None
