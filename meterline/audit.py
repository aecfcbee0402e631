"""The audit log of configuration changes: every start and reload, applied or refused.

An entry says when (UTC), what triggered it (`start`, `signal`: SIGHUP, `file_change`:
`service.watch_config`, `admin_api`: `POST /api/v1/reload`), which file and the sha256 of
the bytes read, the result (`applied`; `refused`: the file is invalid, the running
configuration stays; `partial`: a component failed to start) with the error, and what
changed: components added, removed and changed by kind and id, and for a changed one the
keys whose values changed, with their old and new values. Secrets never reach an entry:
a value written as `${env:NAME}` is recorded as that reference, a value under a key that
holds secrets (`auth_token`, `api_key`, `password`, `sasl`...) as `***`, and both are
masked in error messages too.

The core keeps the log in `<data_dir>/audit.jsonl`, one JSON object a line, each entry
fsynced before it is announced. It is bounded: once the file holds `KEEP` entries or
`MAX_BYTES`, it becomes `audit.jsonl.1` (the one before is dropped), so the last `KEEP`
to `2 * KEEP` entries are kept. Components follow it through `Context.audit`:
`entries()` reads what is kept, `subscribe(callback)` is called with each new entry (the
`finops` extension copies them to ClickHouse this way, without the core naming it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from meterline import logs
from meterline.yamlsource import ENV_REFERENCE, SourceError, load_text

if TYPE_CHECKING:
    from meterline.config import PipelineFile

Trigger = Literal["start", "signal", "file_change", "admin_api"]
Result = Literal["applied", "refused", "partial"]
FILE = "audit.jsonl"
KEEP = 1000  # entries per file: the last 1,000 to 2,000 are kept
MAX_BYTES = 4 * 1024 * 1024  # per file, whatever the count
MAX_ERROR = 8000  # characters of an error message kept
MAX_KEYS = 50  # changed keys recorded per component
MAX_VALUE = 200  # characters of a recorded value's JSON form
MASK = "***"
SECTIONS = {"receivers": "receiver", "processors": "processor", "exporters": "exporter",
            "extensions": "extension"}
# a key whose value is a secret: auth_token, api_key, password, key_password, client_secret...
# and the header names that carry one (X-Api-Key, api-key, x-goog-api-key, Authorization)
_SECRET_KEY = re.compile(r"(?i)^(?:.*[_-])?(?:token|password|passwd|secret|api[_-]?key|"
                         r"credentials?|authorization|private_key)$")
_SECRET_BLOCKS = {"sasl"}  # every value under these keys
_ONLY_REFERENCE = re.compile(r"^(?:\$\{env:[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})+$")


class Change(msgspec.Struct, omit_defaults=True):
    kind: str  # receiver, processor, exporter, extension, pipeline, service
    id: str
    keys: dict[str, dict[str, Any]] = {}
    """Changed only: dotted key -> {"from": old, "to": new} (a side absent when the key
    was added or removed), values masked."""


class Changes(msgspec.Struct):
    added: list[Change] = []
    removed: list[Change] = []
    changed: list[Change] = []


class Entry(msgspec.Struct, omit_defaults=True):
    id: str  # unique across daemons (a ClickHouse shared by several keeps them apart)
    seq: int  # 1, 2, ... in this data directory, across restarts
    time: str  # UTC, ISO 8601 with milliseconds
    trigger: str
    host: str
    file: str
    sha256: str | None  # of the bytes read; null when the file could not be read
    result: str
    error: str | None = None
    changes: Changes = msgspec.field(default_factory=Changes)
    restart_needed: list[str] = []  # service settings changed, kept until a restart


# --- what changed -------------------------------------------------------------------------
def written(text: str, overlay: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The file's data as written: `${env:NAME}` left as the reference, never the value
    (with the overlay of `meterline run --demo` merged in, as it is into the config)."""
    from meterline.config import merge

    try:
        data = load_text(text, "<audit>", _References()).data
    except SourceError:
        return {}
    return merge(data, overlay) if overlay else data


class _References(Mapping[str, str]):
    """An environment in which every variable's value is its own reference."""

    def __getitem__(self, name: str) -> str:
        return "${env:" + name + "}"

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def diff(old: PipelineFile | None, new: PipelineFile,
         overlay: Mapping[str, Any] | None = None) -> Changes:
    """Components added, removed and changed from `old` to `new` (None: nothing ran), by
    the comparison the service makes (a component is rebuilt when its config differs);
    pipelines and service settings too."""
    before = written(old.text, overlay) if old is not None else {}
    after = written(new.text, overlay)
    changes = Changes()
    for section, kind in SECTIONS.items():
        olds = getattr(old, section) if old is not None else {}
        news = getattr(new, section)
        changes.added += [Change(kind, cid) for cid in news if cid not in olds]
        changes.removed += [Change(kind, cid) for cid in olds if cid not in news]
        for cid, spec in news.items():
            if cid in olds and olds[cid].config != spec.config:
                changes.changed.append(Change(kind, cid, _keys(
                    (before.get(section) or {}).get(cid), (after.get(section) or {}).get(cid))))
    old_pipes = old.service.pipelines if old is not None else {}
    new_pipes = new.service.pipelines
    changes.added += [Change("pipeline", name) for name in new_pipes if name not in old_pipes]
    changes.removed += [Change("pipeline", name) for name in old_pipes if name not in new_pipes]
    for name, pipe in new_pipes.items():
        if name in old_pipes and old_pipes[name] != pipe:
            changes.changed.append(Change("pipeline", name, _keys(
                _at(before, "service", "pipelines", name), _at(after, "service", "pipelines",
                                                                name))))
    if old is not None:
        settings = [f for f in new.service.__struct_fields__ if f != "pipelines"
                    and getattr(old.service, f) != getattr(new.service, f)]
        if settings:
            keys = {k: v for k, v in _keys(_at(before, "service"), _at(after, "service")).items()
                    if k.split(".")[0].split("[")[0] in settings}
            changes.changed.append(Change("service", "service", keys))
    return changes


def _at(data: Any, *path: str) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _keys(old: Any, new: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, before, after in _leaves(old, new, ()):
        if len(out) == MAX_KEYS:
            out["…"] = {"to": "more keys changed"}
            break
        side: dict[str, Any] = {}
        if before is not _ABSENT:
            side["from"] = mask(path, before)
        if after is not _ABSENT:
            side["to"] = mask(path, after)
        out[_dotted(path)] = side
    return out


_ABSENT: Any = object()


def _leaves(old: Any, new: Any, path: tuple[str | int, ...]
            ) -> Iterator[tuple[tuple[str | int, ...], Any, Any]]:
    """(path, old, new) of every value that differs, down to scalars."""
    if old is None and isinstance(new, dict):  # `labels:` with nothing is `labels: {}`
        old = {}
    if new is None and isinstance(old, dict):
        new = {}
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _leaves(old.get(key, _ABSENT), new.get(key, _ABSENT), (*path, key))
    elif isinstance(old, list) and isinstance(new, list) and old and new:
        for i in range(max(len(old), len(new))):
            yield from _leaves(old[i] if i < len(old) else _ABSENT,
                               new[i] if i < len(new) else _ABSENT, (*path, i))
    elif old != new or type(old) is not type(new):
        yield path, old, new


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(block)"


def is_secret(path: tuple[str | int, ...]) -> bool:
    return any(isinstance(p, str) and (p in _SECRET_BLOCKS or _SECRET_KEY.match(p))
               for p in path)


def mask(path: tuple[str | int, ...], value: Any) -> Any:
    """`value` as an entry may hold it: under a secret key `***` (unless it is only
    `${env:...}` references), long values cut."""
    if isinstance(value, dict):
        return {k: mask((*path, k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask((*path, i), v) for i, v in enumerate(value)]
    if is_secret(path) and value is not None and not (
            isinstance(value, str) and _ONLY_REFERENCE.match(value)):
        return MASK
    if isinstance(value, str) and len(value) > MAX_VALUE:
        return value[:MAX_VALUE] + "…"
    return value


def scrub(message: str, text: str, environ: Mapping[str, str] | None = None) -> str:
    """`message` (an error about the file `text`) without the secrets the file gives: the
    value of every `${env:NAME}` it uses, as the reference, and literal values of secret
    keys, as `***`."""
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for match in ENV_REFERENCE.finditer(text):
        name = match.group(1)
        if name and env.get(name):
            found[env[name]] = "${env:" + name + "}"

    def secrets(data: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(data, dict):
            for k, v in data.items():
                secrets(v, (*path, k))
        elif isinstance(data, list):
            for i, v in enumerate(data):
                secrets(v, (*path, i))
        elif isinstance(data, str) and is_secret(path) and not _ONLY_REFERENCE.match(data):
            found[data] = MASK

    secrets(written(text), ())
    for value in sorted(found, key=len, reverse=True):
        if len(value) >= 4:  # shorter ones would garble the message, and are no secret
            message = message.replace(value, found[value])
    return message[:MAX_ERROR]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the file -----------------------------------------------------------------------------
Subscriber = Callable[[dict[str, Any]], None]


class AuditLog:
    """The data directory's audit log: append-only, fsynced, bounded (see the module)."""

    def __init__(self, data_dir: Path, keep: int = KEEP, max_bytes: int = MAX_BYTES) -> None:
        self.path = Path(data_dir) / FILE
        self.keep, self.max_bytes = keep, max_bytes
        self.host = socket.gethostname()
        self._count = 0  # entries in the current file
        self._seq = 0
        self._subscribers: list[Subscriber] = []
        self._lock = asyncio.Lock()
        self.log = logs.get(component="audit")

    def open(self) -> None:
        """Cut a line torn by a crash, and find where numbering goes on."""
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
                    os.fsync(f.fileno())
            self._count = data.count(b"\n")
        newest = read(self.path.parent, 1)
        self._seq = newest[0]["seq"] if newest else 0

    def entry(self, trigger: Trigger, file: str, sha256: str | None, result: Result,
              error: str | None = None, changes: Changes | None = None,
              restart_needed: list[str] | None = None) -> Entry:
        return Entry(id=uuid.uuid4().hex, seq=0, time=utc_now(), trigger=trigger,
                     host=self.host, file=os.path.abspath(file), sha256=sha256, result=result,
                     error=error, changes=changes or Changes(),
                     restart_needed=restart_needed or [])

    async def record(self, entry: Entry) -> dict[str, Any]:
        """Append `entry` (durable when this returns), then tell the subscribers. A failed
        write is logged, not raised: the reload it records has happened."""
        async with self._lock:
            self._seq += 1
            entry.seq = self._seq
            line = msgspec.json.encode(entry) + b"\n"
            try:
                await asyncio.to_thread(self._append, line)
            except OSError as e:
                self.log.error("cannot write the audit log", path=str(self.path), error=str(e))
        out: dict[str, Any] = msgspec.to_builtins(entry)
        for callback in list(self._subscribers):
            try:
                callback(out)
            except Exception as e:  # a subscriber's bug must not break a reload
                self.log.warning("audit subscriber failed", error=str(e))
        return out

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._count >= self.keep or (self.path.exists()
                                        and self.path.stat().st_size >= self.max_bytes):
            os.replace(self.path, self.path.with_name(FILE + ".1"))
            self._count = 0
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new name must survive a power loss too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._count += 1

    def entries(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The kept entries, newest first (at most `limit`)."""
        return read(self.path.parent, limit)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(entry)` with each new entry, once it is stored; returns the
        function that stops it. Callbacks run on the event loop and must not block."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers \
            else None


def read(data_dir: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The entries kept in `data_dir`, newest first (for the CLI when no daemon answers).
    A line that does not decode (being written, or torn) is skipped."""
    out: list[dict[str, Any]] = []
    for name in (FILE, FILE + ".1"):
        try:
            lines = (Path(data_dir) / name).read_bytes().splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            if limit is not None and len(out) >= limit:
                return out
            try:
                out.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                continue
    return out
