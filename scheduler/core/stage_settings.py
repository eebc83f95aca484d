"""The farm settings of the data plane's parts: S3, the tensor transfer, workers, the transform stage and
its checkpoints (sections of `scheduler.core.settings.FarmSettings`, which re-exports them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
