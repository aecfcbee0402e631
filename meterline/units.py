"""Value types that `pipeline.yaml` writes the human way: durations and addresses."""

from __future__ import annotations

import math
import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d)\s*$")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
            "d": 86400.0}


class Duration(float):
    """Seconds, written in config as `200ms`, `1s`, `10m`, `1h`. A bare number is refused
    (but 0, which means "off" or "never" wherever it is allowed): `timeout: 200` would be
    read as 200 s by one reader and 200 ms by the next."""

    @classmethod
    def from_config(cls, value: Any) -> Duration:
        if isinstance(value, str) and (m := _DURATION.match(value)):
            return cls(float(m.group(1)) * _SECONDS[m.group(2)])
        number = _bare_number(value)
        if number == 0:
            return cls(0)
        if number is not None and number > 0:
            raise ValueError(f"a duration needs a unit: write {number:g}ms, {number:g}s or "
                             f"{number:g}m, got the bare number {value!r}")
        raise ValueError(f"expected a duration such as 200ms, 1s or 10m, got {value!r}")


def _bare_number(value: Any) -> float | None:
    """A number written without a unit (`200`, `"200"`, `1.5`), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    try:
        number = float(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


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
            if sep and port.isascii() and port.isdigit() and 0 <= int(port) < 65536:
                return cls(value)
        raise ValueError(
            f"expected a listen address host:port such as 127.0.0.1:8080, got {value!r}")

