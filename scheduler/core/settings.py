"""Farm settings: one typed object, read from a YAML file and ``REELFARM_*`` env vars.

Resolution order (later wins): built-in defaults, ``configs/farm.yaml`` (or the
file named by ``--config`` / ``REELFARM_CONFIG``), the embedded farm's state file
when ``reelfarm up`` is running and no Redis URL was configured, then env vars.
Secrets (Redis password, S3 keys, the HMAC farm secret) may come from any of
them; the embedded farm generates its own and keeps them in a 0600 file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scheduler.core.errors import UserError

# The sections live in modules of their own; re-exported (``X as X``) so every setting imports from here.
from scheduler.core.http_settings import ApiKeyEntry as ApiKeyEntry
from scheduler.core.http_settings import FetchSettings as FetchSettings
from scheduler.core.http_settings import HttpSettings as HttpSettings
from scheduler.core.http_settings import KeyQuota as KeyQuota
from scheduler.core.http_settings import WebhookEndpoint as WebhookEndpoint
from scheduler.core.keys import Hop, Stage
from scheduler.core.loras import LoraSource, check_lora_names
from scheduler.core.model_dirs import model_has_two_experts
from scheduler.core.model_options import ModelOptions
from scheduler.core.spec import SpecLimits
from scheduler.core.stage_settings import CheckpointSettings as CheckpointSettings
from scheduler.core.stage_settings import S3Settings as S3Settings
from scheduler.core.stage_settings import TransferSettings as TransferSettings
from scheduler.core.stage_settings import TransformSettings as TransformSettings
from scheduler.core.stage_settings import WorkerSettings as WorkerSettings

DEFAULT_HOME = Path(".reelfarm")
STATE_FILE_NAME = "farm.json"


class SettingsError(UserError, ValueError):
    """Settings that cannot work; the message says which and how to fix it."""


class FarmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ``redis://[USER:]PASSWORD@host:6379/0``, ``rediss://`` for TLS, or
    # ``redis+sentinel://[:PASSWORD@]host:26379,host:26379/MASTER_NAME/0`` for a primary behind Sentinel;
    # None = the embedded farm's.
    redis_url: str | None = None
    # ``rediss://``: the CA bundle (PEM) that signed the server's certificate; None = the system's CAs.
    redis_ca_file: Path | None = None
    # ``replica``: a job's creation, a stage's hand-off and a job's finish wait (WAIT) until a replica has them,
    # when the server has one, so a failover cannot lose what the farm acknowledged; ``local``: never wait.
    redis_durability: Literal["replica", "local"] = "replica"
    # How long such a write waits for its replica; a wait that times out is logged and counted, never ignored.
    redis_wait_timeout_seconds: float = Field(default=1.0, gt=0)
    # The default model: a Wan2.1 directory in diffusers format (the tiny one is built when missing).
    model_dir: Path = DEFAULT_HOME / "models" / "tiny-wan-t2v"
    # More models this farm serves, by name (jobs pick one with their `model` field).
    models: dict[str, Path] = Field(default_factory=dict)
    # Farm secret for stage-call and descriptor HMACs; the same on scheduler and every worker.
    secret: str | None = None
    # Rotation: workers also accept calls and descriptors signed with this one (see README, Security).
    previous_secret: str | None = None
    # Local state: the embedded farm's servers, logs and settings file; batch manifests.
    home: Path = DEFAULT_HOME
    s3: S3Settings = S3Settings()
    transfer: TransferSettings = TransferSettings()
    worker: WorkerSettings = WorkerSettings()
    # The transform stage's speed options (one-pass guidance, compilation, attention backend).
    transform: TransformSettings = TransformSettings()
    # Largest job specs the farm accepts at submit.
    limits: SpecLimits = SpecLimits()
    fetch: FetchSettings = FetchSettings()
    http: HttpSettings = HttpSettings()
    checkpoints: CheckpointSettings = CheckpointSettings()
    # LoRA adapters jobs may name (spec ``loras``): NAME: PATH or s3://bucket/key.safetensors, or
    # NAME: {source, sha256, expert}. `reelfarm lora add` registers more in the farm's bucket.
    loras: dict[str, LoraSource] = Field(default_factory=dict)
    # Per model (``default`` or a name in ``models``): its sampler (solver, shift) and LoRAs added to
    # every job of it, e.g. a 4-step distillation: {sampler: {solver: euler, shift: 5.0}, loras: [{name: distill}]}.
    model_options: dict[str, ModelOptions] = Field(default_factory=dict)
    # Spec fields applied when a submission leaves them out (e.g. small sizes for the tiny model).
    spec_defaults: dict[str, Any] = Field(default_factory=dict)
    # How many workers of each stage the embedded farm (`reelfarm up`) starts; a stage left out gets one.
    workers_per_stage: dict[str, int] = Field(default_factory=dict)

    _lora_names = field_validator("loras")(check_lora_names)

    @field_validator("workers_per_stage")
    @classmethod
    def _known_stages(cls, value: dict[str, int]) -> dict[str, int]:
        # A stage, or a Wan2.2 expert's hop (transform@high / transform@low: workers holding that expert).
        stages = [*(stage.value for stage in Stage), "transform@high", "transform@low"]
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

    @model_validator(mode="after")
    def _options_for_served_models(self) -> FarmSettings:
        unknown = [name for name in self.model_options if name not in self.model_dirs()]
        if unknown:
            raise ValueError(
                f"model_options {unknown[0]!r} is not a model of this farm (it has: {', '.join(self.model_dirs())})"
            )
        return self

    def worker_layout(self) -> dict[Hop, int]:
        """Workers per hop for the embedded farm, in route order.

        A served two-expert model placed ``split`` gets one worker per expert hop (``transform@high``,
        ``transform@low``, each loading only its expert) instead of the plain transform worker, which stays
        only where a one-DiT model needs it (or ``transform`` is counted explicitly).
        """
        counts = self.workers_per_stage
        served = self.served_models()
        split = [
            name
            for name, model_dir in served.items()
            if model_has_two_experts(model_dir)
            and (self.model_options.get(name) is None or self.model_options[name].experts in (None, "split"))
        ]
        layout: dict[Hop, int] = {}
        for stage in Stage:
            if stage is not Stage.TRANSFORM or not split:
                layout[stage] = counts.get(stage.value, 1)
                continue
            if len(split) < len(served) or "transform" in counts:
                layout[stage] = counts.get(stage.value, 1)
            for hop in ("transform@high", "transform@low"):
                layout[Hop(hop)] = counts.get(hop, 1)
        return layout

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
    "REELFARM_REDIS_CA_FILE": ("redis_ca_file",),
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
    "REELFARM_TRANSFER_ALLOW_NAT": ("transfer", "allow_nat_hostname"),
    "REELFARM_DEVICE": ("worker", "device"),
    "REELFARM_WORKER_MODELS": ("worker", "models"),
    "REELFARM_WORKERS": ("workers_per_stage",),
    "REELFARM_HTTP_HOST": ("http", "host"),
    "REELFARM_HTTP_PORT": ("http", "port"),
    "REELFARM_API_KEY": ("http", "api_key_hashes"),
}

MAX_WORKERS_PER_STAGE = 16


def api_key_hash(key: str) -> str:
    """How an API key is stored: its SHA-256 hex digest (a key is random and long, so no slow hash is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


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
            elif var == "REELFARM_API_KEY":
                value = [*tree.get("http", {}).get("api_key_hashes", []), api_key_hash(value)]
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
