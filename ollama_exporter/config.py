"""Configuration: defaults, the YAML file, flags and OLLAMA_HOST turned into one frozen Config.

Every setting is a dotted key (``ollama.url``) that is both a YAML path (``ollama: {url: ...}``) and a
flag (``--ollama.url``); `KEYS` is the one table both are built from. Precedence, lowest first:
default, OLLAMA_HOST (for ``ollama.url`` only), the file, flags. Nothing else in the package reads
the environment or the YAML. Every bad value raises ConfigError with one line that names the key,
the value and what was expected; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

import yaml

DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem, worded for the operator (one line, no traceback)."""


@dataclass(frozen=True)
class Config:
    ollama_url: str = DEFAULT_OLLAMA_URL
    ollama_timeout: float = 5.0
    poll_interval: float = 5.0
    web_listen_address: str = ":9778"
    web_config_file: Optional[str] = None
    log_level: str = "info"
    gpu_enabled: str = "auto"
    probes_enabled: bool = True
    probes_interval: float = 30.0
    probes_timeout: float = 60.0
    probes_models: tuple[str, ...] = ()
    probes_prompt: str = "Count from one to twenty, separated by spaces."
    probes_num_predict: int = 16
    probes_concurrency: int = 2
    probes_allow_cold_load: bool = False
    probes_idle_models: str = "skip"

    @property
    def listen(self) -> tuple[str, int]:
        return parse_listen_address(self.web_listen_address)


# --- value parsers: each takes (key, raw value) and returns the typed value or raises ConfigError ---

_DURATION_RE = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def parse_duration(key: str, value: Any) -> float:
    """Prometheus-style duration (``500ms``, ``5s``, ``1m30s``) to seconds; must be > 0."""
    text = value if isinstance(value, str) else None
    match = _DURATION_RE.match(text.strip()) if text else None
    if not match or not any(match.groups()):
        raise ConfigError(
            f"{key}: invalid duration {value!r}: expected a number with a unit, such as 500ms, 5s, 1m or 1h30m"
        )
    seconds = sum(int(g) * unit for g, unit in zip(match.groups(), _DURATION_UNITS) if g)
    if seconds <= 0:
        raise ConfigError(f"{key}: duration {value!r} must be greater than zero")
    return float(seconds)


def parse_url(key: str, value: Any) -> str:
    """An http(s) URL with a host; trailing slashes are dropped so paths join cleanly."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a URL such as http://127.0.0.1:11434, got {value!r}")
    text = value.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{key}: invalid URL {value!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{key}: invalid URL {value!r}: scheme must be http or https")
    if not parts.hostname:
        raise ConfigError(f"{key}: invalid URL {value!r}: no host")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}: invalid URL {value!r}: must not have a query or fragment")
    del port  # parsed only to validate it
    return text.rstrip("/")


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


def _parse_listen(key: str, value: Any) -> str:
    parse_listen_address(value, key)
    return value.strip()


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        text = str(value).lower() if isinstance(value, str) else None
        if text == "warn":
            text = "warning"
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
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(f"{key}: invalid value {value!r}: expected true or false")


def _parse_int(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{key}: invalid value {value!r}: expected a whole number from {low} to {high}")
        return value

    return parse


def _parse_text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: invalid value {value!r}: expected a non-empty string")
    return value


def _parse_models(key: str, value: Any) -> tuple[str, ...]:
    """A YAML list of model names, or a comma-separated string (the flag's form)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(m, str) for m in items):
        raise ConfigError(f"{key}: invalid value {value!r}: expected a list of model names such as [qwen3:8b]")
    return tuple(m.strip() for m in items if m.strip())


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
        raise ConfigError(f"OLLAMA_HOST: invalid value {value!r}: scheme must be http or https")
    hostport, _, path = hostport.partition("/")
    host, port = _split_host_port(hostport)
    if port is None:
        host = hostport.strip("[]") if hostport else ""
        port = default_port
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"OLLAMA_HOST: invalid port {port!r} in {value!r}")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"{scheme}://{host}:{port}"
    return parse_url("OLLAMA_HOST", f"{url}/{path}" if path else url)


def _split_host_port(hostport: str) -> tuple[str, Optional[str]]:
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


# --- the key table: one row per setting, used by the YAML loader and by the CLI to build flags ---


@dataclass(frozen=True)
class Key:
    name: str  # dotted: YAML path and flag name
    field: str  # Config attribute
    parse: Callable[[str, Any], Any]
    help: str
    metavar: str = "TEXT"
    is_flag: bool = False  # a boolean: --key / --no-key
    flag: Optional[str] = None  # a flag name other than the derived one (exporter-toolkit's --web.config.file)


KEYS: tuple[Key, ...] = (
    Key("ollama.url", "ollama_url", parse_url,
        "Ollama base URL. Default: OLLAMA_HOST if set, else http://127.0.0.1:11434.", "URL"),
    Key("ollama.timeout", "ollama_timeout", parse_duration,
        "Deadline for each call to Ollama's API. Default: 5s.", "DURATION"),
    Key("poll.interval", "poll_interval", parse_duration,
        "How often to poll Ollama and refresh the metrics. Default: 5s.", "DURATION"),
    Key("web.listen_address", "web_listen_address", _parse_listen,
        "Address to serve /metrics on: [host]:port. Default: :9778 (all interfaces).", "ADDRESS"),
    Key("web.config_file", "web_config_file", _parse_text,
        "TLS and basic-auth settings for /metrics, in the exporter-toolkit web config format.", "FILE",
        flag="--web.config.file"),
    Key("log.level", "log_level", _parse_choice(LOG_LEVELS),
        "Log level: debug, info, warning or error. Default: info.", "LEVEL"),
    Key("gpu.enabled", "gpu_enabled", _parse_auto_bool,
        "NVIDIA GPU metrics through NVML: auto (use it if the library loads), true (required) or false. "
        "Default: auto.", "auto|true|false"),
    Key("probes.enabled", "probes_enabled", _parse_bool,
        "Run active latency probes against resident models. Default: enabled.", is_flag=True),
    Key("probes.interval", "probes_interval", parse_duration,
        "How often to probe each resident model. Default: 30s.", "DURATION"),
    Key("probes.timeout", "probes_timeout", parse_duration,
        "Deadline for one probe, streaming included. Default: 60s.", "DURATION"),
    Key("probes.models", "probes_models", _parse_models,
        "Only probe these models (comma-separated). Default: every resident model.", "MODELS"),
    Key("probes.prompt", "probes_prompt", _parse_text, "Prompt a probe sends.", "TEXT"),
    Key("probes.num_predict", "probes_num_predict", _parse_int(1, 4096),
        "Tokens a probe asks for. Default: 16.", "N"),
    Key("probes.concurrency", "probes_concurrency", _parse_int(1, 16),
        "Probes of different models running at once. Default: 2.", "N"),
    Key("probes.allow_cold_load", "probes_allow_cold_load", _parse_bool,
        "Probe models listed in probes.models even when not loaded, which loads them. Default: false.",
        is_flag=True),
    Key("probes.idle_models", "probes_idle_models", _parse_choice(("skip", "probe")),
        "skip: probe a model with a finite keep_alive only after real traffic used it; probe: every interval "
        "(keeps idle models loaded). Default: skip.", "skip|probe"),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}


def flag_name(key: Key) -> str:
    """``web.listen_address`` -> ``--web.listen-address`` (Prometheus exporter style)."""
    return key.flag or "--" + key.name.replace("_", "-")


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML config file into ``{dotted key: raw value}``, rejecting unknown keys."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: invalid YAML{at}: {problem}") from None
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
            raise ConfigError(f"config file {path}: unknown key {dotted!r}; known keys: {known}")


def build_config(
    file_path: Optional[str] = None,
    flags: Optional[Mapping[str, Any]] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Config:
    """Merge defaults < OLLAMA_HOST < file < flags into a validated Config.

    ``flags`` maps dotted key names to raw values; a value of None means "not given".
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    ollama_host = environ.get("OLLAMA_HOST", "").strip()
    if ollama_host:
        raw["ollama.url"] = url_from_ollama_host(ollama_host)
    if file_path:
        raw.update(load_file(file_path))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    raw.update(given)
    values = {}
    for name, value in raw.items():
        key = KEYS_BY_NAME[name]
        source = f"{name} (in {file_path})" if file_path and name not in given else name
        values[key.field] = key.parse(source, value)
    return dataclasses.replace(Config(), **values)
