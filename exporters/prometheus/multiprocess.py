"""Several processes, one scrape: the series of each process in a shared directory.

With `multiprocess_dir`, each exporter process keeps its series in
`<dir>/series_<pid>_<id>.db`, a file of doubles mapped in memory (prometheus_client's
`MmapedDict`, the storage of its own multi-process mode), so a write is a store to
memory, with no system call. A scrape, whichever process answers it, reads every
file in the directory and adds the series up. The file of a process that has
stopped stays, so that counters never go back; as with prometheus_client's mode,
empty the directory when the whole group of processes starts.

Each value is stored with the time its label set was last seen. A label set that
no process has seen for `metric_expiration` is left out of scrapes, but not out
of the files: a process dropping its share of a series that another process
still counts would make the sum go down, which Prometheus reads as a reset.
A gauge (rate-limit utilization) is not added up: a scrape shows the value last
written by any process, left out once unwritten for `metric_expiration`.

Each process also publishes its self-telemetry (`llm_gateway_*` instruments, such
as requests in flight) every second; a scrape shows each process's values with a
`pid` label, and leaves out a process that has not published for `_STALE` seconds.
"""

from __future__ import annotations

import glob
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import msgspec
from prometheus_client.core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.samples import Sample

from meterline.exporters.prometheus.series import Family, Key

PUBLISH_INTERVAL: Final = 1.0
_STALE: Final = 10.0
_SERIES, _TELEMETRY = "s", "t"


class SharedSeries:
    """This process's file, and the sum of every process's files."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / f"series_{os.getpid()}_{uuid.uuid4().hex[:8]}.db"
        self._file = MmapedDict(str(self.path))
        self._keys: dict[tuple[str, Key], list[str]] = {}
        self._telemetry_keys: dict[tuple[str, str, str, str, tuple[tuple[str, str], ...]],
                                   str] = {}

    def close(self) -> None:
        self._file.close()

    def write(self, family: Family, key: Key, values: list[float], seen: float) -> None:
        slots = self._keys.get((family.name, key))
        if slots is None:
            slots = self._keys[(family.name, key)] = [
                msgspec.json.encode([_SERIES, family.name, key, i]).decode()
                for i in range(len(values))]
        for slot, value in zip(slots, values, strict=True):
            self._file.write_value(slot, value, seen)

    def publish(self, families: Iterable[Metric], now: float) -> None:
        """This process's self-telemetry, stamped `now`."""
        for family in families:
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                ident = (family.name, family.type, family.documentation, sample.name, labels)
                slot = self._telemetry_keys.get(ident)
                if slot is None:
                    slot = self._telemetry_keys[ident] = msgspec.json.encode(
                        [_TELEMETRY, *ident[:4], dict(labels)]).decode()
                self._file.write_value(slot, sample.value, now)

    def read(self, families: dict[str, Family], now: float, expiration: float
             ) -> tuple[dict[str, list[tuple[Key, list[float]]]], list[Metric]]:
        """Every process's series added up (by family, label sets seen within
        `expiration` only), and the live processes' self-telemetry."""
        sums: dict[tuple[str, Key], list[float]] = {}
        seen: dict[tuple[str, ...], float] = {}  # label set -> when last seen
        latest: dict[tuple[str, Key], float] = {}  # a gauge's series -> when last written
        telemetry: dict[str, Metric] = {}
        for path in glob.glob(str(self.directory / "series_*.db")):
            pid = Path(path).name.split("_")[1]
            try:
                entries = list(MmapedDict.read_all_values_from_file(path))
            except FileNotFoundError:
                continue
            for raw, value, stamp, _ in entries:
                entry = msgspec.json.decode(raw)
                if entry[0] == _SERIES:
                    _, name, key, slot = entry
                    family = families.get(name)
                    if family is None or len(key) != len(family.labels) or slot >= family.size:
                        continue  # written by a process configured otherwise
                    key = tuple(key)
                    if family.kind == "gauge":  # the latest value any process wrote
                        if stamp >= latest.get((name, key), -1.0):
                            latest[(name, key)] = stamp
                            sums[(name, key)] = [value]
                        continue
                    values = sums.setdefault((name, key), [0.0] * family.size)
                    values[slot] += value
                    label_set = key[:len(family.base_labels)]
                    seen[label_set] = max(seen.get(label_set, 0.0), stamp)
                elif now - stamp <= _STALE:
                    _, name, kind, help_, sample, labels = entry
                    metric = telemetry.get(name) or telemetry.setdefault(
                        name, Metric(name, help_, kind))
                    metric.samples.append(Sample(sample, {**labels, "pid": pid}, value))
        live: dict[str, list[tuple[Key, list[float]]]] = {}
        for (name, key), values in sums.items():
            family = families[name]
            last = latest[(name, key)] if family.kind == "gauge" \
                else seen[key[:len(family.base_labels)]]
            if now - last <= expiration:
                live.setdefault(name, []).append((key, values))
        return live, list(telemetry.values())

