"""Starting an aiohttp application on a `host:port`, the same way for every listener."""

from __future__ import annotations

from aiohttp import web

from meterline.units import Listen


async def serve(app: web.Application, listen: Listen, **runner_options: object) -> web.AppRunner:
    """Start `app` on `listen`; call `cleanup()` on the result to stop it."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, listen.host, listen.port, reuse_address=True).start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(e.errno, f"cannot listen on {listen}: {e.strerror}") from e
    return runner
