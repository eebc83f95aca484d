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
from scheduler.core.keys import Hop, Stage
from scheduler.core.loras import LoraSource, check_lora_names
from scheduler.core.model_dirs import model_has_two_experts
from scheduler.core.model_options import ModelOptions
from scheduler.core.spec import SpecLimits

DEFAULT_HOME = Path(".reelfarm")
STATE_FILE_NAME = "farm.json"


class SettingsError(UserError, ValueError):
    """Settings that cannot work; the message says which and how to fix it."""


class S3Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # S3 API endpoint (MinIO, SeaweedFS, ...); None = AWS S3.
    endpoint_url: str | None = None
    # Bucket for videos, posters, metadata and batch manifests; created at worker start if missing.
    bucket: str = "reelfarm"
    # Access key id; None (with secret_key None) = boto3's own chain (instance role, ~/.aws).
    access_key: str | None = None
    # Secret access key belonging to access_key.
    secret_key: str | None = None
    # Region name sent with signed requests (most S3-compatible servers accept any).
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

    # The address peers reach this worker's transfer engine at (advertised in its worker record): it must be
    # one of this host's own addresses (a pod IP, the host's LAN address), else the worker refuses to start.
    hostname: str = "127.0.0.1"
    # NAT / port-forwarding set-ups: advertise ``hostname`` although no local interface has it (a warning at start).
    allow_nat_hostname: bool = False
    # Mooncake transport: ``tcp`` or ``rdma``.
    protocol: str = "tcp"
    # RDMA device (e.g. ``mlx5_0``); empty for TCP.
    device_name: str = ""
    # Registered buffers per worker: outputs held for consumers plus the one being written (backpressure).
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

    # How often a worker refreshes its record (from a thread, also during a job).
    heartbeat_seconds: float = Field(default=2.0, gt=0)
    # A worker whose heartbeat key is older than this is dead.
    worker_ttl_seconds: int = Field(default=15, ge=2)
    # A producer holds a slot for this long waiting for the consumer's ack.
    lease_seconds: int = Field(default=600, ge=1)
    # Restarts of a stage before the job is quarantined (FAILED with its history).
    max_attempts: int = Field(default=3, ge=1)
    # Hand-backs of a job by stopping workers (SIGTERM: scale-down, spot preemption) before it fails with that
    # reason; they are counted apart and never charged to max_attempts.
    max_preemptions: int = Field(default=20, ge=1)
    # Backoff before retrying a stage that raised: base * 2^(attempt-1).
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    # How often the maintenance pass (dead workers, delayed retries, stranded dequeues, demand keys) runs.
    reaper_interval_seconds: float = Field(default=5.0, gt=0)
    # On SIGTERM a producer stays up this long for consumers to pull what it still holds.
    shutdown_grace_seconds: float = Field(default=60.0, ge=0)
    # Torch device the stage's model runs on: ``cpu`` or ``cuda``.
    device: str = "cpu"
    # Torch dtype of the model weights, e.g. ``float32``, ``bfloat16``.
    dtype: str = "float32"
    # Models (by name) this worker loads and serves; empty = every model in the farm's settings.
    models: list[str] = Field(default_factory=list)
    # Transform workers of Wan2.2 two-expert models placed apart (model_options experts: split): the one
    # expert this worker loads and serves (its queue transform@high or transform@low); None loads both and
    # serves every transform hop. One-DiT models ignore it. ``reelfarm worker transform --expert``.
    expert: Literal["high", "low"] | None = None
    # Decode workers: the VAE decode spread over a ROWSxCOLS grid of processes, each decoding its spatial
    # shard of every frame (per-process memory falls with the shard's area). Rank 0 is the worker itself,
    # the others start with it and stay up across jobs. "1x1": one process, no group.
    decode_grid: str = Field(default="1x1", pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")
    # A decode-group collective waiting longer than this fails the decode attempt (a rank died or hung).
    decode_group_timeout_seconds: float = Field(default=120.0, gt=0)


class TransformSettings(BaseModel):
    """How a transform worker runs the DiT (speed options; see bench/README.md, "DiT speed options").

    None of these change what a job asks for; one-pass guidance and compilation change floating-point
    rounding only (frames equal the plain loop's within the tolerances the tests state).
    """

    model_config = ConfigDict(extra="forbid")

    # Classifier-free guidance as one DiT call on a batch of 2 (cond + uncond) per step instead of two
    # calls. On by default: faster on the CPUs measured and on GPUs (bench.dit); off reproduces
    # WanPipeline's latents bit for bit.
    one_pass_guidance: bool = True
    # torch.compile the DiT's repeated blocks (diffusers' compile_repeated_blocks) once at worker start;
    # each new latent shape compiles on its first job, never again per job. Off by default: it costs
    # seconds to minutes per shape up front and needs a C++ compiler on CPU.
    compile: bool = False
    # A diffusers attention backend name (set_attention_backend), e.g. "native", "_native_math",
    # "flash" on GPUs with flash-attn; None keeps the model's default (PyTorch SDPA). Checked at start.
    attention_backend: str | None = Field(default=None, min_length=1, max_length=64)
    # Denoise up to this many queued jobs together: a worker that takes a job also takes compatible
    # ones (same model, size, frames and guidance on/off; no step cache) waiting in its queues, and
    # their steps share DiT calls. Each job keeps its own seed, prompt, steps, progress, cancellation,
    # failure and hand-off; its frames equal its solo run within the tests' tolerance. The worker's
    # transfer pool holds at least this many slots, and it takes only as many jobs as it has free
    # slots. 1 (the default) runs one job at a time: batching pays where one job leaves the device
    # idle (a GPU at small sizes); on CPUs it gains little (bench.dit).
    batch_size: int = Field(default=1, ge=1, le=16)
    # How long a worker that took a job waits for compatible jobs to fill its batch.
    batch_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    # Run each job's DiT over this many devices with diffusers' context parallelism (Ulysses): the
    # worker starts N-1 follower processes (GPU r for rank r with worker.device cuda; CPU ranks share
    # the CPU, over gloo) and keeps them across jobs. N must divide the DiT's attention heads. Not with
    # batch_size, compile or jobs asking for a step cache (refused at start, or for the job, in one line).
    context_parallel: int = Field(default=1, ge=1, le=64)
    # Split each job's denoising loop at this step into two transform hops (route
    # encode -> transform@high [0, K) -> transform@low [K, n) -> decode): the first hands its latents and
    # the scheduler's multistep state to the second, which may run on another worker. Frames equal the
    # unsplit job's exactly. A job with K >= its steps runs unsplit. None (the default): no split.
    split_at_step: int | None = Field(default=None, ge=1, le=1000)
    # LoRA adapters a transform worker keeps loaded into its DiT (least recently used dropped first): a job
    # naming a cached one switches to it at no load cost; one past this many costs a fetch and a load.
    lora_cache: int = Field(default=8, ge=1, le=256)
    # Quantize the DiT once at worker start with torchao (frames move within the bound bench/README.md states):
    # int8_dynamic = int8 weights and per-token dynamic int8 activations (CPUs and GPUs); fp8_dynamic = the
    # same in float8 (GPUs with fp8 tensor cores: Hopper, Ada); none = the model's own dtype. Recorded in each
    # job's dit block. Not with context_parallel (its follower ranks keep full-precision copies).
    quantize: Literal["none", "int8_dynamic", "fp8_dynamic"] = "none"


class CheckpointSettings(BaseModel):
    """Never lose DiT work: latent checkpoints, mid-denoise saves and preemption (``workers.checkpoints``)."""

    model_config = ConfigDict(extra="forbid")

    # Write every finished transform's latents to the object store (in the background, after the hand-off),
    # so a decode that cannot pull, or is retried, starts from them instead of re-running the DiT.
    enabled: bool = True
    # Checkpoint objects go under s3://BUCKET/<key_prefix>/<job id>/, apart from the outputs.
    key_prefix: str = "checkpoints"
    # 0: delete a job's checkpoints when its video is complete. N > 0: keep them N days (for
    # `reelfarm decode-from` re-renders).
    retention_days: float = Field(default=0.0, ge=0)
    # What nothing deletes (checkpoints of jobs that failed) goes after this many days, or after
    # retention_days if longer: workers sweep the checkpoint prefix at most once an hour.
    orphan_days: float = Field(default=7.0, gt=0)
    # Save the denoising state every this many steps; 0 = every 10% of the job's steps.
    save_every_steps: int = Field(default=0, ge=0)
    # Jobs with fewer steps never save mid-denoise and are not preempted: finishing costs less.
    save_min_steps: int = Field(default=20, ge=0)
    # SIGTERM on a transform worker mid-denoise (of a job of at least save_min_steps steps): save at the
    # next step boundary, hand the job back, exit. False: finish the job first, as other stages do.
    preempt_on_sigterm: bool = True

    def save_interval(self, steps: int) -> int:
        """Steps between mid-denoise saves for a job of ``steps`` steps; 0 when it never saves."""
        if not self.enabled or steps < max(self.save_min_steps, 2):
            return 0
        return self.save_every_steps or max(1, steps // 10)

    def preempts(self, steps: int) -> bool:
        return self.enabled and self.preempt_on_sigterm and steps >= self.save_min_steps


class FetchSettings(BaseModel):
    """What the farm may fetch on a submitter's behalf (conditioning image URLs); see ``scheduler.intake.fetch_policy``."""

    model_config = ConfigDict(extra="forbid")

    # Hosts (exact names) or CIDR ranges that may be fetched although they are loopback, private,
    # link-local or reserved -- e.g. an image server inside the farm's own network.
    allow: list[str] = Field(default_factory=list)
    # Redirects followed, each re-checked against the policy.
    max_redirects: int = Field(default=3, ge=0, le=10)
    # The whole fetch (every redirect hop, every byte) must finish within this.
    timeout_seconds: float = Field(default=20.0, gt=0)


class WebhookEndpoint(BaseModel):
    """One receiver of the HTTP front's events (``video.completed``, ``video.failed``, ``batch.completed``)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    # Standard Webhooks secret ("whsec_" + base64): the receiver checks each event's signature with it.
    secret: str = Field(min_length=8)
    # Event types sent to this endpoint; empty = all of them.
    events: list[str] = Field(default_factory=list)
    # Only events of what this API key (by name, ``http.api_keys[].name``) created; None = every key's.
    key: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class KeyQuota(BaseModel):
    """What one API key may hold and send (``http.api_keys[].quota``); over one: 429 in OpenAI's shape.

    The defaults keep one key from starving the others on a farm of a few workers: a key's batch waits,
    beyond ``max_active_jobs``, outside the queues (released as its own jobs finish), so another key's
    job is never queued behind more than that many of its jobs.
    """

    model_config = ConfigDict(extra="forbid")

    # The most of the key's jobs in the farm's queues or running at once; a batch's further lines wait
    # (held back, not queued) and a single create over it is refused with Retry-After.
    max_active_jobs: int = Field(default=8, ge=1)
    # Create requests (videos and batches) per minute.
    max_submits_per_minute: int = Field(default=60, ge=1)
    # Lines in one batch input file; a longer batch is refused whole.
    max_batch_lines: int = Field(default=10_000, ge=1)
    # frames x width x height of one job (default: 81 frames at 832x480, Wan2.1's 480p clip).
    max_frame_pixels: int = Field(default=81 * 832 * 480, ge=1)


class ApiKeyEntry(BaseModel):
    """One named API key of the HTTP front: its name (recorded on what it creates), digest, role and quota."""

    model_config = ConfigDict(extra="forbid")

    # Shown in usage and recorded on its jobs, files and batches (never the key itself).
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # SHA-256 hex digest of the key (``reelfarm api-key --name NAME`` prints one).
    hash: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    # user: sees only its own videos, files and batches; admin: everything, including CLI work.
    role: Literal["user", "admin"] = "user"
    # This key's limits; None = ``http.user_quota``. Admin keys have none (the operator's own).
    quota: KeyQuota | None = None


class HttpSettings(BaseModel):
    """The HTTP front (``reelfarm serve``; ``scheduler.http``): where it listens, who may call it, its limits."""

    model_config = ConfigDict(extra="forbid")

    # Loopback by default: exposing the API is a decision (put TLS in front of it).
    host: str = "127.0.0.1"
    # The front's TCP port.
    port: int = Field(default=8000, ge=0, le=65535)
    # SHA-256 hex digests of the accepted bearer API keys (``reelfarm serve --print-key-hash KEY`` makes one);
    # REELFARM_API_KEY adds one key given in clear (hashed at load, never stored). No key: every call is 401.
    api_key_hashes: list[str] = Field(default_factory=list)
    # Named keys ``[{name, hash, role: user|admin, quota}]``; a key in api_key_hashes is an admin key
    # named ``admin-<first 8 hex of its digest>``.
    api_keys: list[ApiKeyEntry] = Field(default_factory=list)
    # The quota of every user key that names none of its own.
    user_quota: KeyQuota = KeyQuota()
    # A JSON request body larger than this is refused with 413 before it is read.
    max_json_bytes: int = Field(default=1 * 2**20, ge=1024)
    # A multipart request (image or batch file upload) larger than this is refused with 413.
    max_upload_bytes: int = Field(default=64 * 2**20, ge=1024)
    # Where uploaded files (batch inputs) and batch result files live, under s3.key_prefix.
    files_prefix: str = "files"
    # Endpoints that receive video.completed / video.failed / batch.completed events (url, secret, events),
    # signed as Standard Webhooks; URLs pass the farm's fetch policy.
    webhooks: list[WebhookEndpoint] = Field(default_factory=list)
    # Delivery attempts per event before it is dropped (logged).
    webhook_max_attempts: int = Field(default=12, ge=1)
    # The first retry delay of a delivery; it doubles with every attempt.
    webhook_backoff_seconds: float = Field(default=1.0, gt=0)
    # The longest delay between two attempts of one delivery.
    webhook_max_backoff_seconds: float = Field(default=600.0, gt=0)
    # How often the front looks for finished jobs and due webhook deliveries.
    watch_interval_seconds: float = Field(default=1.0, gt=0)


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
