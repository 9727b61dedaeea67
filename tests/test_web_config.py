"""--web.config.file parsing: exporter-toolkit's own testdata load or fail as upstream says, and every
key the toolkit knows is honoured or refused by name. (TLS and auth on the wire: test_web_security.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ollama_exporter.config import ConfigError
from ollama_exporter.webconfig import RateLimit, load_web_config, parse_go_duration

TOOLKIT = Path(__file__).resolve().parent / "fixtures" / "web-config"  # see PROVENANCE.md there

# file -> (what upstream says, what we do: None = loads, else a phrase of our one-line error).
# Upstream's verdict comes from web/tls_config_test.go (TestYAMLFiles, TestServerBehaviour, TestUsers)
# and the file's name where no test uses it.
TOOLKIT_FILES = {
    "tls_config_noAuth.requireandverifyclientcert.good.yml": ("good", None),
    "tls_config_noAuth.requireanyclientcert.good.yml": ("good", None),
    "tls_config_noAuth.requireanyclientcertkeyinline.good.yml": ("good (by name)", None),
    "web_config_auth_clientCAs_invalid.bad.yml": ("no such file", "client_ca_file: cannot read"),
    "web_config_auth_clientCAs_missing.bad.yml": ("bad (by name; no test)", "needs client_ca_file"),
    "web_config_auth_client_san.bad.yaml": ("loads; bad certificate at the handshake", None),
    "web_config_auth_client_san.good.yaml": ("good", None),
    "web_config_auth_user_list_invalid.bad.yml": ("hashedSecret too short", "basic_auth_users.john: expected a bcrypt hash"),
    "web_config_empty.yml": ("good", None),
    "web_config_headers.good.yml": ("good", None),
    "web_config_headers_content_type_options.bad.yml": ("invalid value for", "X-Content-Type-Options: invalid value 'sniff'"),
    "web_config_headers_extra_header.bad.yml": ("can not be configured", "HTTP header 'Content-Type' can not be configured"),
    "web_config_headers_frame_options.bad.yml": ("invalid value for", "X-Frame-Options: invalid value 'foo'"),
    "web_config_junk.yml": ("yaml", "expected a mapping"),
    "web_config_junk_key.yml": ("yaml", "unknown key 'tls_server_config.cert_filse'"),
    "web_config_noAuth.bad.yml": ("client CA's configured without a Client Auth Policy", "without a client auth policy"),
    # Upstream loads it and then refuses every connection (its reload test's "before"); we refuse the file.
    "web_config_noAuth.good.blocking.yml": ("loads; every handshake fails", "needs client_ca_file"),
    "web_config_noAuth.good.yml": ("good", None),
    "web_config_noAuth_allCiphers.good.yml": ("good", None),
    # Python's ssl can set one curve, not a list.
    "web_config_noAuth_allCurves.good.yml": ("good", "curve_preferences: Python's ssl can restrict the key exchange to one curve"),
    "web_config_noAuth_certPath_empty.bad.yml": ("missing one of cert or cert_file", "missing one of cert or cert_file"),
    "web_config_noAuth_certPath_invalid.bad.yml": ("no such file", "cert_file: cannot read"),
    "web_config_noAuth_certPath_keyPath_empty.bad.yml": ("missing one of cert or cert_file", "missing one of cert or cert_file"),
    "web_config_noAuth_certPath_keyPath_invalid.bad.yml": ("no such file", "cert_file: cannot read"),
    "web_config_noAuth_cert_empty.bad.yml": ("missing one of cert or cert_file", "missing one of cert or cert_file"),
    "web_config_noAuth_inventedCiphers.bad.yml": ("unknown cipher", "unknown cipher 'TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048'"),
    "web_config_noAuth_inventedCurves.bad.yml": ("unknown curve", "unknown curve 'CurveP257'"),
    "web_config_noAuth_keyPath_empty.bad.yml": ("missing one of key or key_file", "missing one of key or key_file"),
    "web_config_noAuth_keyPath_invalid.bad.yml": ("no such file", "cert_file: cannot read"),
    "web_config_noAuth_key_empty.bad.yml": ("missing one of key or key_file", "missing one of key or key_file"),
    "web_config_noAuth_noHTTP2.good.yml": ("good", None),
    # Go's HTTP/2 server needs an AES-128-GCM suite; this exporter speaks HTTP/1.1 only, so nothing is missing.
    "web_config_noAuth_noHTTP2Cipher.bad.yml": ("HTTP/2-required cipher missing", None),
    "web_config_noAuth_someCiphers.good.yml": ("good", None),
    "web_config_noAuth_someCiphers_noOrder.good.yml": ("good", None),
    "web_config_noAuth_someCurves.good.yml": ("good", None),
    "web_config_noAuth_tlsInline.good.yml": ("good", None),
    "web_config_noAuth_wrongTLSVersion.bad.yml": ("unknown TLS version", "unknown TLS version 'TLS111'"),
    "web_config_rate_limiter_nonblocking.yaml": ("good", None),
    "web_config_rate_limiter_one_second.yaml": ("good (every request 429)", None),
    "web_config_users.good.yml": ("good", None),
    "web_config_users_noTLS.good.yml": ("good", None),
}


def test_the_table_covers_every_toolkit_file():
    assert sorted(p.name for p in TOOLKIT.glob("*.y*ml")) == sorted(TOOLKIT_FILES)


@pytest.mark.parametrize("name", sorted(TOOLKIT_FILES))
def test_toolkit_testdata_loads_or_fails_as_upstream_says(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the files resolve against their own directory, not here
    _, refusal = TOOLKIT_FILES[name]
    path = TOOLKIT / name
    if refusal is None:
        web = load_web_config(str(path))
        if web.tls:
            assert web.ssl_context() is not None
    else:
        with pytest.raises(ConfigError) as err:
            load_web_config(str(path))
        message = str(err.value)
        assert message.startswith(f"web config file {path}: ") and "\n" not in message
        assert refusal in message


def test_what_the_good_toolkit_files_configure():
    users = load_web_config(str(TOOLKIT / "web_config_users.good.yml"))
    assert users.tls and users.auth is not None and sorted(users.auth.users) == [b"alice", b"bob", b"carol", b"dave"]
    assert not load_web_config(str(TOOLKIT / "web_config_users_noTLS.good.yml")).tls
    headers = load_web_config(str(TOOLKIT / "web_config_headers.good.yml")).headers
    assert headers["X-XSS-Protection"] == "1"  # a YAML integer, read as Go reads it into a string
    assert headers["X-Frame-Options"] == "deny" and len(headers) == 5
    limited = load_web_config(str(TOOLKIT / "web_config_rate_limiter_one_second.yaml")).rate_limit
    assert limited is not None and (limited.interval, limited.burst) == (1.0, 0)
    assert load_web_config(str(TOOLKIT / "web_config_rate_limiter_nonblocking.yaml")).rate_limit is None
    san = load_web_config(str(TOOLKIT / "web_config_auth_client_san.good.yaml")).tls_settings
    assert san.client_allowed_sans == ("one", "test3", "two")
    assert san.cert_file == str(TOOLKIT / "server.crt")
    empty = load_web_config(str(TOOLKIT / "web_config_empty.yml"))
    assert not empty.tls and empty.auth is None and dict(empty.headers) == {} and empty.rate_limit is None


def write(tmp_path: Path, text: str, name: str = "web.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def toolkit_certs(tmp_path: Path) -> Path:
    for name in ("server.crt", "server.key", "client_selfsigned.pem"):
        shutil.copy(TOOLKIT / name, tmp_path / name)
    return tmp_path


TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("  min_version: TLS10\n", "min_version: TLS10 is not supported: OpenSSL 3"),
        ("  max_version: TLS11\n", "max_version: TLS11 is not supported"),
        ("  min_version: TLS13\n  max_version: TLS12\n", "min_version TLS13 is above max_version TLS12"),
        ("  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "lists only TLS 1.3 suites"),
        ("  cipher_suites: TLS_AES_128_GCM_SHA256\n", "cipher_suites: expected a list of strings"),
        ("  curve_preferences: [X25519, CurveP256]\n", "curve_preferences: Python's ssl can restrict"),
        ("  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
        ("  client_auth_type: Sometimes\n", "client_auth_type: invalid ClientAuth 'Sometimes'"),
        ("  client_allowed_sans: [prometheus]\n", "client_allowed_sans needs a client_auth_type"),
        ("  prefer_server_cipher_suites: 'no'\n", "prefer_server_cipher_suites: expected true or false"),
        ("  cert: x\n", "set cert or cert_file, not both"),
        ("  key_file: other.key\n", "duplicate key 'key_file'"),
        ("http_server_config:\n  http2: true\n", "http2: true is not supported: this exporter speaks HTTP/1.1"),
        ("http_server_config:\n  http3: false\n", "unknown key 'http_server_config.http3'"),
        ("http_server_config:\n  headers: {x-frame-options: deny}\n", "'x-frame-options' can not be configured"),
        ("http_server_config:\n  headers: {Content-Security-Policy: \"a\\r\\nSet-Cookie: x\"}\n", "one-line string"),
        ("rate_limit: {interval: 5}\n", None),  # a YAML integer is nanoseconds in Go: loads
        ("rate_limit: {interval: 1x}\n", "rate_limit.interval: expected a duration"),
        ("rate_limit: {interval: 1s, burst: -1}\n", "rate_limit.burst: expected a whole number >= 0"),
        ("basic_auth_users: {p: '$2y$03$" + "a" * 53 + "'}\n", "bcrypt cost '03'"),
        ("basic_auth_users: {p: '$2y$10$" + "a" * 53 + "'}\n", "invalid bcrypt salt"),
        ("basic_auth: {}\n", "unknown key 'basic_auth'"),
    ],
)
def test_keys_python_cannot_honour_or_that_could_never_work_are_refused_by_name(tmp_path, extra, message):
    toolkit_certs(tmp_path)
    path = write(tmp_path, TLS + extra)
    if message is None:
        load_web_config(path)
        return
    with pytest.raises(ConfigError) as err:
        load_web_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tls_settings_without_a_certificate_are_refused_not_ignored(tmp_path):
    with pytest.raises(ConfigError, match="tls_server_config sets min_version but no certificate: TLS would be off"):
        load_web_config(write(tmp_path, "tls_server_config:\n  min_version: TLS13\n"))
    assert not load_web_config(write(tmp_path, "tls_server_config: {}\n")).tls


def test_every_client_auth_mode_and_single_curve_and_cipher_order_build_a_context(tmp_path):
    import ssl

    toolkit_certs(tmp_path)
    for mode, verify in [("NoClientCert", ssl.CERT_NONE), ("RequestClientCert", ssl.CERT_OPTIONAL),
                         ("RequireAnyClientCert", ssl.CERT_REQUIRED), ("RequireClientCert", ssl.CERT_REQUIRED),
                         ("VerifyClientCertIfGiven", ssl.CERT_OPTIONAL),
                         ("RequireAndVerifyClientCert", ssl.CERT_REQUIRED)]:
        ca = "  client_ca_file: client_selfsigned.pem\n" if mode != "NoClientCert" else ""
        ctx = load_web_config(write(tmp_path, TLS + f"  client_auth_type: {mode}\n" + ca)).ssl_context()
        assert ctx.verify_mode == verify, mode
    ctx = load_web_config(write(tmp_path, TLS + "  prefer_server_cipher_suites: false\n  cipher_suites:\n"
                                "  - TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384\n  - TLS_AES_128_GCM_SHA256\n")).ssl_context()
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"] == ["ECDHE-RSA-AES256-GCM-SHA384"]


def test_the_cipher_table_names_the_suites_openssl_knows_by_the_same_code():
    """Go's names map to IANA codes by hand; OpenSSL's names come from OpenSSL for those codes."""
    import ssl

    from ollama_exporter.tls_server import TLS12_SUITES

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    probe.set_ciphers("ALL:@SECLEVEL=0")
    by_code = {c["id"] & 0xFFFF: c for c in probe.get_ciphers()}
    for go_name, code in TLS12_SUITES.items():
        description = by_code[code]["description"]
        kx = "ECDH" if "_ECDHE_" in go_name else "RSA"
        auth = "ECDSA" if "_ECDSA_" in go_name else "RSA"
        assert f"Kx={kx} " in description and f"Au={auth} " in description, (go_name, description)
        cipher = go_name.split("_WITH_")[1]
        bits = "256" if "256" in cipher.split("_")[1] else "128"
        if "CHACHA20" in cipher:
            assert "CHACHA20" in description
        else:
            assert f"AES{'GCM' if 'GCM' in cipher else ''}({bits})" in description, (go_name, description)


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    conf.mkdir()
    toolkit_certs(conf)
    write(conf, TLS)
    monkeypatch.chdir(tmp_path)
    settings = load_web_config("etc/web.yml").tls_settings
    assert settings.cert_file == str(conf / "server.crt") and settings.key_file == str(conf / "server.key")


def test_inline_pem_never_touches_the_config_directory(tmp_path):
    cert, key = (TOOLKIT / "server.crt").read_text(), (TOOLKIT / "server.key").read_text()
    indent = lambda text: "".join("    " + line + "\n" for line in text.splitlines())  # noqa: E731
    path = write(tmp_path, f"tls_server_config:\n  cert: |\n{indent(cert)}  key: |\n{indent(key)}")
    web = load_web_config(path)
    assert web.ssl_context() is not None and web.tls_settings.files == ()
    assert "key=" not in repr(web.tls_settings)  # the inline key stays out of logs and tracebacks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.yml"]


@pytest.mark.parametrize("text, seconds", [("1s", 1.0), ("1m30s", 90.0), ("250ms", 0.25), ("1.5h", 5400.0),
                                           ("0", 0.0), (0, 0.0), (5, 5e-9), ("2us", 2e-6), ("1", None),
                                           ("s", None), ("1d", None), ("", None), (True, None)])
def test_rate_limit_intervals_are_go_durations(text, seconds):
    assert parse_go_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_rate_limit_is_a_token_bucket_like_gos():
    now = [0.0]
    bucket = RateLimit(interval=1.0, burst=2, clock=lambda: now[0])
    assert [bucket.allow() for _ in range(3)] == [True, True, False]
    now[0] = 0.5
    assert not bucket.allow()
    now[0] = 1.0
    assert bucket.allow() and not bucket.allow()
    now[0] = 100.0  # refills only up to the burst
    assert [bucket.allow() for _ in range(3)] == [True, True, False]
    assert not RateLimit(interval=1.0, burst=0, clock=lambda: now[0]).allow()  # Go: a zero burst admits nothing
