"""The `meterline` command: run, validate, tap, components, and the commands components
add."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import urllib.parse
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from meterline import __version__, describe, logs, registry
from meterline import config as config_mod
from meterline.config import ConfigError
from meterline.yamlsource import SourceError, load_file

DEFAULT_CONFIG = "pipeline.yaml"
CONFIG_HELP = ("(default: ./pipeline.yaml if it exists, else the embedded default that ships "
               "inside the package)")
Command = Callable[[argparse.Namespace], int]


def packaged_config() -> str:
    """The path of the embedded default pipeline.yaml shipped inside the package."""
    return str(resources.files("meterline").joinpath("default_pipeline.yaml"))


def config_path(given: str | None) -> str:
    """The file a command reads: `-c FILE` when given, else ./pipeline.yaml when it
    exists, else the embedded default (so a non-editable install runs out of the box)."""
    if given is not None:
        return given
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else packaged_config()


def add_config_argument(parser: argparse.ArgumentParser, what: str = "the pipeline file") -> None:
    """`-c/--config` as every command that reads pipeline.yaml takes it (resolve it with
    `config_path`)."""
    parser.add_argument("-c", "--config", default=None, help=f"{what} {CONFIG_HELP}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meterline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meterline {__version__}")
    # (not `required`: argparse would then answer `meterline --nope` with "the following
    # arguments are required: command" rather than name the option it does not know)
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser("run", help="run the daemon")
    add_config_argument(run)
    run.add_argument("--demo", action="store_true",
                     help="also start a fake LLM upstream and synthetic traffic through the "
                          "gateway, so dashboards, /metrics and finops fill within a minute")
    run.set_defaults(func=cmd_run)

    validate = commands.add_parser("validate", help="check a pipeline.yaml; exit 1 on errors")
    add_config_argument(validate)
    validate.set_defaults(func=cmd_validate)

    tap = commands.add_parser("tap", help="stream live events from a running daemon")
    add_config_argument(tap, "the daemon's pipeline.yaml, for its admin address")
    tap.add_argument("--admin", help="admin URL, e.g. http://127.0.0.1:8888 (instead of -c)")
    tap.add_argument("--filter", default="", help='an include pattern, e.g. {"provider":"openai"}')
    tap.add_argument("--token", help="bearer token of the admin API")
    tap.set_defaults(func=cmd_tap)

    audit = commands.add_parser(
        "audit", help="the recent configuration changes: starts and reloads, applied or "
                      "refused (from the running daemon, else the data directory)")
    add_config_argument(audit, "the daemon's pipeline.yaml, for its admin address and data_dir")
    audit.add_argument("--limit", type=int, default=20, help="at most this many, newest first "
                                                             "(default 20)")
    audit.add_argument("--json", action="store_true", help="the entries as a JSON array")
    audit.set_defaults(func=cmd_audit)

    describe.add(commands)  # meterline components [TYPE] [--markdown DIR]
    registry.add_commands(commands)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error(f"a command is needed: one of {', '.join(commands.choices)}")
    func: Command = args.func
    try:
        return func(args)
    except BrokenPipeError:  # the reader has what it wanted (`meterline tap | head`)
        # (and the interpreter's last flush of stdout must not fail again at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def load_config(path: str, overlay: dict[str, Any] | None = None,
                ) -> config_mod.PipelineFile | None:
    """The validated file, or None after printing every problem (for commands, which then
    exit 1)."""
    try:
        return config_mod.load(path, overlay=overlay)
    except ConfigError as e:
        print(f"{path}: invalid configuration:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def admin_address(loaded: config_mod.PipelineFile) -> tuple[str, str | None] | None:
    """The base URL and bearer token of the admin API of the daemon running `loaded`
    (None when its admin server is off), for commands that talk to a running daemon."""
    admin = loaded.service.admin
    if admin is None:
        return None
    host = "127.0.0.1" if admin.listen.host in ("0.0.0.0", "::") else admin.listen.host
    return f"http://{host}:{admin.listen.port}", admin.auth_token


class AdminError(Exception):
    """The daemon answered, but not with what was asked; printed as is."""


def admin_get(loaded: config_mod.PipelineFile, path: str, params: dict[str, Any],
              timeout: float = 10.0) -> Any:
    """GET `/api/v1/<path>` from the daemon running `loaded`, as JSON; None when no daemon
    answers there (its admin server off, or nobody listening)."""
    import urllib.error
    import urllib.request

    address = admin_address(loaded)
    if address is None:
        return None
    base, token = address
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise AdminError(f"the daemon at {base} answered {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            return None
        raise AdminError(f"the daemon at {base} did not answer: {e.reason}") from None


def cmd_audit(args: argparse.Namespace) -> int:
    from meterline import audit

    if not 1 <= args.limit <= 2 * audit.KEEP:
        print(f"meterline audit: --limit must be from 1 to {2 * audit.KEEP}", file=sys.stderr)
        return 1
    loaded = load_config(config_path(args.config))
    if loaded is None:
        return 1
    data_dir = Path(loaded.service.data_dir)
    try:
        answer = admin_get(loaded, "audit", {"limit": args.limit})
        entries = answer["entries"] if answer is not None else audit.read(data_dir, args.limit)
    except AdminError as e:
        # (the daemon keeps the admin token it started with until a restart, though the
        # file now says another: the log it writes is in the data directory too)
        if not (entries := audit.read(data_dir, args.limit)):
            print(f"meterline audit: {e}", file=sys.stderr)
            return 1
        print(f"meterline audit: {e}; read from {data_dir} instead", file=sys.stderr)
    if args.json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print(f"no audit entries in {data_dir}: has the daemon run?")
    else:
        sys.stdout.write("".join(render_audit_entry(e) for e in entries))
    return 0


def render_audit_entry(entry: dict[str, Any]) -> str:
    """One entry as `meterline audit` prints it: a heading line, then what changed."""
    digest = (entry.get("sha256") or "-")[:12]
    lines = [f"{entry['time']}  #{entry['seq']}  {entry['result']:<8} {entry['trigger']:<12} "
             f"sha256:{digest}  {entry['file']}"]
    changes = entry.get("changes") or {}
    for sign, part in (("+", "added"), ("-", "removed"), ("~", "changed")):
        for change in changes.get(part) or []:
            keys = "; ".join(
                f"{key}: {_shown(side, 'from')} -> {_shown(side, 'to')}"
                for key, side in (change.get("keys") or {}).items())
            lines.append(f"  {sign} {change['kind']} {change['id']}" + (f": {keys}" if keys
                                                                          else ""))
    if entry.get("restart_needed"):
        lines.append(f"  restart needed: {', '.join(entry['restart_needed'])}")
    if entry.get("error"):
        lines += ["  " + line for line in entry["error"].splitlines()]
    return "\n".join(lines) + "\n"


def _shown(side: dict[str, Any], key: str) -> str:
    return json.dumps(side[key], ensure_ascii=False) if key in side else "(absent)"


def cmd_validate(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    loaded = load_config(path)
    if loaded is None:
        return 1
    pipelines = ", ".join(loaded.service.pipelines)
    print(f"{path}: valid ({len(loaded.receivers)} receivers, {len(loaded.processors)} "
          f"processors, {len(loaded.exporters)} exporters, {len(loaded.extensions)} extensions; "
          f"pipelines: {pipelines})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from meterline.service import Service, StartError

    args.config = config_path(args.config)
    demo = None
    overlay = None
    if args.demo:
        demo_class = registry.demo()
        if demo_class is None:
            print("no demo is installed (the gateway package provides it)", file=sys.stderr)
            return 1
        try:
            raw = load_file(args.config).data
        except SourceError as e:
            print(e, file=sys.stderr)
            return 1
        demo = demo_class()
        try:
            overlay = await demo.start(raw)
        except ValueError as e:
            await demo.stop()
            print(f"{args.config}: {e}", file=sys.stderr)
            return 1
    try:
        loaded = load_config(args.config, overlay)
        if loaded is None:
            return 1
        log_cfg = loaded.service.telemetry.logs
        logs.configure(log_cfg.level, log_cfg.encoding)
        logs.get(component="service").info("configuration",
                                           file=os.path.abspath(args.config))
        _tune_gc()
        raise_open_files_limit()
        companion = (lambda: demo.drive(loaded)) if demo is not None else None
        try:
            await Service(loaded, overlay).run(args.config, companion)
        except (OSError, RuntimeError, StartError) as e:
            logs.get(component="service").error("cannot run", error=str(e))
            return 1
        return 0
    finally:
        if demo is not None:
            await demo.stop()


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one. Each client connection, queue
    segment and exporter socket is a file descriptor; at a soft limit of 1024 (a common
    default) a few hundred slow clients leave none for the exporters (accept and epoll fail
    with EMFILE). The listeners bound their connections (`max_connections`), within this."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return
    with contextlib.suppress(ValueError, OSError):  # (macOS refuses an infinite soft limit)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tune_gc() -> None:
    """Queued events are many long-lived containers; with CPython's default thresholds the
    cyclic collector rescans them so often that it costs more than decoding them (measured:
    18 us of the 23 us per 1 KB event). Our data has no cycles to find, so collect rarely.

    Threads that run Python (an exporter building its columns) hold the GIL for up to the
    switch interval before the event loop gets it back: at CPython's 5 ms, that is added to
    the latency of every open stream. At 0.5 ms the gateway's added p99 with 60 KB prompts
    went from 12.3 ms to 7-10 ms (bench/default_pipeline_bench.py --only gateway)."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    sys.setswitchinterval(0.0005)


def cmd_tap(args: argparse.Namespace) -> int:
    base = args.admin
    token = args.token
    if base is not None and not _is_http_url(base):
        print(f"--admin must be the admin server's http:// or https:// URL, such as "
              f"http://127.0.0.1:8888, got {base!r}", file=sys.stderr)
        return 1
    if base is None:
        path = config_path(args.config)
        loaded = load_config(path)
        if loaded is None:
            return 1
        found = admin_address(loaded)
        if found is None:
            print(f"{path}: service.admin is off; nothing to tap", file=sys.stderr)
            return 1
        base, configured_token = found
        token = token or configured_token
    if args.filter:
        try:
            json.loads(args.filter)
        except ValueError as e:
            print(f"--filter is not JSON: {e}", file=sys.stderr)
            return 1
        except RecursionError:
            print("--filter is JSON nested too deeply", file=sys.stderr)
            return 1
    url = f"{base.rstrip('/')}/api/v1/tap?" + urllib.parse.urlencode({"filter": args.filter})
    try:
        return asyncio.run(_tap(url, token))
    except KeyboardInterrupt:
        return 0


def _is_http_url(text: str) -> bool:
    """`text` is an http(s) URL with a host (and a numeric port, if any)."""
    try:
        parsed = urllib.parse.urlsplit(text)
        return parsed.scheme in ("http", "https") and bool(parsed.hostname) and (
            parsed.port is None or parsed.port > 0)
    except ValueError:  # a bad IPv6 literal or port
        return False


def _inert_json(line: str) -> str:
    """`line` (JSON) with every character that is not printable written `\\uXXXX`. JSON
    escapes C0 but leaves C1 controls (U+009B is a CSI), bidirectional overrides and line
    separators as they are, which a terminal acts on; the daemon's JSON holds no such
    character outside a string, so the escape is always the same value."""
    return "".join(ch if ch.isprintable() or ch == "\n" else json.dumps(ch)[1:-1]
                   for ch in line)


async def _tap(url: str, token: str | None) -> int:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, headers=headers) as response:
            if response.status != 200:
                print(f"tap refused ({response.status}): {await response.text()}",
                      file=sys.stderr)
                return 1
            async for line in response.content:
                text = line.decode()
                sys.stdout.write(text if text.rstrip("\n").isprintable() else _inert_json(text))
                sys.stdout.flush()
    except aiohttp.ClientError as e:
        print(f"cannot reach the daemon at {url}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
