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


# What `/static/...` serves: the files under static/, by their path there, and nothing else.
# (aiohttp's static route looks up any path it is asked for on the disk: a name longer than
# the file system takes was an OSError, a 500.)
_FILES = {path.relative_to(STATIC).as_posix(): path
          for path in STATIC.rglob("*") if path.is_file()}


def add_routes(app: web.Application) -> None:
    """`/` (the page) and `/static/...` (its files) on the admin app."""

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": _POLICY, "Cache-Control": "no-cache"})

    async def static(request: web.Request) -> web.StreamResponse:
        path = _FILES.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name:.+}", static)
