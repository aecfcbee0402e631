"""The admin server: health, readiness, the daemon's own metrics, the live tap, the dashboard.

`/healthz` answers while the process runs; `/readyz` once every component has
started; `/metrics` is the self-telemetry in Prometheus text format;
`/api/v1/status` shows the running pipelines, the reload count and the queues;
`/api/v1/audit?limit=N` the audit log of configuration changes, newest first (what
`meterline audit` reads), and `POST /api/v1/reload` reloads pipeline.yaml as SIGHUP does
(recorded with the trigger `admin_api`);
`/api/v1/tap?filter=JSON` streams the events leaving the processors as NDJSON
(what `meterline tap` reads). Other `/api/v1/...` paths are served by components
(`Component.admin_routes`), such as the analytics API of the `finops` extension (GET)
and its billing import (`POST /api/v1/billing/import`).
`/` is the embedded dashboard (`meterline.dashboard`), which reads those APIs.
`/api/*` requires the bearer token when `service.admin.auth_token` is set.
The listener takes the settings of every listener (`meterline.httpserver`): limits and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meterline import dashboard
from meterline.audit import KEEP as AUDIT_KEEP
from meterline.auth import BearerToken, unauthorised
from meterline.config import AdminConfig
from meterline.event import to_jsonl
from meterline.filtering import MAX_PATTERN_DEPTH, Filter, FilterError, Pattern
from meterline.httpserver import serve
from meterline.params import whole_number
from meterline.pipeline import Tap

if TYPE_CHECKING:
    from meterline.service import Service


# The server's own paths under /api/v1/ and the method each takes (routed in __init__).
_OWN = {"status": ["GET"], "tap": ["GET"], "audit": ["GET"], "reload": ["POST"]}
# Taps open at once. A tap lasts as long as its reader stays, filters every batch on the
# event loop and holds up to 256 batches for a slow reader: without a bound, a client
# opening them by the hundred (max_connections) would stall and swell the daemon.
MAX_TAPS = 16


class AdminServer:
    def __init__(self, service: Service, config: AdminConfig) -> None:
        self.service = service
        self.config = config
        self.auth = BearerToken(config.auth_token)
        self.app = web.Application(middlewares=[self._auth])
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/api/v1/status", self.status)
        self.app.router.add_get("/api/v1/tap", self.tap)
        self.app.router.add_get("/api/v1/audit", self.audit)
        self.app.router.add_post("/api/v1/reload", self.reload)
        # every other method and path under /api/v1/: the components' paths, and a 405
        # naming the method a path takes when it is asked with another (POST /api/v1/audit)
        self.app.router.add_route("*", "/api/v1/{path:.+}", self.component_route)
        dashboard.add_routes(self.app)
        self.runner: web.AppRunner | None = None
        self._closing = False

    async def start(self) -> None:
        # bodies as sent: a handler reads its own with `read_body`, which decodes them
        # within its bound (aiohttp's decoding answered a body that does not decode 500)
        self.runner = await serve(self.app, self.config.listen, self.config, self.service.log,
                                  decode_bodies=False)
        self.service.log.info("admin server listening", listen=self.config.listen)

    async def shutdown(self) -> None:
        self._closing = True  # ends the taps' streams
        if self.runner is not None:
            await self.runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/") and not self.auth.admits_request(request):
            return unauthorised()
        return await handler(request)

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        if self.service.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    async def metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.service.telemetry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, _: web.Request) -> web.Response:
        return web.json_response(self.service.status())

    async def audit(self, request: web.Request) -> web.Response:
        try:
            limit = whole_number("limit", request.query.get("limit", "100"), 1, 2 * AUDIT_KEEP)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        entries = await asyncio.to_thread(self.service.audit.entries, limit)
        return web.json_response({"entries": entries})

    async def reload(self, _: web.Request) -> web.Response:
        """Reload as SIGHUP does; 200 with the audit entry when applied, else 422."""
        applied = await self.service.reload(self.service.config_path, "admin_api")
        return web.json_response({"applied": applied, "entry": self.service.last_reload},
                                 status=200 if applied else 422)

    async def component_route(self, request: web.Request) -> web.StreamResponse:
        """Paths served by components; looked up per request, so a reload may change them.
        A GET (or HEAD) is served by the route named by its path, another method by the
        one named `METHOD path` (see `Component.admin_routes`). A path that exists but
        does not take the request's method (the server's own too: a POST to
        `/api/v1/audit` reaches here) is a 405 naming the methods it takes."""
        path = request.match_info["path"]
        routes = self.service.admin_routes()
        get = request.method in ("GET", "HEAD")
        handler = None if path in _OWN else routes.get(
            path if get else f"{request.method} {path}")
        if handler is None:
            allowed = _OWN.get(path) or sorted(
                {key.split(" ", 1)[0] if " " in key else "GET" for key in routes
                 if key.split(" ", 1)[-1] == path})
            if allowed:
                return web.json_response(
                    {"error": f"{request.path} does not take {request.method}: "
                              f"use {' or '.join(allowed)}"},
                    status=405, headers={"Allow": ", ".join(allowed)})
            return web.json_response({"error": f"no such endpoint: {request.path}"}, status=404)
        return await handler(request)

    async def tap(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = json.loads(request.query.get("filter") or "{}")
            patterns = raw if isinstance(raw, list) else [raw] if raw else []
            filter_ = Filter(include=[Pattern(p) for p in patterns])
        except (ValueError, FilterError, msgspec.ValidationError) as e:
            return web.json_response({"error": f"invalid filter: {e}"}, status=400)
        except RecursionError:  # (JSON nested deeper than the parser goes)
            return web.json_response({"error": "invalid filter: nested deeper than "
                                               f"{MAX_PATTERN_DEPTH} levels of objects and "
                                               "lists"}, status=400)
        if request.method == "HEAD":  # what a GET would answer, without opening a tap
            return web.Response(headers={"Content-Type": "application/x-ndjson"})
        if len(self.service.taps.active) >= MAX_TAPS:
            return web.json_response(
                {"error": f"too many taps: at most {MAX_TAPS} are open at once; close one"},
                status=429, headers={"Retry-After": "1"})
        tap = Tap(filter_)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        self.service.taps.active.add(tap)
        try:
            while not self._closing:
                try:
                    events = await asyncio.wait_for(tap.take(), 0.5)
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break  # the reader went away
                    continue
                await response.write(to_jsonl(events))
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            self.service.taps.active.discard(tap)
            if tap.dropped:
                self.service.log.warning("a tap's reader was too slow: events not shown",
                                         dropped=tap.dropped,
                                         limit_mb=tap.max_pending_bytes >> 20)
            with contextlib.suppress(Exception):
                await response.write_eof()
        return response
