"""The HTTP front's settings: API keys and their quotas, webhooks, the URL fetch policy (sections of
`scheduler.core.settings.FarmSettings`, which re-exports them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
