"""The audit log: every start and reload, applied or refused, recorded in the data
directory with what triggered it, the file's hash, the result and what changed, secrets
masked; read back by `meterline audit`, `/api/v1/audit` and the self-metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re

import aiohttp
import pytest

from meterline import audit, cli
from meterline import config as config_mod
from meterline.service import Service
from tests.helpers import (
    config_text,
    eventually,
    free_port,
    metric_value,
    running,
    webhook_to_file,
)

TOKEN = "admin-token-for-audit"


def filtered(port: int, providers: tuple[str, ...] = ("openai",), **kw: object) -> str:
    return webhook_to_file(
        port, processors={"filter/only": {"include": [{"provider": {"$in": list(providers)}}]}},
        **kw)  # type: ignore[arg-type]


def newest(service: Service) -> dict:
    return service.audit.entries(1)[0]


async def test_the_start_is_recorded_with_every_component_added(tmp_path):
    async with running(filtered(free_port()), tmp_path) as service:
        entry = newest(service)
    path = tmp_path / "pipeline.yaml"
    assert (entry["trigger"], entry["result"], entry["seq"]) == ("start", "applied", 1)
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["file"] == str(path)
    assert entry["time"].endswith("Z")
    assert {(c["kind"], c["id"]) for c in entry["changes"]["added"]} == {
        ("receiver", "webhook"), ("processor", "filter/only"), ("exporter", "file"),
        ("pipeline", "p")}


async def test_an_applied_reload_is_recorded_with_its_diff(tmp_path):
    port = free_port()
    async with running(filtered(port), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        text = path.read_text().replace("[openai]", "[openai, anthropic]")
        text = text.replace("exporters:\n  file:", "exporters:\n  debug: {}\n  file:")
        text = text.replace("exporters: [file]", "exporters: [file, debug]")
        path.write_text(text)
        assert await service.reload(str(path))
        entry = newest(service)
    assert (entry["trigger"], entry["result"], entry["seq"]) == ("signal", "applied", 2)
    assert entry["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert "error" not in entry
    changes = entry["changes"]
    assert changes["added"] == [{"kind": "exporter", "id": "debug"}]
    assert changes["removed"] == []
    assert changes["changed"] == [
        {"kind": "processor", "id": "filter/only",
         "keys": {"include[0].provider.$in[1]": {"to": "anthropic"}}},
        {"kind": "pipeline", "id": "p",
         "keys": {"exporters[1]": {"to": "debug"}}},
    ]


async def test_a_refused_reload_is_recorded_with_its_error_and_nothing_applied(tmp_path):
    async with running(filtered(free_port()), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("$in", "$inn"))
        assert not await service.reload(str(path))
        entry = newest(service)
        kept = service.processors[("p", "filter/only")].spec.raw
    assert entry["result"] == "refused"
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"{path}:" in entry["error"] and "unknown operator $inn" in entry["error"]
    assert re.match(rf"{re.escape(str(path))}:\d+: processors\.filter/only", entry["error"])
    assert entry["changes"] == {"added": [], "removed": [], "changed": []}
    assert kept["include"][0]["provider"] == {"$in": ["openai"]}


async def test_an_unreadable_file_is_refused_without_a_hash(tmp_path):
    async with running(filtered(free_port()), tmp_path) as service:
        assert not await service.reload(str(tmp_path / "gone.yaml"))
        entry = newest(service)
    assert (entry["result"], entry["sha256"]) == ("refused", None)
    assert "cannot read the file" in entry["error"]


async def test_secrets_are_masked_and_env_values_recorded_as_references(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("AUDIT_HOOK_TOKEN", "env-secret-one")
    monkeypatch.setenv("AUDIT_HOOK_TOKEN_2", "env-secret-two")
    port = free_port()
    body = filtered(port, webhook={"auth_token": "${env:AUDIT_HOOK_TOKEN}"},
                    service={"admin": {"listen": f"127.0.0.1:{free_port()}",
                                       "auth_token": "literal-secret-one"}})
    async with running(body, tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("AUDIT_HOOK_TOKEN}", "AUDIT_HOOK_TOKEN_2}")
                        .replace("literal-secret-one", "literal-secret-two"))
        assert await service.reload(str(path))
        entry = newest(service)
    stored = (tmp_path / "data" / "audit.jsonl").read_text()
    for secret in ("env-secret-one", "env-secret-two", "literal-secret-one",
                   "literal-secret-two"):
        assert secret not in stored
    changed = {(c["kind"], c["id"]): c["keys"] for c in entry["changes"]["changed"]}
    assert changed[("receiver", "webhook")] == {
        "auth_token": {"from": "${env:AUDIT_HOOK_TOKEN}", "to": "${env:AUDIT_HOOK_TOKEN_2}"}}
    assert changed[("service", "service")] == {
        "admin.auth_token": {"from": "***", "to": "***"}}
    assert entry["restart_needed"] == ["admin"]


async def test_env_values_are_masked_in_error_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_LISTEN", "s3cr3t-not-an-address")
    async with running(filtered(free_port()), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        text, n = re.subn(r"listen: '[^']*'", "listen: '${env:AUDIT_LISTEN}'", path.read_text())
        assert n == 1
        path.write_text(text)
        assert not await service.reload(str(path))
        error = newest(service)["error"]
    assert "s3cr3t" not in error
    assert "${env:AUDIT_LISTEN}" in error


def test_api_key_headers_of_any_spelling_are_masked():
    headers = {"X-Api-Key": "hdr-secret-1", "api-key": "hdr-secret-2",
               "x-goog-api-key": "hdr-secret-3", "Proxy-Authorization": "Basic hdr-4",
               "Content-Type": "application/json"}
    assert audit.mask(("notifiers", "ops", "headers"), headers) == {
        "X-Api-Key": "***", "api-key": "***", "x-goog-api-key": "***",
        "Proxy-Authorization": "***", "Content-Type": "application/json"}


def test_scrub_replaces_env_values_and_secret_literals():
    text = "a:\n  password: hunter22\n  url: ${env:DSN}\n"
    message = "bad url postgres://u:pw-1234@h; password hunter22 refused"
    assert audit.scrub(message, text, {"DSN": "postgres://u:pw-1234@h"}) == (
        "bad url ${env:DSN}; password *** refused")


async def test_entries_survive_a_restart(tmp_path):
    port = free_port()
    async with running(filtered(port), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("$in", "$inn"))
        assert not await service.reload(str(path))
    path.write_text(config_text(filtered(port), tmp_path))
    service = Service(config_mod.load(str(path)))
    await service.start()
    try:
        entries = service.audit.entries()
    finally:
        await service.shutdown()
    assert [(e["seq"], e["trigger"], e["result"]) for e in entries] == [
        (3, "start", "applied"), (2, "signal", "refused"), (1, "start", "applied")]


def test_a_line_torn_by_a_crash_is_cut_and_numbering_goes_on(tmp_path):
    log = audit.AuditLog(tmp_path)
    asyncio.run(log.record(log.entry("start", "p.yaml", None, "applied")))
    with open(log.path, "ab") as f:
        f.write(b'{"id": "torn')
    log = audit.AuditLog(tmp_path)
    log.open()
    asyncio.run(log.record(log.entry("signal", "p.yaml", None, "applied")))
    assert [e["seq"] for e in log.entries()] == [2, 1]


def test_the_log_is_bounded_by_rotating_to_one_older_file(tmp_path):
    log = audit.AuditLog(tmp_path, keep=3)
    log.open()

    async def record(n: int) -> None:
        for _ in range(n):
            await log.record(log.entry("signal", "p.yaml", None, "applied"))

    asyncio.run(record(10))
    assert [e["seq"] for e in log.entries()] == [10, 9, 8, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.1"]


async def test_a_change_of_the_watched_file_is_recorded_as_such(tmp_path):
    body = filtered(free_port(), service={"watch_config": True})
    async with running(body, tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        watcher = asyncio.create_task(service._watch(str(path)))
        try:
            await asyncio.sleep(0.1)
            path.write_text(path.read_text().replace("[openai]", "[anthropic]"))
            await eventually(lambda: newest(service)["seq"] == 2, timeout=5)
        finally:
            watcher.cancel()
        assert newest(service)["trigger"] == "file_change"


def admin_body(port: int, admin: int, token: str | None = TOKEN) -> str:
    settings = {"listen": f"127.0.0.1:{admin}", **({"auth_token": token} if token else {})}
    return filtered(port, service={"admin": settings})


async def get(url: str, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.json()


async def test_the_admin_api_requires_the_token_when_one_is_set(tmp_path):
    admin = free_port()
    async with running(admin_body(free_port(), admin), tmp_path):
        url = f"http://127.0.0.1:{admin}/api/v1/audit"
        assert (await get(url))[0] == 401
        assert (await get(url, "wrong"))[0] == 401
        status, body = await get(url, TOKEN)
    assert status == 200
    assert [e["trigger"] for e in body["entries"]] == ["start"]


async def test_a_reload_through_the_admin_api_is_recorded_as_such(tmp_path):
    admin = free_port()
    async with running(admin_body(free_port(), admin), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("[openai]", "[anthropic]"))
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{admin}/api/v1/reload",
                headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            status, body = r.status, await r.json()
        assert service.config.processors["filter/only"].raw["include"][0]["provider"] == {
            "$in": ["anthropic"]}
    assert (status, body["applied"], body["entry"]["trigger"]) == (200, True, "admin_api")


async def test_refused_reloads_are_counted_and_the_last_one_flagged(tmp_path):
    async with running(filtered(free_port()), tmp_path) as service:
        registry = service.telemetry.registry
        started = metric_value(registry, "meterline_config_last_reload_success_timestamp_seconds")
        path = tmp_path / "pipeline.yaml"
        valid = path.read_text()
        path.write_text(valid.replace("$in", "$inn"))
        assert not await service.reload(str(path))
        assert not await service.reload(str(path))
        assert metric_value(registry, "meterline_config_reloads_total", result="refused") == 2
        assert metric_value(registry, "meterline_config_last_reload_successful") == 0
        assert metric_value(registry, "meterline_config_last_reload_success_timestamp_seconds"
                            ) == started
        path.write_text(valid)
        assert await service.reload(str(path))
        assert metric_value(registry, "meterline_config_last_reload_successful") == 1
        assert metric_value(registry, "meterline_config_last_reload_success_timestamp_seconds"
                            ) > started


# --- meterline audit ----------------------------------------------------------------------
async def two_entries(tmp_path, body: str) -> None:
    async with running(body, tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("[openai]", "[anthropic]"))
        assert await service.reload(str(path))


async def test_meterline_audit_prints_the_entries_newest_first(tmp_path, capsys,
                                                               monkeypatch):
    await two_entries(tmp_path, filtered(free_port()))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # the daemon's logs
    assert cli.main(["audit", "-c", str(tmp_path / "pipeline.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "#2  applied  signal" in out[0]
    assert out[1] == ('  ~ processor filter/only: include[0].provider.$in[0]: "openai" -> '
                      '"anthropic"')
    assert "#1  applied  start" in out[2]
    assert "  + receiver webhook" in out


async def test_meterline_audit_json_and_limit(tmp_path, capsys):
    await two_entries(tmp_path, filtered(free_port()))
    capsys.readouterr()  # the daemon's logs
    assert cli.main(["audit", "-c", str(tmp_path / "pipeline.yaml"), "--json",
                     "--limit", "1"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["seq"] for e in entries] == [2]


async def test_meterline_audit_asks_the_running_daemon_with_its_token(tmp_path, capsys):
    admin = free_port()
    async with running(admin_body(free_port(), admin), tmp_path):
        # the same admin address and token, but a data directory with no log: what is
        # printed comes from the daemon
        elsewhere = tmp_path / "cli.yaml"
        elsewhere.write_text(config_text(admin_body(free_port(), admin), tmp_path / "other"))
        capsys.readouterr()  # the daemon's logs
        code = await asyncio.to_thread(cli.main, ["audit", "-c", str(elsewhere), "--json"])
        printed = capsys.readouterr().out
    assert code == 0
    assert [e["trigger"] for e in json.loads(printed)] == ["start"]


async def test_meterline_audit_reads_the_data_directory_when_the_daemon_refuses_the_token(
        tmp_path, capsys):
    admin = free_port()
    async with running(admin_body(free_port(), admin), tmp_path):
        # the file's token changed since the start: the admin server keeps the old one
        # until a restart
        changed = tmp_path / "changed.yaml"
        changed.write_text(config_text(admin_body(free_port(), admin, "a-new-token"), tmp_path))
        capsys.readouterr()  # the daemon's logs
        code = await asyncio.to_thread(cli.main, ["audit", "-c", str(changed), "--json"])
        printed = capsys.readouterr()
    assert code == 0
    assert [e["trigger"] for e in json.loads(printed.out)] == ["start"]
    assert "answered 401" in printed.err and "read from" in printed.err


@pytest.mark.parametrize("limit", ["0", "abc"])
async def test_the_admin_api_refuses_a_bad_limit(tmp_path, limit):
    admin = free_port()
    async with running(admin_body(free_port(), admin, token=None), tmp_path):
        status, body = await get(f"http://127.0.0.1:{admin}/api/v1/audit?limit={limit}")
    assert status == 400 and "limit" in body["error"]


def test_the_cli_says_so_when_there_is_no_entry(tmp_path, capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_text(filtered(free_port()), tmp_path))
    assert cli.main(["audit", "-c", str(path)]) == 0
    assert "no audit entries" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "data" / "audit.jsonl")
