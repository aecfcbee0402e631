"""The real LiteLLM proxy, for the tests that check what meterline makes of its payloads.

`litellm[proxy]` is installed once per machine in its own virtual environment (its
pins clash with meterline's), under `~/.cache/meterline/litellm-<version>` or the
directory `METERLINE_LITELLM_VENV` names. A lock file serialises the install between
parallel test processes; a marker file written last says the environment is complete.
A failed install is remembered for an hour (the reason is the tests' skip reason), so
that a machine without the package index does not pay for pip's retries on every run.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import free_port

LITELLM_VERSION = "1.100.5"  # newer releases need a certifi this machine's index lacks
VENV_ENV = "METERLINE_LITELLM_VENV"
RETRY_FAILED_AFTER = 3600.0  # seconds


class Unavailable(Exception):
    """LiteLLM cannot be installed here; the message says why."""


def venv_dir() -> Path:
    configured = os.environ.get(VENV_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "meterline" / f"litellm-{LITELLM_VERSION}"


def ensure_installed() -> Path:
    """The `litellm` executable, installing it first if this machine has none yet."""
    root = venv_dir()
    exe, ready = root / "bin" / "litellm", root / ".meterline-ready"
    if ready.exists():
        return exe
    root.parent.mkdir(parents=True, exist_ok=True)
    failed = root.parent / f"{root.name}.failed"
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing: wait for it
        if ready.exists():
            return exe
        if failed.exists() and time.time() - failed.stat().st_mtime < RETRY_FAILED_AFTER:
            raise Unavailable(f"{failed.read_text()} (remembered for an hour: delete {failed} "
                              "to try again)")
        shutil.rmtree(root, ignore_errors=True)
        started = time.monotonic()
        steps = [[sys.executable, "-m", "venv", str(root)],
                 [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet",
                  "--retries", "1", f"litellm[proxy]=={LITELLM_VERSION}"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                reason = (f"litellm[proxy]=={LITELLM_VERSION} could not be installed in "
                          f"{root} ({' '.join(step[:4])}… exited {done.returncode}): "
                          + " | ".join(tail))
                failed.write_text(reason)
                shutil.rmtree(root, ignore_errors=True)
                raise Unavailable(reason)
        failed.unlink(missing_ok=True)
        ready.write_text(f"litellm[proxy]=={LITELLM_VERSION} installed in "
                         f"{time.monotonic() - started:.0f} s\n")
    return exe




MASTER_KEY = "sk-meterline-test-master"
# Keys the custom-auth form knows, as LiteLLM's virtual keys would be (without a database)
VIRTUAL_KEYS = {
    "sk-checkout-key": {"key_alias": "checkout-service", "team_id": "team-payments",
                        "user_id": "alice", "org_id": "org-acme"},
}
_CUSTOM_AUTH = """
from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth

KEYS = {keys!r}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    if api_key in KEYS:
        return UserAPIKeyAuth(api_key=api_key, **KEYS[api_key])
    raise HTTPException(status_code=401, detail="unknown key")
"""


def model_list(upstream: str) -> list[dict[str, Any]]:
    """The proxy's models, all served by the fake upstream at `upstream`: an OpenAI model
    under its own name, an Anthropic one behind an alias, one LiteLLM's cost map lacks,
    and two whose upstream always fails (500, 429)."""
    def openai(model: str, **extra: Any) -> dict[str, Any]:
        return {"model": f"openai/{model}", "api_base": f"{upstream}/v1",
                "api_key": "sk-upstream", "max_retries": 0, **extra}
    return [
        {"model_name": "gpt-4o-mini", "litellm_params": openai("gpt-4o-mini")},
        {"model_name": "claude-haiku", "litellm_params": {
            "model": "anthropic/claude-3-5-haiku-20241022", "api_base": upstream,
            "api_key": "sk-ant-upstream", "max_retries": 0}},
        {"model_name": "unmapped", "litellm_params": openai("meterline-unmapped-model")},
        {"model_name": "broken-500", "litellm_params": openai(
            "gpt-4o-mini", extra_headers={"x-fake-status": "500"})},
        {"model_name": "limited-429", "litellm_params": openai(
            "gpt-4o-mini", extra_headers={"x-fake-status": "429"})},
    ]


def config(upstream: str, *, endpoint: str | None, token: str, custom_auth: bool = False,
           log_format: str = "json_array") -> dict[str, Any]:
    """A proxy config as docs/howto/litellm.md writes it: with `endpoint`, the
    `callback_settings` form; without, the environment-variable form (see `env`)."""
    settings: dict[str, Any] = {"cache": True, "cache_params": {"type": "local"},
                                "num_retries": 0}
    cfg: dict[str, Any] = {
        "model_list": model_list(upstream),
        "litellm_settings": settings,
        "router_settings": {"num_retries": 0, "allowed_fails": 1000},
        "general_settings": {"master_key": MASTER_KEY},
    }
    if endpoint is not None:
        settings["callbacks"] = ["meterline"]
        cfg["callback_settings"] = {"meterline": {
            "callback_type": "generic_api", "endpoint": endpoint,
            "headers": {"Authorization": f"Bearer {token}"}, "log_format": log_format,
            "event_types": ["llm_api_success", "llm_api_failure"]}}
    else:
        settings["callbacks"] = ["generic_api"]
    if custom_auth:
        cfg["general_settings"]["custom_auth"] = "custom_auth.user_api_key_auth"
    return cfg


def env(endpoint: str, token: str) -> dict[str, str]:
    """The environment-variable form's logger settings."""
    return {"GENERIC_LOGGER_ENDPOINT": endpoint,
            "GENERIC_LOGGER_HEADERS": f"Authorization=Bearer {token}"}


class Proxy:
    """`litellm --config FILE --port N` as a process, its output in `log`."""

    def __init__(self, exe: Path, workdir: Path, cfg: dict[str, Any],
                 extra_env: dict[str, str] | None = None) -> None:
        self.exe, self.workdir = exe, workdir
        self.port = free_port()
        self.config = workdir / "litellm.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if cfg["general_settings"].get("custom_auth"):
            (workdir / "custom_auth.py").write_text(
                textwrap.dedent(_CUSTOM_AUTH).format(keys=VIRTUAL_KEYS))
        self.log = workdir / "litellm.log"
        self.env = {
            **{k: v for k, v in os.environ.items()
               if not k.startswith(("GENERIC_LOGGER_", "LITELLM_", "OPENAI_", "ANTHROPIC_"))},
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no internet: the wheel's own cost map
            "DEFAULT_FLUSH_INTERVAL_SECONDS": "1",  # the logger's batches: every second, not 5
            "LITELLM_TELEMETRY": "False", "NO_DOCS": "True",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, timeout: float = 180.0) -> None:
        started = time.monotonic()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(self.exe), "--config", str(self.config), "--host", "127.0.0.1",
                 "--port", str(self.port), "--num_workers", "1"],
                cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"litellm exited with {self.proc.returncode}:\n"
                                   + self.output())
            if await asyncio.to_thread(self._alive):
                self.startup_s = time.monotonic() - started
                return
            if time.monotonic() - started > timeout:
                self.stop()
                raise RuntimeError(f"litellm not ready within {timeout}s:\n" + self.output())
            await asyncio.sleep(0.2)

    def _alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health/liveliness", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

