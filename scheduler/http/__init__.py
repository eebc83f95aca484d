"""The HTTP front: OpenAI's Videos, Files and Batches APIs over the farm's control plane, webhooks, a status page.

Control plane only (never torch): it calls the same functions as the CLI --
``intake.submit``, ``ops.job_admin``, ``ops.batch`` -- and streams results
from the object store.

- ``app``: the FastAPI app (routers, error shape, limits, ``/healthz``, ``/metrics``, ``/openapi.json``);
- ``server``: uvicorn plus the background loop (deletions, webhook outbox); ``python -m scheduler.http``;
- ``auth``: bearer API keys (hashed, constant-time); ``limits``: body size limits (413); ``errors``: OpenAI's error shape;
- ``videos`` with ``video_requests`` (request -> spec) and ``video_objects`` (record -> Video); ``content``: ranged streaming;
- ``files`` and ``batches``: OpenAI's Files and Batch APIs on reelfarm batches;
- ``webhooks``: signed events from a durable Redis outbox; ``status_page``: the HTML page at ``/``.
"""
