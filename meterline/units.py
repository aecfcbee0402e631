"""Value types that `pipeline.yaml` writes the human way: durations and addresses."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d)?\s*$")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
            "d": 86400.0}


class Duration(float):
    """Seconds, written in config as `200ms`, `1s`, `10m`, `1h` (a bare number is seconds)."""

    @classmethod
    def from_config(cls, value: Any) -> Duration:
        if isinstance(value, bool):
            raise ValueError(f"expected a duration such as 200ms, 1s or 10m, got {value!r}")
        if isinstance(value, int | float):
            if value < 0:
                raise ValueError(f"expected a non-negative duration, got {value!r}")
            return cls(value)
        if isinstance(value, str) and (m := _DURATION.match(value)):
            return cls(float(m.group(1)) * _SECONDS[m.group(2) or "s"])
        raise ValueError(f"expected a duration such as 200ms, 1s or 10m, got {value!r}")


class Listen(str):
    """A `host:port` listen address (`:8080` means every interface)."""

    @property
    def host(self) -> str:
        return self.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.rpartition(":")[2])

    @classmethod
    def from_config(cls, value: Any) -> Listen:
        if isinstance(value, str):
            _, sep, port = value.rpartition(":")
            if sep and port.isdigit() and 0 <= int(port) < 65536:
                return cls(value)
        raise ValueError(
            f"expected a listen address host:port such as 127.0.0.1:8080, got {value!r}")

