"""Least privilege inside the farm: one Redis ACL user per role, written as an ACL file by ``reelfarm redis-acl``.

Every component used to hold the same credentials, so the HTTP front could rewrite worker records and a
worker could read every tenant's files. Each role now gets the commands and key patterns its job needs:

- ``worker``: the stage workers (and their maintenance pass: reaper, demand recount) -- rq's queues and
  registries, job records, rooms, worker records and acks, in-flight and delayed calls, demand lists;
  nothing of the HTTP front (``reelfarm:api:*``, webhooks) and no batch or cron records;
- ``http``: the HTTP front -- submits and cancels (rq queues, job records, demand), batches, its own
  ``reelfarm:api:*`` and webhook keys; worker records, rooms, acks and in-flight calls read-only;
- ``scheduler``: the CLI and cron -- submits, batches, cron ticks, cancels and retries; worker records,
  rooms and acks read-only; nothing of the HTTP front's;
- ``keda``: the autoscaler -- ``LLEN`` (and ``PING``) on the demand lists, read-only, nothing else;
- ``admin``: the operator's own user, everything (``reelfarm`` maintenance by hand, backups).

No role but admin gets ``@admin`` or ``@dangerous`` commands (CONFIG, FLUSHALL, KEYS, DEBUG, SHUTDOWN,
MONITOR, ACL...); ``INFO`` and ``CLIENT SETNAME``/``ID`` are given back where rq and redis-py ask for them.
The ``default`` user is switched off: every connection names its role. Passwords are stored in the file as
SHA-256 digests (``#<hex>``), so the file holds nothing a reader could log in with; the clear passwords
are returned once, for the roles' ``redis_url`` settings.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from scheduler.core.keys import PREFIX

# Commands every service role may run: all but the server-wide admin and dangerous ones, plus the
# connection and introspection calls rq and redis-py make on connect.
_SERVICE_COMMANDS = "+@all -@admin -@dangerous +info +client|setname +client|getname +client|id +client|info"
# What the farm's own processes read and write, by family (see ``scheduler.core.keys``).
_QUEUES = ("rq:*",)
_JOBS = (f"{PREFIX}:job:*", f"{PREFIX}:jobs", f"{PREFIX}:demand:*", f"{PREFIX}:delayed", f"{PREFIX}:delayed:*")
_WORKER_STATE = (
    f"{PREFIX}:room:*",
    f"{PREFIX}:worker:*",
    f"{PREFIX}:workers",
    f"{PREFIX}:acks:*",
    f"{PREFIX}:inflight",
)
_MAINTENANCE = (f"{PREFIX}:lock:*", f"{PREFIX}:stranded:*", f"{PREFIX}:refused", f"{PREFIX}:refused:*")
_BATCHES = (f"{PREFIX}:batch:*", f"{PREFIX}:batches", f"{PREFIX}:cron:*")
_FRONT = (f"{PREFIX}:api:*", f"{PREFIX}:webhooks:*")


@dataclass(frozen=True)
class Role:
    name: str
    commands: str
    read_write: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    what: str = ""

    def rule(self, password_digest: str) -> str:
        parts = [f"user {self.name}", "on", f"#{password_digest}", "resetkeys", "resetchannels"]
        parts += [f"~{pattern}" for pattern in self.read_write]
        parts += [f"%R~{pattern}" for pattern in self.read_only]
        parts += [f"&{channel}" for channel in self.channels]
        parts += ["-@all", *self.commands.split()]
        return " ".join(parts)


ROLES = (
    Role(
        "worker",
        _SERVICE_COMMANDS,
        read_write=(*_QUEUES, *_JOBS, *_WORKER_STATE, *_MAINTENANCE),
        channels=("rq:*",),
        what="stage workers (REELFARM_REDIS_URL of `reelfarm worker`)",
    ),
    Role(
        "http",
        _SERVICE_COMMANDS,
        read_write=(*_QUEUES, *_JOBS, *_BATCHES, *_FRONT, f"{PREFIX}:refused", f"{PREFIX}:refused:*"),
        read_only=_WORKER_STATE,
        channels=("rq:*",),
        what="the HTTP front (`reelfarm serve`)",
    ),
    Role(
        "scheduler",
        _SERVICE_COMMANDS,
        read_write=(*_QUEUES, *_JOBS, *_BATCHES, *_MAINTENANCE),
        read_only=_WORKER_STATE,
        channels=("rq:*",),
        what="the CLI and cron (`reelfarm batch`, `reelfarm cron`)",
    ),
    Role(
        "keda",
        "+llen +ping +select +hello",
        read_only=(f"{PREFIX}:demand:*",),
        what="the KEDA scaler (TriggerAuthentication username/password)",
    ),
    Role("admin", "+@all", read_write=("*",), channels=("*",), what="the operator, by hand"),
)


def password_digest(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def render_acl(passwords: dict[str, str]) -> str:
    """The ACL file for ``passwords`` (role -> clear password): one line per role, the default user off."""
    # No comment lines: an ACL file may hold only `user` lines (the server refuses to load anything else).
    lines = [role.rule(password_digest(passwords[role.name])) for role in ROLES]
    lines.append("user default off resetkeys resetchannels -@all")
    return "\n".join(lines) + "\n"


def new_passwords() -> dict[str, str]:
    return {role.name: secrets.token_urlsafe(24) for role in ROLES}


def role_url(base_url: str, role: str, password: str) -> str:
    """``redis://host:port/db`` with ``role``'s credentials (any credentials in ``base_url`` replaced)."""
    scheme, _, rest = base_url.partition("://")
    rest = rest.rpartition("@")[2]
    return f"{scheme}://{role}:{password}@{rest}"
