"""Bearer API keys: every route but ``/healthz`` needs one.

Keys are configured as SHA-256 digests (``http.api_key_hashes``; or one key in
clear through ``REELFARM_API_KEY``, hashed at load), so the settings and the
embedded farm's state never hold a key a reader could replay -- except the one
``reelfarm up`` generated, which its 0600 state file keeps so ``up`` can show it.
A presented key is hashed and compared with every configured digest with
``hmac.compare_digest`` (constant time, and all of them, so timing says nothing
about which digest nearly matched).

The status page is opened by a browser, which cannot add a header to a page
load: ``POST /login`` with the key sets an HttpOnly, SameSite=Strict cookie
holding it, and the cookie is accepted for GET and HEAD only, so a cross-site
form can never use it to create, cancel or delete anything.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from scheduler.core.settings import api_key_hash
from scheduler.http.errors import ApiError

COOKIE_NAME = "reelfarm_key"
_READ_ONLY = frozenset({"GET", "HEAD"})
# RFC 6750: a 401 names the scheme the client should use.
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="reelfarm"'}


class ApiKeys:
    def __init__(self, digests: list[str]) -> None:
        self._digests = [d.strip().lower() for d in digests]

    def accepts(self, key: str) -> bool:
        presented = api_key_hash(key)
        matched = False
        for digest in self._digests:
            # No early exit: the time taken does not depend on which digest matched.
            matched |= hmac.compare_digest(presented, digest)
        return matched

    def presented_key(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if request.method in _READ_ONLY:
            return request.cookies.get(COOKIE_NAME)
        return None

    def check(self, request: Request) -> None:
        """Raise a 401 in OpenAI's shape unless ``request`` carries an accepted key."""
        key = self.presented_key(request)
        if key is None:
            raise ApiError(
                401,
                "no API key given: send the header 'Authorization: Bearer KEY' (`reelfarm up` prints the key)",
                code="missing_api_key",
                headers=_CHALLENGE,
            )
        if not self.accepts(key):
            raise ApiError(
                401,
                "the API key is not valid: use a key configured in http.api_key_hashes or the one `reelfarm up` printed",
                code="invalid_api_key",
                headers=_CHALLENGE,
            )
