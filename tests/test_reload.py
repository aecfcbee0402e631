"""Hot reload: a valid file takes effect without losing events; an invalid one is refused."""

import asyncio
import signal

import aiohttp
from structlog.testing import capture_logs

from meterline import config as config_mod
from meterline.service import Service
from tests.helpers import (
    config_text,
    event_dicts,
    eventually,
    free_port,
    metric_value,
    post_json,
    read_jsonl,
    running,
    webhook_to_file,
)


def pipeline(port, providers, admin=None, file=None, service=None):
    """The webhook into the file exporter through a filter keeping `providers`."""
    return webhook_to_file(
        port, processors={"filter/only": {"include": [{"provider": {"$in": providers}}]}},
        file=file, service={"admin": admin, **(service or {})})


ADMIN = {"listen": "127.0.0.1:{admin}"}


async def status(admin_port):
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{admin_port}/api/v1/status") as r:
        return await r.json()


async def test_sighup_with_a_changed_filter_changes_what_is_exported(tmp_path, daemon_factory):
    port = free_port()
    daemon = daemon_factory(pipeline(port, ["openai"], admin=ADMIN))
    daemon.start()
    url = f"http://127.0.0.1:{port}/v1/events"
    acked: list[dict] = []
    stop = asyncio.Event()

    async def stream():
        n = 0
        while not stop.is_set():
            items = event_dicts(n, 20, provider="openai") + event_dicts(
                n + 20, 20, provider="anthropic")
            n += 40
            code, _, _ = await post_json(url, items)
            if code == 200:
                acked.extend(items)

    sender = asyncio.create_task(stream())
    await eventually(lambda: len(acked) >= 400)
    daemon.config.write_text(daemon.config.read_text().replace("[openai]",
                                                               "[openai, anthropic]"))
    daemon.signal(signal.SIGHUP)
    for _ in range(200):
        if (await status(daemon.admin_port))["reloads"] == 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the daemon did not reload")
    reloaded_at = len(acked)
    await eventually(lambda: len(acked) >= reloaded_at + 400)
    stop.set()
    await sender
    out = tmp_path / "data" / "out.jsonl"
    openai = {e["event_id"] for e in acked if e["provider"] == "openai"}
    later_anthropic = {e["event_id"] for e in acked[reloaded_at:] if e["provider"] == "anthropic"}
    await eventually(lambda: openai | later_anthropic <= {r["event_id"] for r in read_jsonl(out)})
    early_anthropic = {e["event_id"] for e in acked[:400] if e["provider"] == "anthropic"}
    assert not early_anthropic & {r["event_id"] for r in read_jsonl(out)}
    assert daemon.stop() == 0


async def test_an_invalid_file_is_refused_and_the_running_one_kept(tmp_path, daemon_factory):
    port = free_port()
    daemon = daemon_factory(pipeline(port, ["openai"], admin=ADMIN))
    daemon.start()
    daemon.config.write_text(daemon.config.read_text().replace("$in", "$inn"))
    daemon.signal(signal.SIGHUP)
    await eventually(lambda: "reload refused" in daemon.log.read_text())
    assert "unknown operator $inn" in daemon.log.read_text()
    answer = await status(daemon.admin_port)
    assert (answer["reloads"], answer["reloads_refused"]) == (0, 1)
    code, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", event_dicts(0, 2))
    assert (code, body["accepted"]) == (200, 2)
    await eventually(lambda: len(read_jsonl(tmp_path / "data" / "out.jsonl")) == 2)
    assert daemon.stop() == 0


async def test_an_unchanged_listener_keeps_running_through_a_reload(tmp_path):
    port = free_port()
    async with running(pipeline(port, ["openai"]), tmp_path) as service:
        webhook = service.receivers["webhook"].component
        exporter = service.exporters["file"].component
        (tmp_path / "pipeline.yaml").write_text((tmp_path / "pipeline.yaml").read_text()
                                                .replace("[openai]", "[anthropic]"))
        assert await service.reload(str(tmp_path / "pipeline.yaml"))
        assert service.receivers["webhook"].component is webhook
        assert service.exporters["file"].component is exporter
        _, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                     event_dicts(0, 3, provider="anthropic"))
        assert body["accepted"] == 3
        await eventually(lambda: len(read_jsonl(tmp_path / "data" / "out.jsonl")) == 3)


async def test_a_changed_listener_moves_to_its_new_address(tmp_path):
    port, new_port = free_port(), free_port()
    async with running(pipeline(port, ["openai"]), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace(str(port), str(new_port)))
        assert await service.reload(str(path))
        code, _, _ = await post_json(f"http://127.0.0.1:{new_port}/v1/events", event_dicts(0, 1))
        assert code == 200


async def test_a_changed_exporter_keeps_the_events_of_its_memory_queue(tmp_path):
    port = free_port()
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    body = pipeline(port, ["openai"], file={"path": f"{blocked}/out.jsonl",
                                             "queue": {"type": "memory"}})
    async with running(body, tmp_path) as service:
        code, _, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", event_dicts(0, 30))
        assert code == 200
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace(f"{blocked}/out.jsonl",
                                                 f"{tmp_path}/moved.jsonl"))
        assert await service.reload(str(path))
        await eventually(lambda: len(read_jsonl(tmp_path / "moved.jsonl")) == 30)


async def test_service_settings_that_need_a_restart_are_kept_and_logged(tmp_path):
    port = free_port()
    async with running(pipeline(port, ["openai"]), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        path.write_text(config_text(pipeline(port, ["openai"],
                                             service={"data_dir": "/elsewhere"}), tmp_path))
        with capture_logs() as logged:
            assert await service.reload(str(path))
        assert service.config.service.data_dir == str(tmp_path / "data")
    assert {"event": "service setting changes need a restart", "setting": "data_dir",
            "log_level": "warning", "component": "service"} in logged


async def test_reloads_are_counted_by_result_in_the_self_metrics(tmp_path):
    async with running(pipeline(free_port(), ["openai"]), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        valid = path.read_text()
        path.write_text(valid.replace("$in", "$inn"))
        assert not await service.reload(str(path))
        path.write_text(valid)
        assert await service.reload(str(path))
        registry = service.telemetry.registry
        counts = {result: metric_value(registry, "meterline_config_reloads_total", result=result)
                  for result in ("applied", "refused", "partial")}
        assert counts == {"applied": 1, "refused": 1, "partial": 0}


async def watched_run(tmp_path, body):
    """`Service.run` on `body` (as `meterline run` runs it: SIGHUP, the file watched when
    `watch_config` says so), in a task; the service and the task."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_text(body, tmp_path))
    service = Service(config_mod.load(str(path)))
    task = asyncio.create_task(service.run(str(path)))
    await eventually(lambda: service.receivers, timeout=30)  # started
    await asyncio.sleep(0.1)  # run() goes on to its watcher
    return service, task


async def stopped(service, task):
    service.stop()
    await task
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)


async def test_watch_config_turned_on_by_a_reload_follows_the_file_at_once(tmp_path):
    port = free_port()
    service, task = await watched_run(tmp_path, pipeline(port, ["openai"]))
    try:
        path = tmp_path / "pipeline.yaml"
        path.write_text(config_text(pipeline(port, ["openai"], service={"watch_config": True}),
                                    tmp_path))
        assert await service.reload(str(path))
        await asyncio.sleep(1.5)  # the watcher has seen the file as the reload read it
        path.write_text(path.read_text().replace("[openai]", "[anthropic]"))
        await eventually(lambda: service.reloads == 2, timeout=5)
        assert service.audit.entries(1)[0]["trigger"] == "file_change"
    finally:
        await stopped(service, task)


async def test_watch_config_turned_off_by_a_reload_stops_following_the_file(tmp_path):
    port = free_port()
    service, task = await watched_run(
        tmp_path, pipeline(port, ["openai"], service={"watch_config": True}))
    try:
        path = tmp_path / "pipeline.yaml"
        path.write_text(config_text(pipeline(port, ["openai"]), tmp_path))
        await eventually(lambda: service.reloads == 1, timeout=5)
        assert not service.config.service.watch_config
        path.write_text(path.read_text().replace("[openai]", "[anthropic]"))
        await asyncio.sleep(2.5)
        assert service.reloads == 1
    finally:
        await stopped(service, task)


async def test_a_reload_that_changes_the_gateway_hands_over_its_buffered_events(tmp_path):
    """The gateway's events wait in its buffer until `flush_interval`; a reload changing
    the gateway stops it, which hands them to the pipeline. Intake used to be paused first:
    the hand-over waited on it forever, and the reload (every receiver with it) hung."""
    from meterline.gateway.fakeupstream import FakeUpstream
    gateway_port, webhook_port = free_port(), free_port()
    async with FakeUpstream(tokens=3) as fake:
        body = f"""
        receivers:
          gateway:
            listen: 127.0.0.1:{gateway_port}
            flush_interval: 30s
            upstreams:
              openai: {{base_url: "{fake.url}", provider: openai, default: true}}
          webhook: {{listen: 127.0.0.1:{webhook_port}}}
        exporters:
          file: {{path: "{{data}}/out.jsonl", batch: {{timeout: 10ms}}}}
        service:
          data_dir: "{{data}}"
          admin: null
          memory_limiter: null
          pipelines:
            p: {{receivers: [gateway, webhook], exporters: [file]}}
        """
        async with running(body, tmp_path) as service:
            async with aiohttp.ClientSession() as s:
                for i in range(5):
                    async with s.post(f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
                                      json={"model": f"m{i}", "messages": []}) as r:
                        assert r.status == 200
            path = tmp_path / "pipeline.yaml"
            path.write_text(path.read_text().replace("flush_interval: 30s",
                                                     "flush_interval: 20ms"))
            assert await asyncio.wait_for(service.reload(str(path)), 15)
            code, _, _ = await post_json(f"http://127.0.0.1:{webhook_port}/v1/events",
                                         event_dicts(0, 1))
            assert code == 200
            rows = await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 6
                                    and read_jsonl(tmp_path / "data/out.jsonl"))
    assert sorted(r["request_model"] for r in rows if not r["event_id"].startswith("evt-")) == [
        "m0", "m1", "m2", "m3", "m4"]
