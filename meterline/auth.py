"""Bearer-token authentication, written once for every listener that takes an `auth_token`
(the `webhook`, `otlp` and `prometheus` components, the admin server).

A request is admitted when no token is set, or when its `Authorization` header (gRPC:
its `authorization` metadata) is exactly `Bearer <token>`, compared in constant time so
that the answer's timing tells nothing of the token. A refused HTTP request gets a 401
saying `missing or wrong bearer token`.
"""

from __future__ import annotations

import hmac

from aiohttp import web

REFUSAL = "missing or wrong bearer token"


class BearerToken:
    """The `auth_token` of a listener (None or empty: every request is admitted)."""

    def __init__(self, token: str | None) -> None:
        self.expected = f"Bearer {token}".encode() if token else None

    def admits(self, authorization: str | None) -> bool:
        """Whether a request with this `Authorization` header (None: none) may pass."""
        if self.expected is None:
            return True
        return hmac.compare_digest((authorization or "").encode(), self.expected)

    def admits_request(self, request: web.Request) -> bool:
        return self.admits(request.headers.get("Authorization"))


def unauthorised(plain_text: bool = False) -> web.Response:
    """The 401 answer: a JSON `{"error": ...}`, or a line of text (for scrapers)."""
    if plain_text:
        return web.Response(status=401, text=f"{REFUSAL}\n")
    return web.json_response({"error": REFUSAL}, status=401)
