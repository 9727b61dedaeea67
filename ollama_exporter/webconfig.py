"""`--web.config.file`: TLS, basic auth, response headers and a rate limit for every HTTP path, in the
file format of Prometheus's exporter-toolkit, so the file written for node_exporter works here:

    tls_server_config:
      cert_file: tls.crt              # relative paths are read from this file's directory
      key_file: tls.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: clients.pem
    http_server_config:
      headers: {X-Frame-Options: deny}
    basic_auth_users:
      prometheus: $2y$10$...          # htpasswd -nBC 10 "" | tr -d ':\\n'

Every key the toolkit knows is either honoured or refused with one line naming it. Honoured as the
toolkit does: cert/key/client CA as files or inline PEM; all five client_auth_type modes;
client_allowed_sans; min/max_version TLS12 and TLS13; cipher_suites by Go name; prefer_server_cipher_suites;
one curve in curve_preferences; http_server_config.headers with the toolkit's allow-list and values;
http2: false; rate_limit; basic_auth_users. Refused (Python's ssl cannot do it): TLS10/TLS11, more
than one curve, a cipher list with only TLS 1.3 suites, http2: true (HTTP/1.1 only). Stricter than
the toolkit, because the file could never have worked as meant: RequireAndVerifyClientCert without a
client CA, client_allowed_sans without a client_auth_type that asks for a certificate, a
tls_server_config without a certificate, cert and cert_file (key, client_ca) both set, duplicate
keys. tls_server.py says how each TLS setting maps onto Python's ssl.

The interface a server uses:

    web = load_web_config(path)    # ConfigError: one line naming the file and the key
    web.tls                        # serve HTTPS?
    web.ssl_context()              # the server SSLContext, built once at load (cheap to call per
                                   #   connection); it re-reads rotated certificate files itself
    web.verify_peer(ssl_object)    # after the handshake: raises ValueError (the reason) when the
                                   #   client must be disconnected (client_allowed_sans)
    web.headers                    # Mapping[str, str]: add to every response, 401/404/429 too
    web.rate_limit                 # None, or .allow() -> bool (False: answer 429), before auth
    web.auth                       # None, or BasicAuth: .cached(header) -> Optional[bool] on the
                                   #   event loop, else .check(header) -> bool in a worker thread
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import yaml

from ollama_exporter import logparse
from ollama_exporter.basic_auth import BasicAuth, hash_problem
from ollama_exporter.config import ConfigError, load_yaml
from ollama_exporter.tls_server import KEYS as TLS_KEYS
from ollama_exporter.tls_server import TLSSettings, client_cert_problem, parse_tls_settings, server_context

SECTIONS = {
    "tls_server_config": TLS_KEYS,
    "http_server_config": ("http2", "headers"),
    "rate_limit": ("interval", "burst"),
    "basic_auth_users": None,  # any user name
}

# The toolkit's allow-list: header -> accepted values (None: any). Kept the same so that one file
# means one thing across the Prometheus ecosystem.
HEADERS: dict[str, Optional[tuple[str, ...]]] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}


class RateLimit:
    """A token bucket like Go's rate.NewLimiter(rate.Every(interval), burst): `burst` requests at once,
    then one more per `interval`. A burst of 0 admits nothing, as in Go."""

    def __init__(self, interval: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.interval, self.burst, self._clock = interval, burst, clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) / self.interval)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


@dataclass(frozen=True)
class WebConfig:
    tls_settings: Optional[TLSSettings] = None
    headers: Mapping[str, str] = field(default_factory=dict)
    auth: Optional[BasicAuth] = None
    rate_limit: Optional[RateLimit] = None
    context: Optional[ssl.SSLContext] = field(default=None, repr=False, compare=False)

    @property
    def tls(self) -> bool:
        return self.context is not None

    def ssl_context(self) -> ssl.SSLContext:
        """The server-side context; its sni_callback swaps in a fresh one when the files change."""
        if self.context is None:
            raise ValueError("this web config has no tls_server_config")
        return self.context

    def verify_peer(self, ssl_object: Any) -> None:
        """After the handshake (ssl_object: SSLObject or SSLSocket): ValueError if the client must go."""
        if not self.tls_settings or not self.tls_settings.client_allowed_sans:
            return  # any client the handshake let in may stay: no certificate to read
        problem = client_cert_problem(self.tls_settings.client_allowed_sans, ssl_object.getpeercert())
        if problem:
            raise ValueError(problem)


def load_web_config(path: str) -> WebConfig:
    """Read and validate a web config file; every problem is a ConfigError naming the file and key."""
    where = f"web config file {path}"
    # a regular file of bounded size, UTF-8, nesting and aliases bounded: a FIFO here used to hang
    data = load_yaml(path, "web config file", _StrictLoader)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(SECTIONS)}, got {type(data).__name__}")
    sections = {}
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{where}: unknown key {name!r}; known keys: {', '.join(SECTIONS)}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a mapping")
        known = SECTIONS[name]
        for key in value or {}:
            if known is not None and key not in known:
                raise ConfigError(f"{where}: unknown key '{name}.{key}'; known keys: {', '.join(known)}")
        sections[name] = value or {}
    http = sections.get("http_server_config", {})
    headers = _headers(where, http.get("headers"))
    if "http2" in http and not isinstance(http["http2"], bool):
        raise ConfigError(f"{where}: http_server_config.http2: expected true or false")
    if http.get("http2") is True:
        raise ConfigError(f"{where}: http_server_config.http2: true is not supported: this exporter speaks "
                          "HTTP/1.1 only (as every HTTP/2 client can); remove the key or set it to false")
    auth = _auth(where, sections.get("basic_auth_users", {}))
    rate_limit = _rate_limit(where, sections.get("rate_limit", {}))
    base_dir = os.path.dirname(os.path.abspath(path))
    tls = parse_tls_settings(where, sections.get("tls_server_config", {}), base_dir)
    context = server_context(where, tls) if tls else None  # reads the files: every problem shows now
    return WebConfig(tls_settings=tls, headers=headers, auth=auth, rate_limit=rate_limit, context=context)


def _headers(where: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: http_server_config.headers must be a mapping of header to value")
    headers = {}
    for name, raw in value.items():
        key = f"http_server_config.headers.{name}"
        if name not in HEADERS:
            raise ConfigError(f"{where}: {key}: HTTP header {name!r} can not be configured; "
                              f"allowed: {', '.join(HEADERS)}")
        text = _scalar_text(raw)
        if text is None or any(c in text for c in "\r\n\0"):
            raise ConfigError(f"{where}: {key}: expected a one-line string, got {raw!r}")
        allowed = HEADERS[name]
        if allowed is not None and text not in allowed:
            raise ConfigError(f"{where}: {key}: invalid value {text!r}; expected one of {', '.join(allowed)}")
        if text:  # "unset if blank"
            headers[name] = text
    return headers


def _scalar_text(value: Any) -> Optional[str]:
    """A YAML scalar as Go's yaml.v2 would decode it into a string (1 -> "1", true -> "true")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def _auth(where: str, users: dict) -> Optional[BasicAuth]:
    hashes = {}
    for user, hashed in users.items():
        problem = hash_problem(hashed)
        if problem:
            raise ConfigError(f"{where}: basic_auth_users.{user}: {problem}; "
                              "make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'")
        hashes[str(user)] = hashed
    return BasicAuth(hashes) if hashes else None


def parse_go_duration(value: Any) -> Optional[float]:
    """Go's time.ParseDuration ("1s", "1m30s", "250ms", "0") or a YAML integer of nanoseconds, in
    seconds; None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value * 1e-9
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    seconds = logparse.parse_go_duration(text[1:] if text[:1] in "+-" else text)
    return None if seconds is None else sign * seconds


def _rate_limit(where: str, section: dict) -> Optional[RateLimit]:
    interval = parse_go_duration(section.get("interval", 0))
    if interval is None or interval < 0:
        raise ConfigError(f"{where}: rate_limit.interval: expected a duration such as 1s or 250ms, "
                          f"got {section.get('interval')!r}")
    burst = section.get("burst", 0)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
        raise ConfigError(f"{where}: rate_limit.burst: expected a whole number >= 0, got {burst!r}")
    return RateLimit(interval, burst) if interval > 0 else None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (Go's strict YAML does; PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: SafeLoader reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)
