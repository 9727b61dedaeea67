"""Configuration: defaults, the YAML file, environment variables, flags and OLLAMA_HOST in one frozen Config.

Every setting is a dotted key (``ollama.url``) that is a YAML path (``ollama: {url: ...}``), a flag
(``--ollama.url``) and an environment variable (``OLLAMA_EXPORTER_OLLAMA_URL``); `KEYS` is the one
table all three are built from. A few structured settings (lists of mappings) are file-only.
Precedence, lowest first: default, OLLAMA_HOST (for ``ollama.url`` only), the file, the environment,
flags. Nothing else in the package reads the environment or the YAML. Every bad value raises
ConfigError with one line that names the key, where it came from, the value and what was expected;
the CLI turns it into exit status 2.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import os
import re
import shlex
import stat
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

import yaml

DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")
API_SOURCES = ("version", "ps", "tags", "show")  # Ollama's endpoints; "show" covers every /api/show call
ENV_PREFIX = "OLLAMA_EXPORTER_"
MAX_FILE_BYTES = 1024 * 1024  # a config file is a few hundred bytes; refuse to read a runaway one
MAX_YAML_VALUES = 100_000  # values in one file with its aliases expanded (a real one has a few dozen)
LOG_SOURCES = ("none", "journald", "file", "stdin", "command")


class ConfigError(Exception):
    """A configuration problem, worded for the operator (one line, no traceback)."""


@dataclass(frozen=True)
class Module:
    """Per-target settings for /probe?module=<name> (multi-target mode)."""

    name: str
    timeout: Optional[float] = None  # None: the scrape timeout Prometheus sends, less an offset
    sources: tuple[str, ...] = API_SOURCES
    probes: bool = False  # also run latency probes against the target's resident models


DEFAULT_MODULE = Module("default")


@dataclass(frozen=True)
class Config:
    ollama_url: str = DEFAULT_OLLAMA_URL
    ollama_timeout: float = 5.0
    ollama_max_models: int = 5000
    poll_interval: float = 5.0
    poll_forget_after: float = 3600.0
    web_listen_address: tuple[str, ...] = (":9778",)
    web_config_file: Optional[str] = None
    web_telemetry_path: str = "/metrics"
    web_disable_exporter_metrics: bool = False
    web_max_connections: int = 512
    log_level: str = "info"
    log_format: str = "logfmt"
    gpu_enabled: str = "auto"
    probes_enabled: bool = True
    probes_interval: float = 30.0
    probes_timeout: float = 60.0
    probes_models: tuple[str, ...] = ()
    probes_prompt: str = "Count from one to twenty, separated by spaces."
    probes_num_predict: int = 16
    probes_concurrency: int = 1
    probes_allow_cold_load: bool = False
    probes_idle_models: str = "skip"
    probes_forwarded_for: str = "192.0.2.1"  # RFC 5737 TEST-NET-1: never a real client
    multi_target_allow: tuple[str, ...] = ()
    multi_target_modules: tuple[Module, ...] = (DEFAULT_MODULE,)
    multi_target_cache_size: int = 100
    logs_source: str = "none"
    logs_path: Optional[str] = None
    logs_unit: str = "ollama"
    logs_command: tuple[str, ...] = ()
    logs_state_file: Optional[str] = None
    runners_enabled: str = "auto"

    @property
    def listen(self) -> list[tuple[str, int]]:
        return [parse_listen_address(a) for a in self.web_listen_address]

    def module(self, name: str) -> Optional[Module]:
        return next((m for m in self.multi_target_modules if m.name == name), None)


# --- value parsers: each takes (key, raw value) and returns the typed value or raises ConfigError ---

_DURATION_RE = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def parse_duration(key: str, value: Any, low: float = 0.001, high: float = 366 * 86400) -> float:
    """Prometheus-style duration (``500ms``, ``5s``, ``1m30s``) to seconds, within [low, high]."""
    text = value if isinstance(value, str) else None
    match = _DURATION_RE.match(text.strip()) if text and len(text) < 64 else None
    if not match or not any(match.groups()):
        raise ConfigError(
            f"{key}: invalid duration {value!r}: expected a number with a unit, such as 500ms, 5s, 1m or 1h30m"
        )
    seconds = float(sum(int(g) * unit for g, unit in zip(match.groups(), _DURATION_UNITS) if g))
    if seconds <= 0:
        raise ConfigError(f"{key}: duration {value!r} must be greater than zero")
    if not low <= seconds <= high:
        raise ConfigError(f"{key}: duration {value!r} is out of range: expected {_show(low)} to {_show(high)}")
    return seconds


def _show(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


def _duration(low: float, high: float) -> Callable[[str, Any], float]:
    return lambda key, value: parse_duration(key, value, low, high)


def parse_url(key: str, value: Any) -> str:
    """An http(s) URL with a host; trailing slashes are dropped so paths join cleanly."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a URL such as http://127.0.0.1:11434, got {value!r}")
    text = value.strip()
    shown = redact_url(text)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - parsed only to validate it
    except ValueError as exc:
        raise ConfigError(f"{key}: invalid URL {shown!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{key}: invalid URL {shown!r}: scheme must be http or https")
    if not parts.hostname:
        raise ConfigError(f"{key}: invalid URL {shown!r}: no host")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}: invalid URL {shown!r}: must not have a query or fragment")
    return text.rstrip("/")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``xxxxx`` (as Go's url.Redacted does), for pages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:xxxxx@{host}"))
    except ValueError:
        return "(invalid URL)"


def parse_listen_address(value: str, key: str = "web.listen_address") -> tuple[str, int]:
    """``host:port``, ``:port`` (all interfaces) or ``[v6addr]:port`` to (host, port); host "" = all."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected an address such as :9778 or 127.0.0.1:9778, got {value!r}")
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"{key}: invalid listen address {value!r}: expected [host]:port, such as :9778, 127.0.0.1:9778 or [::1]:9778"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{key}: invalid IPv6 address in {value!r}") from None
    elif ":" in host:
        raise ConfigError(f"{key}: IPv6 addresses must be bracketed, such as [::1]:9778, got {value!r}")
    return host, int(port_text)


def _parse_listen(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (str, list, tuple)):
        raise ConfigError(f"{key}: expected an address such as :9778 or 127.0.0.1:9778, got {value!r}")
    items = _list(key, value, "addresses such as :9778 or [::1]:9778")
    if not items:
        raise ConfigError(f"{key}: at least one listen address is needed")
    for item in items:
        parse_listen_address(item, key)
    return tuple(dict.fromkeys(item.strip() for item in items))


def _parse_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("/-/") or value == "/" \
            or any(c in value for c in "?# ") or len(value) > 200:
        raise ConfigError(f"{key}: invalid path {value!r}: expected an absolute path such as /metrics "
                          "(not /, not under /-/)")
    return value


def _parse_choice(choices: tuple[str, ...], aliases: Optional[Mapping[str, str]] = None) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        text = value.strip().lower() if isinstance(value, str) else None
        text = (aliases or {}).get(text, text)
        if text not in choices:
            raise ConfigError(f"{key}: invalid value {value!r}: expected one of {', '.join(choices)}")
        return text

    return parse


def _parse_auto_bool(key: str, value: Any) -> str:
    """auto, true or false; YAML booleans are accepted too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return _parse_choice(("auto", "true", "false"))(key, value)


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "false", "1", "0", "yes", "no"):
        return text in ("true", "1", "yes")
    raise ConfigError(f"{key}: invalid value {value!r}: expected true or false")


def _parse_int(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 12:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{key}: invalid value {value!r}: expected a whole number from {low} to {high}")
        return value

    return parse


def _parse_text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: invalid value {value!r}: expected a non-empty string")
    return value


def _parse_ip(key: str, value: Any) -> str:
    try:
        return str(ipaddress.ip_address(value.strip() if isinstance(value, str) else value))
    except ValueError:
        raise ConfigError(f"{key}: invalid value {value!r}: expected an IP address such as 192.0.2.1") from None


def _list(key: str, value: Any, what: str) -> list[str]:
    """A YAML list of strings, or a comma-separated string (the form flags and env vars use)."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, tuple):
        items = list(items)
    if not isinstance(items, list) or not all(isinstance(m, str) for m in items):
        raise ConfigError(f"{key}: invalid value {value!r}: expected a list of {what}")
    return [m.strip() for m in items if m.strip()]


def _parse_models(key: str, value: Any) -> tuple[str, ...]:
    return tuple(_list(key, value, "model names such as [qwen3:8b]"))


def _parse_allow(key: str, value: Any) -> tuple[str, ...]:
    patterns = tuple(_list(key, value, "URL patterns such as ['http://10.0.*:11434']"))
    for pattern in patterns:
        if not pattern.startswith(("http://", "https://")):
            raise ConfigError(f"{key}: invalid pattern {pattern!r}: must start with http:// or https://")
        fnmatch.translate(pattern)
    return patterns


_MODULE_KEYS = ("timeout", "sources", "probes")


def _parse_modules(key: str, value: Any) -> tuple[Module, ...]:
    """``{name: {timeout: 10s, sources: [version, ps, tags, show], probes: false}}``; `default` always exists."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of module names to settings")
    modules = {"default": DEFAULT_MODULE}
    for name, settings in value.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ConfigError(f"{key}: invalid module name {name!r}: letters, digits, _ and - only")
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: expected a mapping with the keys {', '.join(_MODULE_KEYS)}")
        unknown = sorted(set(settings) - set(_MODULE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(_MODULE_KEYS)}")
        sources = tuple(_list(f"{where}.sources", settings.get("sources", list(API_SOURCES)), "sources"))
        bad = [s for s in sources if s not in API_SOURCES]
        if bad:
            raise ConfigError(f"{where}.sources: unknown source {bad[0]!r}: expected some of {', '.join(API_SOURCES)}")
        timeout = settings.get("timeout")
        modules[name] = Module(
            name,
            timeout=parse_duration(f"{where}.timeout", timeout, 0.01, 600) if timeout is not None else None,
            sources=sources,
            probes=_parse_bool(f"{where}.probes", settings.get("probes", False)),
        )
    return tuple(modules.values())


def _parse_argv(key: str, value: Any) -> tuple[str, ...]:
    """A command as a YAML list of arguments, or one string split like a shell would (the flag's form)."""
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: invalid command {value!r}: {exc}") from None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise ConfigError(f"{key}: invalid value {value!r}: expected a command as a list such as "
                          "[docker, logs, --follow, --since, 0s, ollama]")
    return tuple(value)


def url_from_ollama_host(value: str) -> str:
    """Read OLLAMA_HOST the way Ollama's own CLI does (envconfig.Host).

    ``host``, ``host:port``, ``:port``, ``[v6]:port`` and ``scheme://host[:port][/path]`` are accepted.
    Without a scheme it is http with port 11434; an explicit http:// or https:// without a port uses 80 or
    443. An unspecified bind address (empty, ``0.0.0.0``, ``::``) means this host, so we connect to loopback.
    """
    text = value.strip()
    scheme, sep, hostport = text.partition("://")
    default_port = "11434"
    if not sep:
        scheme, hostport = "http", text
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    else:
        raise ConfigError(f"OLLAMA_HOST: invalid value {redact_url(value)!r}: scheme must be http or https")
    hostport, _, path = hostport.partition("/")
    host, port = split_host_port(hostport)
    if port is None:
        host = hostport.strip("[]") if hostport else ""
        port = default_port
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"OLLAMA_HOST: invalid port {port!r} in {redact_url(value)!r}")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"{scheme}://{host}:{port}"
    return parse_url("OLLAMA_HOST", f"{url}/{path}" if path else url)


def split_host_port(hostport: str) -> tuple[str, Optional[str]]:
    """Go's net.SplitHostPort, loosely: returns (host, None) when there is no port."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end != -1 and hostport[end + 1 : end + 2] == ":":
            return hostport[1:end], hostport[end + 2 :]
        return hostport, None
    if hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
        return host, port
    return hostport, None


# --- the key table: one row per setting, used by the YAML loader, the environment and the CLI ---


@dataclass(frozen=True)
class Key:
    name: str  # dotted: YAML path and flag name
    field: str  # Config attribute
    parse: Callable[[str, Any], Any]
    help: str
    metavar: str = "TEXT"
    is_flag: bool = False  # a boolean: --key / --no-key
    flag: Optional[str] = None  # a flag name other than the derived one (exporter-toolkit's --web.config.file)
    multiple: bool = False  # a list: the flag may be repeated; the env var is comma-separated
    file_only: bool = False  # structured: only the YAML file can set it


KEYS: tuple[Key, ...] = (
    Key("ollama.url", "ollama_url", parse_url,
        "Ollama base URL. Default: OLLAMA_HOST if set, else http://127.0.0.1:11434.", "URL"),
    Key("ollama.timeout", "ollama_timeout", _duration(0.01, 600),
        "Deadline for each call to Ollama's API, connection and whole answer included. Default: 5s.", "DURATION"),
    Key("ollama.max_models", "ollama_max_models", _parse_int(1, 100_000),
        "Most model rows read from one /api/tags or /api/ps answer; the rest are dropped and counted. "
        "Default: 5000.", "N"),
    Key("poll.interval", "poll_interval", _duration(0.1, 3600),
        "How often to poll Ollama and refresh the metrics. Default: 5s.", "DURATION"),
    Key("poll.forget_after", "poll_forget_after", _duration(1, 30 * 86400),
        "Forget a model's counters once it has been in neither /api/tags nor /api/ps for this long. "
        "Default: 1h.", "DURATION"),
    Key("web.listen_address", "web_listen_address", _parse_listen,
        "Address to serve on, [host]:port; repeat the flag for several. Default: :9778 (all interfaces).",
        "ADDRESS", multiple=True),
    Key("web.config_file", "web_config_file", _parse_text,
        "TLS and basic-auth settings, in the exporter-toolkit web config format.", "FILE",
        flag="--web.config.file"),
    Key("web.telemetry_path", "web_telemetry_path", _parse_path,
        "Path under which to serve the metrics. Default: /metrics.", "PATH"),
    Key("web.disable_exporter_metrics", "web_disable_exporter_metrics", _parse_bool,
        "Leave out the exporter's own process_* and python_* metrics.", is_flag=True),
    Key("web.max_connections", "web_max_connections", _parse_int(8, 65536),
        "Most client connections held open at once; past it the oldest idle one is closed. Default: 512.", "N"),
    Key("log.level", "log_level", _parse_choice(LOG_LEVELS, {"warning": "warn"}),
        "Log level: debug, info, warn or error. Default: info.", "LEVEL"),
    Key("log.format", "log_format", _parse_choice(LOG_FORMATS),
        "Log line format: logfmt or json. Default: logfmt.", "FORMAT"),
    Key("gpu.enabled", "gpu_enabled", _parse_auto_bool,
        "NVIDIA GPU metrics through NVML: auto (use it if the library loads), true (required) or false. "
        "Default: auto.", "auto|true|false"),
    Key("probes.enabled", "probes_enabled", _parse_bool,
        "Run active latency probes against resident models. Default: enabled.", is_flag=True),
    Key("probes.interval", "probes_interval", _duration(0.1, 86400),
        "How often to probe each resident model. Default: 30s.", "DURATION"),
    Key("probes.timeout", "probes_timeout", _duration(0.1, 3600),
        "Deadline for one probe, streaming included. Default: 60s.", "DURATION"),
    Key("probes.models", "probes_models", _parse_models,
        "Only probe these models (comma-separated). Default: every resident model.", "MODELS"),
    Key("probes.prompt", "probes_prompt", _parse_text, "Prompt a probe sends.", "TEXT"),
    Key("probes.num_predict", "probes_num_predict", _parse_int(1, 4096),
        "Tokens a probe asks for. Default: 16.", "N"),
    Key("probes.concurrency", "probes_concurrency", _parse_int(1, 16),
        "Probes of different models running at once (each can hold a user's only slot). Default: 1.", "N"),
    Key("probes.allow_cold_load", "probes_allow_cold_load", _parse_bool,
        "Probe models listed in probes.models even when not loaded, which loads them. Default: false.",
        is_flag=True),
    Key("probes.idle_models", "probes_idle_models", _parse_choice(("skip", "probe")),
        "skip: probe a model with a finite keep_alive only after real traffic used it; probe: every interval "
        "(keeps idle models loaded). Default: skip.", "skip|probe"),
    Key("probes.forwarded_for", "probes_forwarded_for", _parse_ip,
        "X-Forwarded-For every request to Ollama carries (probes and polls), so Ollama's access log (the logs "
        "source), proxies and traffic accounting can tell the exporter from users. Default: 192.0.2.1 "
        "(RFC 5737 TEST-NET-1).", "IP"),
    Key("multi_target.allow", "multi_target_allow", _parse_allow,
        "Targets /probe may scrape: glob patterns matched against the target URL. Empty: /probe refuses all.",
        file_only=True),
    Key("multi_target.modules", "multi_target_modules", _parse_modules,
        "Per-target settings for /probe?module=NAME: timeout, sources, probes.", file_only=True),
    Key("multi_target.cache_size", "multi_target_cache_size", _parse_int(1, 10_000),
        "Targets whose /api/show answers are kept (least recently scraped dropped first). Default: 100.", "N"),
    Key("logs.source", "logs_source", _parse_choice(LOG_SOURCES),
        "Where to read Ollama's log for real-traffic metrics: none, journald, file, stdin or command. "
        "Default: none.", "|".join(LOG_SOURCES)),
    Key("logs.path", "logs_path", _parse_text,
        "Ollama's log file, for logs.source file (e.g. ~/.ollama/logs/server.log).", "FILE"),
    Key("logs.unit", "logs_unit", _parse_text,
        "systemd unit whose journal holds Ollama's log, for logs.source journald. Default: ollama.", "UNIT"),
    Key("logs.command", "logs_command", _parse_argv,
        "Command whose standard output is Ollama's log, for logs.source command (a list in the file, "
        "a shell-quoted string as a flag).", "COMMAND"),
    Key("logs.state_file", "logs_state_file", _parse_text,
        "Where the log position and counters are kept across restarts. Default: logs-state.json in "
        "$STATE_DIRECTORY (systemd StateDirectory=), else memory only.", "FILE"),
    Key("runners.enabled", "runners_enabled", _parse_auto_bool,
        "Read slot use from each loaded model's runner (llama-server /slots, read-only): auto, true or "
        "false. Default: auto.", "auto|true|false"),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}


def flag_name(key: Key) -> str:
    """``web.listen_address`` -> ``--web.listen-address`` (Prometheus exporter style)."""
    return key.flag or "--" + key.name.replace("_", "-")


def env_name(key: Key) -> str:
    """``--poll.interval`` -> ``OLLAMA_EXPORTER_POLL_INTERVAL``."""
    return ENV_PREFIX + re.sub(r"[.-]", "_", flag_name(key)[2:]).upper()


CONFIG_FILE_ENV = ENV_PREFIX + "CONFIG_FILE"
WEB_CONFIG_FILE_ENV = env_name(KEYS_BY_NAME["web.config_file"])


def read_file_text(path: str, what: str = "config file") -> str:
    """A small regular UTF-8 file's text; a FIFO, a directory, a device or a huge file is refused, not read."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {path}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{what} {path}: larger than {MAX_FILE_BYTES} bytes")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path}: not valid UTF-8 (line {line}, byte {exc.start})") from None


def load_yaml(path: str, what: str = "config file", loader: type = yaml.SafeLoader) -> Any:
    """Parse a YAML file with an error that names the file, line and column.

    Refused with one line, before anything walks or prints the data: nesting deep enough to exhaust the
    parser's recursion, and aliases that expand to more than MAX_YAML_VALUES values (a "billion laughs"
    file is a few hundred bytes; printing one of its values in an error message used to run for ever).
    """
    text = read_file_text(path, what)
    try:
        data = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader (or a subclass)
    except RecursionError:
        raise ConfigError(f"{what} {path}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} {path}: invalid YAML{at}: {problem}") from None
    if _expanded_size(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise ConfigError(f"{what} {path}: more than {MAX_YAML_VALUES} values once YAML aliases are expanded")
    return data


def _expanded_size(data: Any, limit: int) -> int:
    """How many values `data` holds with every alias expanded, counting each shared node once per use,
    in time linear in the distinct nodes (sizes are memoised by identity); stops counting past `limit`."""
    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if done:
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes.get(id(c), 1) for c in children))
        elif id(node) not in sizes:
            sizes[id(node)] = limit + 1  # until computed: a node that contains itself is too big
            stack.append((node, True))
            stack.extend((c, False) for c in children if isinstance(c, (dict, list)) and id(c) not in sizes)
    return sizes.get(id(data), 1)


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML config file into ``{dotted key: raw value}``, rejecting unknown keys."""
    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections (ollama:, poll:, web:, log:)")
    flat: dict[str, Any] = {}
    _flatten(path, data, "", flat)
    return flat


def _flatten(path: str, node: Mapping[Any, Any], prefix: str, out: dict[str, Any]) -> None:
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        if dotted in KEYS_BY_NAME:
            out[dotted] = value
        elif any(k.startswith(dotted + ".") for k in KEYS_BY_NAME):
            if not isinstance(value, dict):
                children = ", ".join(k for k in KEYS_BY_NAME if k.startswith(dotted + "."))
                raise ConfigError(f"config file {path}: {dotted!r} must be a mapping with the keys {children}")
            _flatten(path, value, dotted + ".", out)
        else:
            known = ", ".join(sorted(KEYS_BY_NAME))
            raise ConfigError(f"config file {path}: unknown key {str(dotted)[:100]!r}; known keys: {known}")


def build_config(
    file_path: Optional[str] = None,
    flags: Optional[Mapping[str, Any]] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Config:
    """Merge defaults < OLLAMA_HOST < file < environment < flags into a validated Config.

    ``flags`` maps dotted key names to raw values; None (or an empty tuple for a repeatable flag) means
    "not given".
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[str, Any]] = {}  # key -> (where it came from, raw value)
    ollama_host = environ.get("OLLAMA_HOST", "").strip()
    if ollama_host:
        raw["ollama.url"] = ("ollama.url", url_from_ollama_host(ollama_host))
    if file_path:
        raw.update({name: (f"{name} (in {file_path})", v) for name, v in load_file(file_path).items()})
    for key in KEYS:
        value = environ.get(env_name(key)) if not key.file_only else None
        if value is not None and value.strip():
            raw[key.name] = (f"{key.name} (from {env_name(key)})", value)
    for name, value in (flags or {}).items():
        if value is not None and value != ():
            raw[name] = (name, value)
    values = {KEYS_BY_NAME[name].field: KEYS_BY_NAME[name].parse(source, value) for name, (source, value) in raw.items()}
    config = dataclasses.replace(Config(), **values)
    if config.logs_source == "file" and not config.logs_path:
        raise ConfigError("logs.path: required when logs.source is file (the path of Ollama's log file)")
    if config.logs_source == "command" and not config.logs_command:
        raise ConfigError("logs.command: required when logs.source is command (the command that prints the log)")
    return config


def config_file_from(flag_value: Optional[str], environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """--config.file, else OLLAMA_EXPORTER_CONFIG_FILE."""
    environ = os.environ if environ is None else environ
    return flag_value or environ.get(CONFIG_FILE_ENV) or None
