"""Loading and validating `pipeline.yaml`.

The shape is the OpenTelemetry Collector's: `receivers`, `processors` and
`exporters` sections of components named `type` or `type/name`, wired by
`service.pipelines`, and `extensions`, components in no pipeline (each one defined
runs). Each component's block is validated against the config class its factory
declares (msgspec converts and checks types and defaults); every problem found is
reported at once, each naming file, line, key and what was expected.
"""

from __future__ import annotations

import hashlib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from meterline import registry
from meterline.component import Config, Factory, Kind, convert, decode_hook
from meterline.httpserver import BearerListenerConfig
from meterline.units import Duration, Listen
from meterline.yamlsource import Path_, Source, SourceError, load_text

PIPELINE_SECTIONS: dict[str, Kind] = {"receivers": "receiver", "processors": "processor",
                                      "exporters": "exporter"}
"""The sections whose components `service.pipelines` wires."""
SECTIONS: dict[str, Kind] = {**PIPELINE_SECTIONS, "extensions": "extension"}
_ID = re.compile(r"^([a-z][a-z0-9_]*)(?:/([A-Za-z0-9][A-Za-z0-9_.-]*))?$")


class LogsConfig(Config):
    level: Literal["debug", "info", "warning", "error"] = "info"  # the least severe logged
    encoding: Literal["console", "json"] = "console"  # json: one object per line


class MetricsConfig(Config):
    """Self-telemetry: always on the admin `/metrics`; pushed over OTLP when an
    endpoint is given."""

    otlp_endpoint: str | None = None  # OTLP/gRPC collector to push the metrics to
    interval: Duration = Duration(60)  # how often they are pushed


class TelemetryConfig(Config):
    logs: LogsConfig = msgspec.field(default_factory=LogsConfig)  # the daemon's own logs
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)


class AdminConfig(BearerListenerConfig):
    """Also `tls` and the limits of every listener (`BearerListenerConfig`); `auth_token`
    is asked on `/api/*` (`/healthz` and `/metrics` stay open to probes and scrapers)."""

    listen: Listen = Listen("127.0.0.1:8888")  # beyond loopback, auth_token is required

    def __post_init__(self) -> None:
        super().__post_init__()
        # the admin API serves FinOps analytics and a live tap of every prompt
        if not self.auth_token and not is_loopback(self.listen.host):
            raise ValueError(
                f"admin listens on {self.listen}, beyond loopback: set auth_token (for example "
                "auth_token: ${env:METERLINE_ADMIN_TOKEN}), since the admin API serves "
                "analytics and a live tap of every prompt")


def is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


class MemoryLimiterConfig(Config):
    """`service.memory_limiter`: receivers push back (HTTP 429 with Retry-After, gRPC
    RESOURCE_EXHAUSTED, Kafka paused) while the daemon's memory is high, as the
    OpenTelemetry Collector's `memory_limiter` does. The memory is the resident set (RSS)
    of the daemon's process and of its child processes (the processor workers), measured
    every `check_interval`. `memory_limiter: null` turns it off (see meterline/memory.py)."""

    limit_mib: int | None = None
    """The hard limit, in MiB: past it a garbage collection is also forced at every check.
    Absent: 2048, or 80% of the memory the daemon may have (its cgroup's limit, else the
    machine's) when that is less."""
    spike_limit_mib: int | None = None
    """How much the memory may grow between two checks, in MiB: receivers are refused from
    limit_mib - spike_limit_mib (the soft limit) on. Absent: a fifth of the hard limit."""
    check_interval: Duration = Duration(1)
    """How often the memory is measured; also the Retry-After given to refused clients
    (at least 1s)."""

    def __post_init__(self) -> None:
        if self.limit_mib is not None and self.limit_mib < 1:
            raise ValueError(f"limit_mib must be at least 1, got {self.limit_mib}")
        if self.spike_limit_mib is not None and self.spike_limit_mib < 0:
            raise ValueError(f"spike_limit_mib must not be negative, got {self.spike_limit_mib}")
        if (self.limit_mib is not None and self.spike_limit_mib is not None
                and self.spike_limit_mib >= self.limit_mib):
            raise ValueError(f"spike_limit_mib ({self.spike_limit_mib}) must be less than "
                             f"limit_mib ({self.limit_mib})")
        if self.check_interval <= 0:
            raise ValueError("check_interval must be a positive duration such as 1s")


class PipelineConfig(Config):
    receivers: list[str]  # ids of receivers (`type` or `type/name`) feeding it
    exporters: list[str]  # ids of the exporters every event left is sent to
    processors: list[str] = msgspec.field(default_factory=list)  # run in this order


class ServiceConfig(Config):
    pipelines: dict[str, PipelineConfig]  # by name: receivers -> processors -> exporters
    # the admin server (health, metrics, status, tap, analytics API); null: off
    admin: AdminConfig | None = msgspec.field(default_factory=AdminConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)  # own logs, metrics
    memory_limiter: MemoryLimiterConfig | None = msgspec.field(
        default_factory=MemoryLimiterConfig)  # null: off
    data_dir: str = "./data"  # where components keep state: queues, checkpoints, chDB
    shutdown_timeout: Duration = Duration(10)  # for exporters to drain on SIGTERM
    watch_config: bool = False  # reload when the file changes, not only on SIGHUP
    workers: int | None = None
    """Processes that run the processors, so that the loop serving clients never does and
    every core works: absent, one per core the daemon may use (its CPU affinity, within its
    cgroup's CPU quota) and at most one per 256 MiB of its memory (its cgroup's limit, else
    the machine's); 1 runs them in the daemon's own process."""
    worker_nice: int = 10
    """How much lower the workers' CPU priority is than the daemon's (a niceness added to
    its own): on a busy machine the loop serving clients waits less for a core (gateway,
    16 clients of 60 KB prompts on 2 cores: added p50 3.5 -> 1.9 ms, p99 17 -> 10).
    0: the daemon's priority."""

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError("service.workers must be at least 1 (absent: one per core)")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError("service.worker_nice must be from 0 to 19 (a niceness added "
                             f"to the daemon's), got {self.worker_nice}")


@dataclass
class ComponentConfig:
    """One configured component: its id, its factory and its validated config."""

    id: str
    factory: Factory
    config: Config
    raw: Any = None
    """The block as written (after `${env:...}`): plain data that pickles, from which a
    worker process builds the same component (a compiled config may hold closures)."""

    @property
    def kind(self) -> Kind:
        return self.factory.kind


@dataclass
class PipelineFile:
    """A whole, valid `pipeline.yaml`."""

    file: str
    receivers: dict[str, ComponentConfig] = field(default_factory=dict)
    processors: dict[str, ComponentConfig] = field(default_factory=dict)
    exporters: dict[str, ComponentConfig] = field(default_factory=dict)
    extensions: dict[str, ComponentConfig] = field(default_factory=dict)
    service: ServiceConfig = field(default_factory=lambda: ServiceConfig(pipelines={}))
    text: str = ""
    """The file as read, before `${env:...}` (the audit log records what changed from it,
    with references rather than values)."""
    sha256: str | None = None  # of the bytes read


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load(file: str, environ: Mapping[str, str] | None = None,
         overlay: Mapping[str, Any] | None = None) -> PipelineFile:
    """Read and validate `file`; raises `ConfigError` listing every problem.

    `overlay` is merged into the file's data before validation (mappings merged key by
    key, anything else replaced): how `meterline run --demo` points the file's gateway
    at its fake upstream without another file to keep in step."""
    return loads(read(file), file, environ, overlay)


def read(file: str) -> bytes:
    """The bytes of `file` (once: a reload hashes and validates the same bytes)."""
    try:
        with open(file, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError([Problem(file, None, "", f"cannot read the file: {e.strerror}")]) \
            from e


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` merged in: nested mappings key by key, other values replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def loads(text: str | bytes, file: str = "<string>",
          environ: Mapping[str, str] | None = None,
          overlay: Mapping[str, Any] | None = None) -> PipelineFile:
    """Validate the text of a pipeline file (bytes: as read, hashed into `sha256`)."""
    raw = text if isinstance(text, bytes) else text.encode()
    try:
        decoded = raw.decode("utf-8")
        source = load_text(decoded, file, environ)
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(file, None, "", f"not UTF-8 text: {e}")]) from e
    except SourceError as e:
        raise ConfigError([Problem(e.file, e.line, "", e.message)]) from e
    if overlay:
        source.data = merge(source.data, overlay)
    result = validate(source)
    result.text, result.sha256 = decoded, hashlib.sha256(raw).hexdigest()
    return result


class _Validator:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def problem(self, path: Path_, message: str) -> None:
        self.problems.append(Problem(self.source.file, self.source.line_of(path),
                                     _dotted(path), message))

    def run(self) -> PipelineFile:
        data = self.source.data
        result = PipelineFile(self.source.file)
        known = (*SECTIONS, "service")
        for key in data:
            if key not in known:
                self.problem((key,), f"unknown top-level key (expected one of: {', '.join(known)})")
        for section, kind in SECTIONS.items():
            block = data.get(section) or {}
            if not isinstance(block, dict):
                self.problem((section,), f"expected a mapping of {kind} ids to their config")
                continue
            for cid, body in block.items():
                if spec := self.component((section, cid), kind, cid, body):
                    getattr(result, section)[cid] = spec
        if "service" not in data:
            self.problem((), "missing required key 'service' (with service.pipelines)")
            return result
        service = self.struct(("service",), data["service"], ServiceConfig)
        if service is not None:
            result.service = service
            self.wiring(result)
        if not self.problems:
            self.links(result)
        return result

    def component(self, path: Path_, kind: Kind, cid: str, body: Any) -> ComponentConfig | None:
        match = _ID.match(cid)
        if not match:
            self.problem(path, f"invalid {kind} id '{cid}' (expected type or type/name, "
                               "e.g. file or file/archive)")
            return None
        type_ = match.group(1)
        try:
            factory = registry.factory(kind, type_)
        except KeyError:
            known = ", ".join(sorted(registry.available(kind))) or "none installed"
            self.problem(path, f"unknown {kind} type '{type_}' (available: {known})")
            return None
        config = self.struct(path, body, factory.config)
        return ComponentConfig(cid, factory, config, body) if config is not None else None

    def struct(self, path: Path_, body: Any, cls: type[Any]) -> Any:
        try:
            return convert(body, cls)
        except msgspec.ValidationError:
            # msgspec stops at the first error: walk the block to report every one
            for rel, message in _problems_in({} if body is None else body, cls):
                self.problem((*path, *rel), message)
            return None

    def links(self, result: PipelineFile) -> None:
        """What components name of each other (`Factory.link`), once the rest is valid."""
        for section in SECTIONS:
            specs: dict[str, ComponentConfig] = getattr(result, section)
            for cid, spec in specs.items():
                if spec.factory.link is None:
                    continue
                try:
                    spec.config = spec.factory.link(spec.config, result)
                except ValueError as e:
                    self.problem((section, cid), str(e))

    def wiring(self, result: PipelineFile) -> None:
        used: dict[str, set[str]] = {section: set() for section in PIPELINE_SECTIONS}
        if not result.service.pipelines:
            self.problem(("service", "pipelines"), "expected at least one pipeline")
        for name, pipeline in result.service.pipelines.items():
            base = ("service", "pipelines", name)
            if not pipeline.receivers:
                self.problem((*base, "receivers"), "expected at least one receiver")
            if not pipeline.exporters:
                self.problem((*base, "exporters"), "expected at least one exporter")
            for section in PIPELINE_SECTIONS:
                names: list[str] = getattr(pipeline, section)
                raw = self.source.data.get(section) or {}
                for i, cid in enumerate(names):
                    if names.index(cid) != i:
                        self.problem((*base, section, i), f"'{cid}' is listed twice")
                    elif cid not in raw:
                        known = ", ".join(raw) or "none"
                        self.problem((*base, section, i),
                                     f"names {PIPELINE_SECTIONS[section]} '{cid}', which is not "
                                     f"defined under {section} (defined: {known})")
                    used[section].add(cid)
        for section in PIPELINE_SECTIONS:
            for cid in self.source.data.get(section) or {}:
                if cid not in used[section]:
                    self.problem((section, cid), f"{PIPELINE_SECTIONS[section]} '{cid}' is "
                                                 "defined but no pipeline uses it")


def validate(source: Source) -> PipelineFile:
    validator = _Validator(source)
    result = validator.run()
    if validator.problems:
        raise ConfigError(validator.problems)
    return result


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[[\"'](.*?)[\"']\]")


def _problems_in(data: Any, tp: Any) -> list[tuple[Path_, str]]:
    """Every problem of `data` read as `tp`, by path relative to it.

    msgspec reports one error per conversion, so a struct's keys are checked one by one:
    every unknown key, and every field whose value does not convert (recursing into
    nested structs, lists and mappings, so two bad keys at different depths are both
    found). Only when the parts are all fine is the whole converted, for what only the
    whole can tell (a missing required key, a check across fields)."""
    found: list[tuple[Path_, str]] = []
    inner = _struct_of(tp)
    origin = typing.get_origin(inner)
    struct = isinstance(inner, type) and issubclass(inner, msgspec.Struct)
    if struct and isinstance(data, dict):
        hints = typing.get_type_hints(inner)
        names = dict(zip(inner.__struct_encode_fields__, inner.__struct_fields__, strict=True))
        forbid = inner.__struct_config__.forbid_unknown_fields
        for key, value in data.items():
            if key in names:
                found += [((key, *rel), message)
                          for rel, message in _problems_in(value, hints[names[key]])]
            elif forbid:
                found.append(((key,), f"unknown key (expected one of: {', '.join(names)})"))
    elif origin in (list, tuple, set, frozenset) and isinstance(data, list):
        args = typing.get_args(inner)
        if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)):
            for i, item in enumerate(data):
                found += [((i, *rel), message) for rel, message in _problems_in(item, args[0])]
    elif origin is dict and isinstance(data, dict) and len(typing.get_args(inner)) == 2:
        value_type = typing.get_args(inner)[1]
        for key, value in data.items():
            found += [((key, *rel), message) for rel, message in _problems_in(value, value_type)]
    if found and struct and isinstance(data, dict):
        found += _checks_of_the_rest(data, tp, {rel[0] for rel, _ in found if rel})
    if found:
        return found
    try:
        msgspec.convert(data, tp, dec_hook=decode_hook)
    except msgspec.ValidationError as e:
        return [_explain(str(e), tp)]
    return []


def _checks_of_the_rest(data: dict[str, Any], tp: Any, bad: set[Any]) -> list[tuple[Path_, str]]:
    """The struct's own check (`__post_init__`) run on its keys without those found bad, so
    that `rate: 1.5` is reported beside a `keep_slower_than: fast` (not after it is fixed).
    A complaint about a key left out is not one: the key's own problem is reported."""
    try:
        msgspec.convert({k: v for k, v in data.items() if k not in bad}, tp,
                        dec_hook=decode_hook)
    except msgspec.ValidationError as e:
        path, message = _explain(str(e), tp)
        if not (path and path[0] in bad):
            return [(path, message)]
    return []


def _explain(error: str, cls: type[Any]) -> tuple[Path_, str]:
    """Turn a msgspec validation message into (relative key path, plain message)."""
    m = _AT.match(error)
    assert m is not None
    text, where = m.group(1), m.group(2) or ""
    # msgspec writes a mapping's key as `[...]`: the path can only name the mapping
    where, sep, _ = where.partition("[...]")
    if sep:
        text += " (in one of its entries)"
    path: list[str | int] = []
    for step in _STEP.finditer(where):
        key, index, quoted = step.groups()
        path.append(int(index) if index is not None else (key if key is not None else quoted))
    if unknown := re.match(r"Object contains unknown field `(.*)`", text):
        expected = _keys_at(cls, path)
        path.append(unknown.group(1))
        hint = f" (expected one of: {', '.join(expected)})" if expected else ""
        return tuple(path), f"unknown key{hint}"
    if missing := re.match(r"Object missing required field `(.*)`", text):
        path.append(missing.group(1))
        return tuple(path), "missing required key"
    text = re.sub(r"`([^`]*)`", r"\1", text)
    if text.startswith("Invalid enum value") and (values := _literal_values(_type_at(cls, path))):
        text += f" (expected one of: {', '.join(str(v) for v in values)})"
    return tuple(path), text[:1].lower() + text[1:]


def _type_at(cls: Any, path: list[str | int]) -> Any:
    """The type a config class expects at `path` (None when it cannot tell)."""
    tp: Any = cls
    for part in path:
        tp = _struct_of(tp)
        if tp is None:
            return None
        if isinstance(part, int) or not hasattr(tp, "__struct_fields__"):
            args = typing.get_args(tp)
            tp = args[-1] if args else None
            continue
        hints = typing.get_type_hints(tp)
        tp = hints.get(part)
    return tp


def _keys_at(cls: Any, path: list[str | int]) -> list[str]:
    """The keys a config class accepts at `path` (for 'unknown key' hints)."""
    tp = _struct_of(_type_at(cls, path))
    return list(tp.__struct_fields__) if tp is not None and hasattr(tp, "__struct_fields__") else []


def _literal_values(tp: Any) -> list[Any]:
    """The values a `Literal[...]` (or `Literal[...] | None`) type allows, else []."""
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return [v for arg in typing.get_args(tp) for v in _literal_values(arg)]
    return []


def _struct_of(tp: Any) -> Any:
    """Unwrap `X | None` and containers down to the struct (or container) type."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _struct_of(arg)
    return tp
