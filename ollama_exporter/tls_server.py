"""Server-side TLS for a web config's `tls_server_config`: an ssl.SSLContext that does what Go's
crypto/tls does with the same file wherever Python's ssl (OpenSSL) can, refuses the rest by name, and
re-reads the certificate, key and client CA files when they change, so a rotation needs no restart.

Go setting -> what Python does with it:
- `cert_file`+`key_file` or inline `cert`/`key`: load_cert_chain (inline PEM through a memory file).
- `client_ca_file` or inline `client_ca`: load_verify_locations.
- `min_version`/`max_version` TLS12, TLS13: minimum_version/maximum_version. TLS10 and TLS11 are
  refused: OpenSSL 3 negotiates them only at security level 0 with SHA-1 suites, for every client.
- `cipher_suites` (Go's names): set_ciphers() with OpenSSL's names for the same IANA suites. TLS 1.3
  names are accepted and, as in Go, change nothing: neither Go nor Python's ssl can choose them.
- `prefer_server_cipher_suites`: OP_CIPHER_SERVER_PREFERENCE (Go >= 1.17 ignores it; OpenSSL obeys).
- `curve_preferences`: one curve is honoured (set_ecdh_curve); several are refused, because Python's
  ssl can restrict the key exchange to one curve only, not to a list.
- `client_auth_type`:
    NoClientCert               -> CERT_NONE
    RequestClientCert          -> CERT_OPTIONAL, any certificate accepted unverified (as Go)
    RequireAnyClientCert       -> CERT_REQUIRED, any certificate accepted unverified (as Go)
    VerifyClientCertIfGiven    -> CERT_OPTIONAL
    RequireAndVerifyClientCert -> CERT_REQUIRED
  Python's ssl has no verify callback, so the two "any certificate" modes install OpenSSL's own
  (SSL_CTX_set_verify, through ctypes, on the libssl that Python's _ssl uses, after checking that
  the pointer really is this context's). Where that cannot be done the file is refused by name.
- `client_allowed_sans`: checked after the handshake by `client_cert_problem()` (the server calls it
  through WebConfig.verify_peer); a client whose certificate has none of the names is disconnected
  before any HTTP (Go fails the handshake itself; OpenSSL offers Python no hook there).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import ssl
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Optional

from ollama_exporter.config import ConfigError

log = logging.getLogger(__name__)

VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
LEGACY_VERSIONS = ("TLS10", "TLS11")

CLIENT_AUTH = {  # Go name -> (Python verify mode, accept any certificate unverified)
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_OPTIONAL, True),
    "RequireAnyClientCert": (ssl.CERT_REQUIRED, True),
    "RequireClientCert": (ssl.CERT_REQUIRED, True),  # the toolkit's old spelling of RequireAnyClientCert
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, False),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, False),
}

# Go's tls.CipherSuites() by name -> IANA code point; OpenSSL's name for each is looked up by code.
TLS12_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": 0x002F,
    "TLS_RSA_WITH_AES_256_CBC_SHA": 0x0035,
    "TLS_RSA_WITH_AES_128_GCM_SHA256": 0x009C,
    "TLS_RSA_WITH_AES_256_GCM_SHA384": 0x009D,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": 0xC009,
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": 0xC00A,
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": 0xC013,
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": 0xC014,
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": 0xC02B,
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": 0xC02C,
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": 0xC02F,
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": 0xC030,
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": 0xCCA8,
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": 0xCCA9,
}
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")

CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}

@dataclass(frozen=True)
class TLSSettings:
    """A validated tls_server_config; file paths already joined to the config file's directory. Its fields
    are the toolkit's keys, in the toolkit's order (KEYS)."""

    cert: str = ""
    key: str = field(default="", repr=False)
    client_ca: str = ""
    cert_file: str = ""
    key_file: str = ""
    client_auth_type: str = "NoClientCert"
    client_ca_file: str = ""
    cipher_suites: tuple[str, ...] = ()
    curve_preferences: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True
    client_allowed_sans: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """The files a rotation may replace."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


KEYS = tuple(f.name for f in fields(TLSSettings))


def parse_tls_settings(where: str, data: dict, base_dir: str) -> Optional[TLSSettings]:
    """The shape and names of a tls_server_config mapping (keys already known); None = no TLS. The
    files and the client-auth policy are build_context()'s to check, in the toolkit's order."""
    def text(key: str) -> str:
        value = data.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{where}: tls_server_config.{key}: expected a string, got {value!r}")
        return value

    def names(key: str) -> tuple[str, ...]:
        value = data.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: tls_server_config.{key}: expected a list of strings, got {value!r}")
        return tuple(value)

    def path(key: str) -> str:
        value = text(key)
        return os.path.join(base_dir, value) if value else ""

    for key, known, what in (("cipher_suites", (*TLS12_SUITES, *TLS13_SUITES), "cipher"),
                             ("curve_preferences", CURVES, "curve")):
        for name in names(key):
            if name not in known:
                raise ConfigError(f"{where}: tls_server_config.{key}: unknown {what} {name!r}; "
                                  f"known: {', '.join(known)}")
    for key in ("min_version", "max_version"):
        version = text(key)
        if version and version not in VERSIONS and version not in LEGACY_VERSIONS:
            raise ConfigError(f"{where}: tls_server_config.{key}: unknown TLS version {version!r}; "
                              f"expected TLS12 or TLS13")
    prefer = data.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise ConfigError(f"{where}: tls_server_config.prefer_server_cipher_suites: expected true or false")
    settings = TLSSettings(
        cert_file=path("cert_file"), cert=text("cert"), key_file=path("key_file"), key=text("key"),
        client_ca_file=path("client_ca_file"), client_ca=text("client_ca"),
        client_auth_type=text("client_auth_type") or "NoClientCert", client_allowed_sans=names("client_allowed_sans"),
        min_version=text("min_version") or "TLS12", max_version=text("max_version") or "TLS13",
        cipher_suites=names("cipher_suites"), prefer_server_cipher_suites=prefer,
        curve_preferences=names("curve_preferences"),
    )
    enabled = any(text(k) for k in ("cert_file", "cert", "key_file", "key", "client_ca_file", "client_ca",
                                    "client_auth_type"))
    if not enabled:
        others = sorted(k for k, v in data.items() if v not in (None, "", []))
        if others:
            raise ConfigError(f"{where}: tls_server_config sets {', '.join(others)} but no certificate: "
                              "TLS would be off; add cert_file and key_file, or remove tls_server_config")
        return None
    return settings  # build_context() finds every remaining problem: files, policy, what Python cannot do


def build_context(where: str, s: TLSSettings) -> ssl.SSLContext:
    """A server SSLContext for `s`, reading its files now; every problem is a ConfigError."""
    if not s.cert_file and not s.cert:
        raise ConfigError(f"{where}: tls_server_config: missing one of cert or cert_file")
    if not s.key_file and not s.key:
        raise ConfigError(f"{where}: tls_server_config: missing one of key or key_file")
    for inline, file in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if getattr(s, inline) and getattr(s, file):
            raise ConfigError(f"{where}: tls_server_config: set {inline} or {file}, not both")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _pem(where, "cert_file", s.cert_file, s.cert) as cert, _pem(where, "key_file", s.key_file, s.key) as key:
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ConfigError(f"{where}: tls_server_config: cannot load the certificate and key "
                              f"({s.cert_file or 'cert'}, {s.key_file or 'key'}): {_reason(exc)}") from None
    if s.client_ca_file:
        _readable(where, "client_ca_file", s.client_ca_file)
    if s.client_auth_type not in CLIENT_AUTH:
        raise ConfigError(f"{where}: tls_server_config.client_auth_type: invalid ClientAuth "
                          f"{s.client_auth_type!r}; expected one of {', '.join(CLIENT_AUTH)}")
    mode, accept_any = CLIENT_AUTH[s.client_auth_type]
    has_ca = bool(s.client_ca_file or s.client_ca)
    if has_ca and mode == ssl.CERT_NONE:
        raise ConfigError(f"{where}: tls_server_config: client CA's have been configured without a client "
                          "auth policy; set client_auth_type (RequireAndVerifyClientCert for mutual TLS)")
    if s.client_auth_type == "RequireAndVerifyClientCert" and not has_ca:
        raise ConfigError(f"{where}: tls_server_config: client_auth_type RequireAndVerifyClientCert needs "
                          "client_ca_file (or client_ca): without one no client certificate can ever verify")
    if has_ca:
        with _pem(where, "client_ca_file", s.client_ca_file, s.client_ca) as ca:
            try:
                ctx.load_verify_locations(ca)
            except ssl.SSLError as exc:
                raise ConfigError(f"{where}: tls_server_config.client_ca_file: no usable CA certificate in "
                                  f"{s.client_ca_file or 'client_ca'}: {_reason(exc)}") from None
    if s.client_allowed_sans and mode == ssl.CERT_NONE:
        raise ConfigError(f"{where}: tls_server_config.client_allowed_sans needs a client_auth_type that asks "
                          "for a certificate (NoClientCert never sees one)")
    for key in ("min_version", "max_version"):
        if getattr(s, key) in LEGACY_VERSIONS:
            raise ConfigError(f"{where}: tls_server_config.{key}: {getattr(s, key)} is not supported: OpenSSL 3, "
                              "which Python's ssl uses, negotiates TLS 1.0/1.1 only at security level 0 "
                              "(for every client); use TLS12 or TLS13")
    ctx.minimum_version, ctx.maximum_version = VERSIONS[s.min_version], VERSIONS[s.max_version]
    if ctx.minimum_version > ctx.maximum_version:
        raise ConfigError(f"{where}: tls_server_config: min_version {s.min_version} is above "
                          f"max_version {s.max_version}")
    if s.cipher_suites:
        _set_ciphers(where, ctx, s)
    if not s.prefer_server_cipher_suites:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if len(s.curve_preferences) > 1:
        raise ConfigError(f"{where}: tls_server_config.curve_preferences: Python's ssl can restrict the key "
                          "exchange to one curve only, not to a list; list one curve, or remove the key to "
                          "allow OpenSSL's defaults (X25519, P-256, X448, P-521, P-384)")
    if s.curve_preferences:
        ctx.set_ecdh_curve(CURVES[s.curve_preferences[0]])
    ctx.verify_mode = mode
    if accept_any:
        problem = _accept_any_client_certificate(ctx)
        if problem:
            raise ConfigError(f"{where}: tls_server_config.client_auth_type {s.client_auth_type} is not "
                              f"supported on this Python ({problem}); use VerifyClientCertIfGiven or "
                              "RequireAndVerifyClientCert with client_ca_file")
    return ctx


def _set_ciphers(where: str, ctx: ssl.SSLContext, s: TLSSettings) -> None:
    wanted = [TLS12_SUITES[name] for name in s.cipher_suites if name in TLS12_SUITES]
    if not wanted:
        raise ConfigError(f"{where}: tls_server_config.cipher_suites lists only TLS 1.3 suites, which neither "
                          "Go nor Python's ssl lets a server choose; list TLS 1.2 suites or remove the key")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    probe.set_ciphers("ALL:@SECLEVEL=0")
    openssl_names = {c["id"] & 0xFFFF: c["name"] for c in probe.get_ciphers()}
    missing = [name for name in s.cipher_suites if name in TLS12_SUITES and TLS12_SUITES[name] not in openssl_names]
    if missing:
        raise ConfigError(f"{where}: tls_server_config.cipher_suites: {', '.join(missing)} not available in "
                          f"this OpenSSL ({ssl.OPENSSL_VERSION})")
    try:
        ctx.set_ciphers(":".join(openssl_names[code] for code in wanted))
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}: tls_server_config.cipher_suites: OpenSSL refuses them: {_reason(exc)}") from None


@contextmanager
def _pem(where: str, key: str, path: str, inline: str) -> Iterator[str]:
    """A readable file name for a file key or its inline PEM twin (in memory where the OS allows)."""
    if path:
        yield _readable(where, key, path)
        return
    data = inline.encode()
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("ollama-exporter-pem")
        try:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(suffix=".pem") as fh:  # mode 0600, removed on close
        fh.write(data)
        fh.flush()
        yield fh.name


def _readable(where: str, key: str, path: str) -> str:
    """`path` if it is a regular file (or /dev/null) we can open: a FIFO would block the reader, and a
    device such as /dev/zero would be read for ever, here and in OpenSSL."""
    try:
        st = os.stat(path)
        null = stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev
        if not stat.S_ISREG(st.st_mode) and not null:
            raise ConfigError(f"{where}: tls_server_config.{key}: cannot read {path}: not a regular file")
        with open(path, "rb"):
            return path
    except OSError as exc:
        raise ConfigError(f"{where}: tls_server_config.{key}: cannot read {path}: {exc.strerror or exc}") from None


def _reason(exc: ssl.SSLError) -> str:
    return exc.reason or exc.strerror or str(exc)


def client_cert_problem(allowed_sans: tuple[str, ...], peercert: Optional[dict]) -> Optional[str]:
    """Why a client may not continue (None: it may), from SSLSocket.getpeercert() after the handshake."""
    if not allowed_sans:
        return None
    if not peercert:
        return "no client certificate, and client_allowed_sans requires one"
    found = []
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "IP Address":
            try:
                value = str(ipaddress.ip_address(value.strip()))  # Go's spelling: 2001:db8::1
            except ValueError:
                continue
        elif kind not in ("DNS", "email", "URI"):
            continue
        found.append(value)
    if any(value in allowed_sans for value in found):
        return None
    return f"client certificate names {found or 'no SAN'}, none of client_allowed_sans"


# --- "any client certificate": OpenSSL's verify callback, which Python's ssl does not expose ---

_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


@_VerifyCallback
def _accept_any(preverify_ok: int, store_ctx: Any) -> int:
    return 1  # called by OpenSSL for each certificate of the client's chain: accept it, verified or not


def _accept_any_client_certificate(ctx: ssl.SSLContext) -> Optional[str]:
    """Install `_accept_any` as ctx's verify callback, keeping its verify mode; the problem, or None."""
    if sys.implementation.name != "cpython":
        return "needs CPython"
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # resolves in the libssl _ssl is linked to, not another copy
        get_options, get_mode, get_callback, set_verify = (
            lib.SSL_CTX_get_options, lib.SSL_CTX_get_verify_mode, lib.SSL_CTX_get_verify_callback,
            lib.SSL_CTX_set_verify)
    except (AttributeError, OSError) as exc:
        return f"cannot reach OpenSSL's SSL_CTX_set_verify: {exc}"
    get_options.argtypes = get_mode.argtypes = get_callback.argtypes = [ctypes.c_void_p]
    get_options.restype, get_mode.restype, get_callback.restype = ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p
    set_verify.argtypes, set_verify.restype = [ctypes.c_void_p, ctypes.c_int, _VerifyCallback], None
    # CPython's SSLContext object is its PyObject header followed by the SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    mode = {ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[ctx.verify_mode]  # SSL_VERIFY_PEER [| FAIL_IF_NO_PEER_CERT]
    if not pointer or get_options(pointer) != ctx.options or get_mode(pointer) != mode:
        return "this Python's SSLContext layout is not the one expected"
    set_verify(pointer, mode, _accept_any)
    if get_callback(pointer) != ctypes.cast(_accept_any, ctypes.c_void_p).value or get_mode(pointer) != mode:
        return "OpenSSL did not take the verify callback"
    return None


# --- rotation: the files are checked on every handshake and a changed set is loaded once ---

def _signature(paths: tuple[str, ...]) -> tuple:
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
            signature.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            signature.append(None)
    return tuple(signature)


class Reloader:
    """An sni_callback that hands each new connection the context built from the current files.

    It runs at every ClientHello (OpenSSL calls it with or without SNI), stats the files (a few
    microseconds) and rebuilds only when one changed: a replaced, rewritten or re-linked file. A set
    that does not load (say, the new certificate before its key) is logged once and the last good
    context stays in use until the files change again.
    """

    def __init__(self, build: Callable[[], ssl.SSLContext], paths: tuple[str, ...], first: ssl.SSLContext,
                 signature: tuple):
        self._build, self._paths = build, paths
        self._lock = threading.Lock()
        self._current, self._signature = first, signature  # the files' signature from before `first` was built
        self._failed: Optional[tuple] = None

    def __call__(self, connection: Any, server_name: Optional[str], ctx: ssl.SSLContext) -> None:
        current = self.current()
        if current is not ctx:
            connection.context = current

    def current(self) -> ssl.SSLContext:
        signature = _signature(self._paths)
        with self._lock:
            if signature not in (self._signature, self._failed):
                try:
                    self._current, self._signature = self._build(), signature
                    log.info("TLS certificate reloaded", extra={"path": ", ".join(self._paths)})
                except ConfigError as exc:
                    self._failed = signature
                    log.warning("TLS certificate reload failed, keeping the previous one",
                                extra={"path": ", ".join(self._paths), "error": str(exc)})
            return self._current


def server_context(where: str, s: TLSSettings) -> ssl.SSLContext:
    """build_context() plus the Reloader as sni_callback, for a listening socket."""
    signature = _signature(s.files)
    first = build_context(where, s)
    if s.files:
        first.sni_callback = Reloader(lambda: build_context(where, s), s.files, first, signature)
    return first
