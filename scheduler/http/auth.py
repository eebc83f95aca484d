"""Bearer API keys: every route but ``/healthz`` needs one, and the key that matched is the request's caller.

Keys are configured as SHA-256 digests: named ones in ``http.api_keys`` (name, role, quota) and the older
unnamed list ``http.api_key_hashes`` (admin keys, named ``admin-<first 8 hex of the digest>``); or one key
in clear through ``REELFARM_API_KEY``, hashed at load. So the settings and the embedded farm's state never
hold a key a reader could replay -- except the one ``reelfarm up`` generated, which its 0600 state file
keeps so ``up`` can show it. A presented key is hashed and compared with every configured digest with
``hmac.compare_digest`` (constant time, and all of them, so timing says nothing about which digest nearly
matched).

What a key created is recorded under its name (``Caller.name``), never the key or its digest. A ``user``
key sees only what it created; an ``admin`` key sees everything, CLI-submitted work included.

The status page is opened by a browser, which cannot add a header to a page
load: ``POST /login`` with the key sets an HttpOnly, SameSite=Strict cookie
holding it, and the cookie is accepted for GET and HEAD only, so a cross-site
form can never use it to create, cancel or delete anything.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from scheduler.core.settings import HttpSettings, KeyQuota, api_key_hash
from scheduler.http.errors import ApiError

COOKIE_NAME = "reelfarm_key"
_READ_ONLY = frozenset({"GET", "HEAD"})
# RFC 6750: a 401 names the scheme the client should use.
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="reelfarm"'}


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: the key's name, whether it is an admin, and its quota (None for admins)."""

    name: str
    admin: bool
    quota: KeyQuota | None

    def may_see(self, owner: str | None) -> bool:
        """Whether this caller may see a job, file or batch whose creator is ``owner`` (None: CLI or cron)."""
        return self.admin or (owner is not None and hmac.compare_digest(owner, self.name))


def legacy_key_name(digest: str) -> str:
    return f"admin-{digest.strip().lower()[:8]}"


class ApiKeys:
    def __init__(self, http: HttpSettings) -> None:
        self._callers: list[tuple[str, Caller]] = [
            (digest.strip().lower(), Caller(legacy_key_name(digest), True, None)) for digest in http.api_key_hashes
        ]
        for entry in http.api_keys:
            admin = entry.role == "admin"
            quota = None if admin else (entry.quota or http.user_quota)
            self._callers.append((entry.hash.lower(), Caller(entry.name, admin, quota)))

    @property
    def callers(self) -> list[Caller]:
        return [caller for _, caller in self._callers]

    def caller_for(self, key: str) -> Caller | None:
        presented = api_key_hash(key)
        found: Caller | None = None
        for digest, caller in self._callers:
            # No early exit: the time taken does not depend on which digest matched.
            if hmac.compare_digest(presented, digest) and found is None:
                found = caller
        return found

    def accepts(self, key: str) -> bool:
        return self.caller_for(key) is not None

    def presented_key(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if request.method in _READ_ONLY:
            return request.cookies.get(COOKIE_NAME)
        return None

    def check(self, request: Request) -> Caller:
        """The caller ``request``'s key names; a 401 in OpenAI's shape unless it carries an accepted key."""
        key = self.presented_key(request)
        if key is None:
            raise ApiError(
                401,
                "no API key given: send the header 'Authorization: Bearer KEY' (`reelfarm up` prints the key)",
                code="missing_api_key",
                headers=_CHALLENGE,
            )
        caller = self.caller_for(key)
        if caller is None:
            raise ApiError(
                401,
                "the API key is not valid: use a key configured in http.api_keys or the one `reelfarm up` printed",
                code="invalid_api_key",
                headers=_CHALLENGE,
            )
        return caller
