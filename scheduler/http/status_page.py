"""The status page at ``/``: queues and workers, the newest jobs with live progress, posters and playback of
finished videos, and batches with their progress and timeline picture.

Server-rendered HTML (every value escaped: prompts are user text) with a little JavaScript that polls
``/v1/videos`` and moves the progress bars, adding the poster and the player when a job completes. It
needs the API key like every route: a browser cannot add a header to a page load, so ``POST /login``
with the key sets an HttpOnly, SameSite=Strict cookie that ``auth`` accepts for GET and HEAD only.
"""

from __future__ import annotations

import html
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from scheduler.core import keys
from scheduler.core.job_record import read_records
from scheduler.http.auth import COOKIE_NAME, Caller
from scheduler.http.errors import ApiError
from scheduler.http.ownership import index_for
from scheduler.http.state import Front, caller_of, front_of, require_key
from scheduler.http.video_objects import video_object
from scheduler.ops import batch, job_admin

router = APIRouter(include_in_schema=False)

JOBS_SHOWN = 20
BATCHES_SHOWN = 5
_SECURITY_HEADERS = {
    # Only this server's own scripts, images and media; no framing by other sites.
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
    "'unsafe-inline'; img-src 'self'; media-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
progress{width:9em}.media img{height:48px;margin-right:.5em}.media video{height:96px}.muted{color:#888}
.state-completed{color:#27632a}.state-failed{color:#a12}img.timeline{max-width:720px;border:1px solid #ddd}
"""

_SCRIPT = """
const rows = () => Array.from(document.querySelectorAll('tr[data-video]'));
function media(id) {
  const base = '/v1/videos/' + encodeURIComponent(id) + '/content';
  return '<img class="poster" alt="poster" src="' + base + '?variant=thumbnail">' +
         '<video class="player" controls muted preload="metadata" src="' + base + '"></video>';
}
async function refresh() {
  try {
    const answer = await fetch('/v1/videos?limit=JOBS_SHOWN', {credentials: 'same-origin'});
    if (!answer.ok) return;
    const seen = new Set(rows().map(r => r.dataset.video));
    for (const video of (await answer.json()).data) {
      const row = document.querySelector('tr[data-video="' + CSS.escape(video.id) + '"]');
      if (!row) { if (!seen.has(video.id)) { location.reload(); return; } continue; }
      row.querySelector('.state').textContent = video.status;
      row.querySelector('.state').className = 'state state-' + video.status;
      row.querySelector('progress').value = video.progress;
      row.querySelector('.pct').textContent = video.progress + '%';
      const cell = row.querySelector('.media');
      if (video.status === 'completed' && !cell.querySelector('video')) cell.innerHTML = media(video.id);
      if (video.error) cell.textContent = video.error.message;
    }
  } finally { setTimeout(refresh, 500); }
}
setTimeout(refresh, 500);
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _job_rows(front: Front, caller: Caller) -> str:
    ids = [m.decode() for m in front.conn.zrevrange(index_for(caller, "videos"), 0, JOBS_SHOWN - 1)]  # type: ignore[union-attr]
    rows = []
    for job_id, fields in read_records(front.conn, ids):
        if fields is None:
            continue
        video = video_object(job_id, fields)
        base = f"/v1/videos/{_e(job_id)}/content"
        media = ""
        if video["status"] == "completed":
            media = (
                f'<img class="poster" alt="poster" src="{base}?variant=thumbnail">'
                f'<video class="player" controls muted preload="metadata" src="{base}"></video>'
            )
        elif video["error"]:
            media = _e(video["error"]["message"])
        rows.append(
            f'<tr data-video="{_e(job_id)}"><td><code>{_e(job_id)}</code></td>'
            f'<td class="state state-{_e(video["status"])}">{_e(video["status"])}</td>'
            f'<td><progress max="100" value="{video["progress"]}"></progress> <span class="pct">{video["progress"]}%</span></td>'
            f'<td>{_e(video["size"])}, {_e(video["seconds"])} s</td><td class="media">{media}</td>'
            f"<td>{_e(video['prompt'] or '')[:120]}</td></tr>"
        )
    if not rows:
        return '<p class="muted">no jobs yet</p>'
    header = "".join(f"<th>{h}</th>" for h in ("video", "status", "progress", "size", "result", "prompt"))
    return f'<table id="jobs"><tr>{header}</tr>{"".join(rows)}</table>'


def _visible_batches(front: Front, caller: Caller) -> list[dict[str, Any]]:
    if caller.admin:
        return batch.list_batches(front.conn, limit=BATCHES_SHOWN)
    # A user key's batches are its API batches (the reelfarm batch of each is named after the batch id).
    names = [m.decode() for m in front.conn.zrevrange(index_for(caller, "batches"), 0, BATCHES_SHOWN - 1)]  # type: ignore[union-attr]
    return [batch.read_batch(front.conn, name) for name in names if front.conn.exists(keys.batch_key(name))]


def _batches(front: Front, caller: Caller) -> str:
    parts = []
    for record in _visible_batches(front, caller):
        states: dict[str, int] = record["states"]
        total = sum(states.values())
        done = sum(n for s, n in states.items() if s in ("succeeded", "failed", "cancelled"))
        name = record["name"]
        counts = ", ".join(f"{n} {_e(s)}" for s, n in sorted(states.items())) or "no jobs"
        parts.append(
            f'<div class="batch"><h3>{_e(name)}</h3><progress max="{total or 1}" value="{done}"></progress> '
            f"{done}/{total} finished ({counts})<br>"
            f'<img class="timeline" loading="lazy" alt="timeline of {_e(name)}" '
            f'src="/status/batches/{_e(name)}/timeline.png"></div>'
        )
    return "".join(parts) or '<p class="muted">no batches yet</p>'


def render_page(front: Front, caller: Caller) -> str:
    """The page as ``caller`` may see it: farm-wide queues and workers, and its own jobs and batches (all
    of them for an admin key; a user key is not shown which job a worker runs)."""
    models = list(front.settings.model_dirs())
    queues = [
        [_e(q.stage), _e(q.model), *[str(q.depths[p]) for p in keys.PRIORITIES], str(q.total)]
        for q in job_admin.queue_rows(front.conn, models)
    ]
    workers = [
        [
            _e(w.worker_id),
            _e(w.stage),
            _e(w.state),
            _e(w.current_job or "-") if caller.admin else "-",
            _e(w.model),
            f"{w.heartbeat_age:.1f}s ago",
        ]
        for w in job_admin.worker_rows(front.conn)
    ]
    script = _SCRIPT.replace("JOBS_SHOWN", str(JOBS_SHOWN))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>reelfarm status</title>'
        f"<style>{_STYLE}</style></head><body><h1>reelfarm</h1>"
        f'<p class="muted">as of {time.strftime("%Y-%m-%d %H:%M:%S")}; progress updates live</p>'
        "<h2>Queues</h2>"
        + _table(["stage", "model", *keys.PRIORITIES, "total"], queues, "no queues")
        + "<h2>Workers</h2>"
        + _table(["worker", "stage", "state", "job", "model", "heartbeat"], workers, "no live workers")
        + "<h2>Jobs</h2>"
        + _job_rows(front, caller)
        + "<h2>Batches</h2>"
        + _batches(front, caller)
        + f"<script>{script}</script></body></html>"
    )


def _login_page(message: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>reelfarm: API key</title>'
        f"<style>{_STYLE}</style></head><body><h1>reelfarm</h1><p>{_e(message)}</p>"
        '<form method="post" action="/login"><label>API key <input type="password" name="key" id="key" '
        'autocomplete="off" required></label> <button type="submit" id="login">Open the status page</button></form>'
        "</body></html>"
    )


@router.get("/", response_class=HTMLResponse)
def status_page(request: Request) -> HTMLResponse:
    front = front_of(request)
    key = front.keys.presented_key(request)
    caller = None if key is None else front.keys.caller_for(key)
    if caller is None:
        message = "This page needs the farm's API key (`reelfarm up` prints it)."
        return HTMLResponse(_login_page(message), status_code=401, headers=_SECURITY_HEADERS)
    return HTMLResponse(render_page(front, caller), headers=_SECURITY_HEADERS)


@router.post("/login")
async def login(request: Request) -> Response:
    front = front_of(request)
    form = await request.form(max_files=0, max_fields=4)
    key = form.get("key")
    if not isinstance(key, str) or not front.keys.accepts(key):
        return HTMLResponse(
            _login_page("That API key is not valid; use the key `reelfarm up` printed."),
            status_code=401,
            headers=_SECURITY_HEADERS,
        )
    answer = RedirectResponse("/", status_code=303)
    answer.set_cookie(COOKIE_NAME, key, httponly=True, samesite="strict", path="/")
    return answer


@router.get("/status/batches/{name}/timeline.png", dependencies=[Depends(require_key)])
async def batch_timeline(name: str, request: Request) -> Response:
    from scheduler.ops.timeline import batch_report

    front = front_of(request)
    caller = caller_of(request)
    mine = caller.admin or bool(front.conn.zscore(index_for(caller, "batches"), name))
    if not keys.BATCH_NAME_PATTERN.match(name) or not mine:
        raise ApiError(404, f"batch {name!r} not found; see the batches on the status page", code="not_found")

    def draw() -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "timeline.png"
            batch_report(front.conn, name, png)
            return png.read_bytes()

    return Response(await run_in_threadpool(draw), media_type="image/png", headers={"Cache-Control": "no-store"})
