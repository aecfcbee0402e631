"""The embedded dashboard: one HTML page, a script and a style sheet, served by the admin server.

The page is a client of the admin API like any other (`/api/v1/analytics/*`,
`/api/v1/budgets`, read over HTTP with the bearer token the user gives it), so
the core knows no component: whichever exporter serves those paths feeds it, and
without one the page says so. Chart.js is vendored under `static/vendor/` (its
licence beside it) because the daemon must work with no internet. The page and
its static files need no token: they hold no data.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere; saying so also stops an injected script
# from sending the token away.
_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
           "connect-src 'self'; frame-ancestors 'none'")


def add_routes(app: web.Application) -> None:
    """`/` (the page) and `/static/...` (its files) on the admin app."""

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": _POLICY, "Cache-Control": "no-cache"})

    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
