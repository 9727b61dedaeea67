"""TLS and HTTP basic auth for /metrics, configured like every Go exporter (exporter-toolkit's
`--web.config.file` format), so operators reuse the file they already have:

    tls_server_config:
      cert_file: /etc/ollama-exporter/tls.crt
      key_file: /etc/ollama-exporter/tls.key
      client_auth_type: RequireAndVerifyClientCert   # optional (mTLS), with client_ca_file
      client_ca_file: /etc/ollama-exporter/clients.pem
      min_version: TLS12                              # optional: TLS10..TLS13
    basic_auth_users:
      prometheus: $2y$10$...                          # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')

Passwords are checked with bcrypt; a successful check is remembered (keyed by a SHA-256 of the
credentials) so a scrape every few seconds does not pay bcrypt's deliberate cost each time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import yaml

from ollama_exporter.config import ConfigError

TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_OPTIONAL,
               "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL, "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}


@dataclass(frozen=True)
class WebConfig:
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: Optional[str] = None
    min_version: str = "TLS12"
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash

    @property
    def tls(self) -> bool:
        return self.cert_file is not None


def load_web_config(path: str) -> WebConfig:
    """Read and validate a web config file; every problem is a ConfigError naming the file and key."""
    where = f"web config file {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with tls_server_config and/or basic_auth_users")
    for key in data:
        if key not in ("tls_server_config", "basic_auth_users"):
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: basic_auth_users, tls_server_config")
    tls = _mapping(where, "tls_server_config", data.get("tls_server_config"))
    for key in tls:
        if key not in TLS_KEYS:
            raise ConfigError(f"{where}: unknown key 'tls_server_config.{key}'; known keys: {', '.join(sorted(TLS_KEYS))}")
    cfg = WebConfig(
        cert_file=tls.get("cert_file"), key_file=tls.get("key_file"),
        client_auth_type=tls.get("client_auth_type", "NoClientCert"), client_ca_file=tls.get("client_ca_file"),
        min_version=tls.get("min_version", "TLS12"),
        users={str(u): _bcrypt_hash(where, u, h) for u, h in _mapping(where, "basic_auth_users",
                                                                          data.get("basic_auth_users")).items()},
    )
    if tls and (not cfg.cert_file or not cfg.key_file):
        raise ConfigError(f"{where}: tls_server_config needs both cert_file and key_file")
    if cfg.client_auth_type not in CLIENT_AUTH:
        raise ConfigError(f"{where}: tls_server_config.client_auth_type {cfg.client_auth_type!r}: expected one of "
                          f"{', '.join(CLIENT_AUTH)}")
    if cfg.min_version not in TLS_VERSIONS:
        raise ConfigError(f"{where}: tls_server_config.min_version {cfg.min_version!r}: expected one of "
                          f"{', '.join(TLS_VERSIONS)}")
    if CLIENT_AUTH[cfg.client_auth_type] == ssl.CERT_REQUIRED and not cfg.client_ca_file:
        raise ConfigError(f"{where}: client_auth_type {cfg.client_auth_type} needs client_ca_file")
    if cfg.tls:
        ssl_context(cfg, where)  # fail now, with the file named, rather than on the first scrape
    return cfg


def _mapping(where: str, key: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping")
    return value


def _bcrypt_hash(where: str, user: Any, value: Any) -> bytes:
    text = value if isinstance(value, str) else ""
    if not (text.startswith(("$2a$", "$2b$", "$2y$")) and len(text) == 60):
        raise ConfigError(f"{where}: basic_auth_users.{user}: expected a bcrypt hash ($2y$...), "
                          "not a plain password; make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'")
    return text.encode()


def ssl_context(cfg: WebConfig, where: str = "web config") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[cfg.min_version]
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        if cfg.client_ca_file:
            ctx.load_verify_locations(cfg.client_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load TLS certificate or key "
                          f"({cfg.cert_file}, {cfg.key_file}): {getattr(exc, 'strerror', None) or exc}") from None
    ctx.verify_mode = CLIENT_AUTH[cfg.client_auth_type]
    return ctx


class BasicAuth:
    """Checks `Authorization: Basic` headers against bcrypt hashes, remembering successes."""

    def __init__(self, users: Mapping[str, bytes]):
        self.users = dict(users)
        self._good: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, header: Optional[str]) -> bool:
        import bcrypt  # only needed when basic auth is configured

        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        key = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        with self._lock:
            if any(hmac.compare_digest(key, good) for good in self._good):
                return True
        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._good.add(key)
        return True
