"""Shared fixtures. The plain helpers they use live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Daemon, config_text, free_port
from tests.prometheus_exposure import exposed_metrics


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    daemons: list[Daemon] = []

    def make(body: str) -> Daemon:
        admin = free_port()
        path = tmp_path / "pipeline.yaml"
        path.write_text(config_text(body, tmp_path).replace("{admin}", str(admin)))
        d = Daemon(path, admin, tmp_path)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Sample name -> its label names, as the Prometheus exporter exposes them (see
    tests/prometheus_exposure.py)."""
    return exposed_metrics(tmp_path_factory.mktemp("prometheus"))
