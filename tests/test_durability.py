"""The daemon as a process: kill -9 mid-stream loses no acknowledged event; SIGTERM drains."""

import asyncio
import signal

import aiohttp
import msgspec

from tests.helpers import event_dicts, eventually, free_port, post_json, read_jsonl, webhook_to_file

ADMIN = {"admin": {"listen": "127.0.0.1:{admin}"}}


def pipeline(port, **file):
    """The webhook into the file exporter (batches of 200 or 20ms), the admin port on."""
    return webhook_to_file(port, file={"batch": {"max_size": 200, "timeout": "20ms"}, **file},
                           service=ADMIN)


async def send_until_stopped(url, acked, stop, batch=100):
    """Post batches of unique events; record the ids of every batch acknowledged."""
    n = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            items = event_dicts(n, batch)
            n += batch
            try:
                async with session.post(url, data=msgspec.json.encode(items),
                                        headers={"Content-Type": "application/json"}) as r:
                    if r.status == 200:
                        acked.extend(e["event_id"] for e in items)
            except aiohttp.ClientError:
                return


async def test_kill_9_mid_stream_loses_no_acknowledged_event(tmp_path, daemon_factory):
    port = free_port()
    daemon = daemon_factory(pipeline(port))
    daemon.start()
    url = f"http://127.0.0.1:{port}/v1/events"
    acked: list[str] = []
    stop = asyncio.Event()
    senders = [asyncio.create_task(send_until_stopped(url, acked, stop)) for _ in range(4)]
    await eventually(lambda: len(acked) >= 3000, timeout=30)
    daemon.kill()  # SIGKILL while the senders are mid-request
    stop.set()
    await asyncio.gather(*senders)
    out = tmp_path / "data" / "out.jsonl"
    daemon.start()
    await eventually(lambda: set(acked) <= {r["event_id"] for r in read_jsonl(out)}, timeout=30)
    rows = read_jsonl(out)  # every line is whole JSON (read_jsonl would fail otherwise)
    assert all(r["event_id"].startswith("evt-") for r in rows)
    assert daemon.stop() == 0


async def test_events_acknowledged_while_the_exporter_was_down_survive_kill_9(
        tmp_path, daemon_factory):
    port = free_port()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the exporter wants a directory")
    daemon = daemon_factory(pipeline(port, path=f"{blocked}/out.jsonl"))
    daemon.start()
    acked: list[str] = []
    stop = asyncio.Event()
    sender = asyncio.create_task(send_until_stopped(f"http://127.0.0.1:{port}/v1/events",
                                                    acked, stop))
    await eventually(lambda: len(acked) >= 1000, timeout=30)
    daemon.kill()
    stop.set()
    await sender
    blocked.unlink()
    blocked.mkdir()
    daemon.start()
    await eventually(lambda: set(acked) <= {r["event_id"] for r in read_jsonl(
        blocked / "out.jsonl")}, timeout=30)
    assert daemon.stop() == 0


async def test_sigterm_drains_the_queue_before_exiting(tmp_path, daemon_factory):
    port = free_port()
    daemon = daemon_factory(pipeline(port, batch={"max_size": 100000, "timeout": "60s"}))
    daemon.start()
    status, _, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", event_dicts(0, 500))
    assert status == 200
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    assert len(read_jsonl(tmp_path / "data" / "out.jsonl")) == 500


async def test_a_second_daemon_on_the_same_data_dir_is_refused(tmp_path, daemon_factory):
    port = free_port()
    first = daemon_factory(pipeline(port))
    first.start()
    second = daemon_factory(pipeline(free_port()))
    second.config = first.config.with_name("second.yaml")
    second.config.write_text(first.config.read_text().replace(str(port), str(free_port())))
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "meterline", "run", "-c", str(second.config)],
                          capture_output=True, timeout=20, cwd=tmp_path)
    assert proc.returncode == 1
    assert b"another meterline is running" in proc.stderr
    assert first.stop() == 0
