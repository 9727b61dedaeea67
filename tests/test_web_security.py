"""--web.config.file on the wire, with real clients (curl, openssl s_client, a real Prometheus) against
the real exporter process: TLS, every client_auth_type with openssl-made certificates,
client_allowed_sans, certificate rotation, headers, the rate limit, basic auth, and exporter-toolkit's
own testdata files served as upstream's tests serve them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import bcrypt
import pytest
import yaml

from tests.conftest import Exporter, free_port, wait_for
from tests.prometheus import Prometheus

PASSWORD = "s3cret-scrape"
TOOLKIT = Path(__file__).resolve().parent / "fixtures" / "web-config"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """Made with the openssl CLI: two CAs; a server certificate from each for 127.0.0.1/localhost; client
    certificates from the first CA for `prometheus` and for `intruder`; a self-signed `rogue` one."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    def issue(name: str, ca: str, subject: str, san: str) -> None:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")

    for ca in ("ca", "ca2"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
            "-subj", f"/CN=ollama-exporter test {ca}")
    issue("server", "ca", "/CN=localhost", "IP:127.0.0.1,DNS:localhost")
    issue("server2", "ca2", "/CN=localhost", "IP:127.0.0.1,DNS:localhost")
    issue("client", "ca", "/CN=prometheus", "DNS:prometheus,URI:spiffe://example.org/prometheus")
    issue("intruder", "ca", "/CN=intruder", "DNS:intruder")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt", "-days", "2",
        "-subj", "/CN=rogue", "-addext", "subjectAltName=DNS:prometheus")
    return d


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)  # as htpasswd


def web_config(path: Path, certs: Path, users: bool = True, tls: bool = True, **extra) -> Path:
    config: dict = {}
    if tls:
        config["tls_server_config"] = {"cert_file": str(certs / "server.crt"), "key_file": str(certs / "server.key")}
    if users:
        config["basic_auth_users"] = {"prometheus": hashed(PASSWORD)}
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                          timeout=30)


def status(*args: str) -> str:
    """The HTTP status curl got ("000": no HTTP answer, e.g. the TLS handshake failed)."""
    return curl(*args).stdout.rsplit("\n", 1)[-1]


def s_client(port: int, *args: str) -> subprocess.CompletedProcess:
    """openssl s_client's handshake with the exporter; its output says the protocol and cipher."""
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                           *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def serve(*web_configs: Path) -> list[Exporter]:
    """Exporters (no Ollama behind them) with these web configs, started together, once they accept."""
    if not shutil.which("curl"):
        pytest.skip("curl is needed")
    nowhere = f"http://127.0.0.1:{free_port()}"

    def start(path: Path) -> Exporter:
        return Exporter("--ollama.url", nowhere, "--no-probes.enabled", "--gpu.enabled", "false",
                        "--web.config.file", str(path))

    started = [start(path) for path in web_configs]
    for i, path in enumerate(web_configs):
        for _ in range(3):  # free_port() only finds a port free: another test may take it before we bind
            exp = started[i]

            def accepting(exp=exp) -> bool:
                if exp.proc.poll() is not None:
                    return True
                with socket.create_connection(("127.0.0.1", exp.port), timeout=1):
                    return True
            wait_for(accepting, timeout=15, message="exporter listening")
            if exp.proc.poll() is None or "Address already in use" not in exp.logs():
                break
            exp.stop()
            started[i] = start(path)
        if exp.proc.poll() is not None:
            pytest.fail(f"exporter exited with {exp.proc.returncode}: {exp.logs()}")
        exp.url = f"https://127.0.0.1:{exp.port}"
    return started


def stop_all(started: list[Exporter]) -> None:
    """SIGTERM to all first, then wait: they shut down together."""
    for exp in started:
        if exp.proc.poll() is None:
            exp.proc.terminate()
    for exp in started:
        exp.stop()


@pytest.fixture
def exporters():
    started: list[Exporter] = []

    def start(*web_configs: Path) -> list[Exporter]:
        new = serve(*web_configs)
        started.extend(new)
        return new

    yield start
    stop_all(started)


@pytest.fixture
def secured(fake_ollama, exporter_factory, certs, tmp_path):
    if not shutil.which("curl"):
        pytest.skip("curl is needed")
    fake_ollama.add_model("qwen3:8b")
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--poll.interval", "200ms", "--no-probes.enabled",
                           "--web.config.file", str(web_config(tmp_path / "web.yml", certs)))
    exp.url = exp.url.replace("http://", "https://")
    wait_for(lambda: curl("--cacert", str(certs / "ca.crt"), "-u", f"prometheus:{PASSWORD}",
                          exp.url + "/-/ready").stdout.endswith("200"), message="TLS exporter ready")
    return exp


def test_https_with_the_right_password_serves_metrics(secured, certs):
    result = curl("--cacert", str(certs / "ca.crt"), "-u", f"prometheus:{PASSWORD}", secured.url + "/metrics")
    body, status_code = result.stdout.rsplit("\n", 1)
    assert status_code == "200" and "ollama_up 1.0" in body and "ollama_model_info{" in body


@pytest.mark.parametrize("auth", [["-u", "prometheus:wrong"], ["-u", "nobody:" + PASSWORD], []])
def test_wrong_or_missing_credentials_get_401_and_no_data(secured, certs, auth):
    for path in ("/metrics", "/", "/-/ready"):
        result = curl("--cacert", str(certs / "ca.crt"), *auth, "-D", "-", secured.url + path)
        body, status_code = result.stdout.rsplit("\n", 1)
        assert status_code == "401"
        assert 'WWW-Authenticate: Basic realm="ollama-exporter"' in body
        assert "ollama_" not in body and "Ollama Exporter" not in body


def test_plain_http_to_the_tls_port_gets_nothing(secured):
    result = curl(secured.url.replace("https://", "http://") + "/metrics")
    assert "ollama_" not in result.stdout and not result.stdout.endswith("200")


def test_basic_auth_without_tls(fake_ollama, exporter_factory, certs, tmp_path):
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--no-probes.enabled", "--web.config.file",
                           str(web_config(tmp_path / "web.yml", certs, tls=False)))
    wait_for(lambda: curl("-u", f"prometheus:{PASSWORD}", exp.url + "/-/ready").stdout.endswith("200"),
             message="ready")
    assert curl(exp.url + "/metrics").stdout.endswith("401")


# client_auth_type -> status for (no certificate, a certificate from client_ca_file, a self-signed one)
CLIENT_AUTH = {
    "NoClientCert": ("200", "200", "200"),
    "RequestClientCert": ("200", "200", "200"),
    "RequireAnyClientCert": ("000", "200", "200"),
    "VerifyClientCertIfGiven": ("200", "200", "000"),
    "RequireAndVerifyClientCert": ("000", "200", "000"),
}


def test_every_client_auth_mode_with_real_client_certificates(exporters, certs, tmp_path):
    paths = []
    for mode in CLIENT_AUTH:
        tls = {"client_auth_type": mode, **({"client_ca_file": str(certs / "ca.crt")} if mode != "NoClientCert" else {})}
        paths.append(web_config(tmp_path / f"{mode}.yml", certs, users=False, tls_server_config=tls))
    for mode, exp in zip(CLIENT_AUTH, exporters(*paths)):
        got = tuple(status("--cacert", str(certs / "ca.crt"), *cert, exp.url + "/-/healthy") for cert in (
            [], ["--cert", str(certs / "client.crt"), "--key", str(certs / "client.key")],
            ["--cert", str(certs / "rogue.crt"), "--key", str(certs / "rogue.key")]))
        assert got == CLIENT_AUTH[mode], mode


def test_client_allowed_sans_admits_only_certificates_naming_an_allowed_san(exporters, certs, tmp_path):
    verified = web_config(tmp_path / "dns.yml", certs, users=False, tls_server_config={
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(certs / "ca.crt"),
        "client_allowed_sans": ["prometheus"]})
    uri = web_config(tmp_path / "uri.yml", certs, users=False, tls_server_config={
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(certs / "ca.crt"),
        "client_allowed_sans": ["spiffe://example.org/prometheus"]})
    unverified = web_config(tmp_path / "any.yml", certs, users=False, tls_server_config={
        "client_auth_type": "RequireAnyClientCert", "client_allowed_sans": ["prometheus"]})
    by_dns, by_uri, any_cert = exporters(verified, uri, unverified)

    def get(exp, name):
        return status("--cacert", str(certs / "ca.crt"), "--cert", str(certs / f"{name}.crt"),
                      "--key", str(certs / f"{name}.key"), exp.url + "/-/healthy")

    assert (get(by_dns, "client"), get(by_dns, "intruder")) == ("200", "000")  # both from the trusted CA
    assert (get(by_uri, "client"), get(by_uri, "intruder")) == ("200", "000")
    assert (get(any_cert, "rogue"), get(any_cert, "intruder")) == ("200", "000")  # unverified, as in Go


def test_a_rotated_certificate_is_served_without_a_restart_and_a_bad_one_is_not(exporters, certs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(certs / name, live / name)
    (exp,) = exporters(web_config(tmp_path / "web.yml", live, users=False))
    ca1, ca2 = ["--cacert", str(certs / "ca.crt")], ["--cacert", str(certs / "ca2.crt")]
    assert (status(*ca1, exp.url + "/-/healthy"), status(*ca2, exp.url + "/-/healthy")) == ("200", "000")

    def replace(name: str, source: Path) -> None:  # as cert-manager and certbot do: a new file, renamed
        shutil.copy(source, live / f".{name}.new")
        os.replace(live / f".{name}.new", live / name)

    replace("server.crt", certs / "server2.crt")  # certificate first: with the old key it cannot load...
    assert status(*ca1, exp.url + "/-/healthy") == "200"  # ...so the old pair stays in use
    replace("server.key", certs / "server2.key")
    assert (status(*ca1, exp.url + "/-/healthy"), status(*ca2, exp.url + "/-/healthy")) == ("000", "200")
    (live / "server.crt").write_text("not a certificate\n")
    assert status(*ca2, exp.url + "/-/healthy") == "200"
    messages = [r["msg"] for r in exp.log_records()]
    assert messages.count("TLS certificate reloaded") == 1
    assert messages.count("TLS certificate reload failed, keeping the previous one") == 2


def test_configured_headers_go_on_every_response_and_the_rate_limit_answers_429(exporters, certs, tmp_path):
    headers = {"X-Frame-Options": "deny", "Content-Security-Policy": "default-src 'none'"}
    with_headers = web_config(tmp_path / "headers.yml", certs, tls=False, http_server_config={"headers": headers})
    limited = web_config(tmp_path / "limited.yml", certs, tls=False, users=False,
                         rate_limit={"interval": "1m", "burst": 2})
    plain, slow = exporters(with_headers, limited)
    for url, auth, code in ((plain.url, ["-u", f"prometheus:{PASSWORD}"], "200"), (plain.url, [], "401"),
                            (plain.url + "/nowhere", ["-u", f"prometheus:{PASSWORD}"], "404")):
        result = curl("-D", "-", *auth, url.replace("https://", "http://") + ("/-/healthy" if code != "404" else ""))
        assert result.stdout.endswith(code)
        assert "X-Frame-Options: deny\n" in result.stdout
        assert "Content-Security-Policy: default-src 'none'\n" in result.stdout
    http = slow.url.replace("https://", "http://") + "/-/healthy"
    assert [status(http) for _ in range(3)] == ["200", "200", "429"]


def test_real_prometheus_scrapes_with_mutual_tls_and_basic_auth(fake_ollama, exporter_factory, certs, tmp_path):
    fake_ollama.add_model("qwen3:8b")
    path = web_config(tmp_path / "web.yml", certs, tls_server_config={
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(certs / "ca.crt"),
        "client_allowed_sans": ["prometheus"], "min_version": "TLS12"})
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--poll.interval", "200ms", "--no-probes.enabled",
                           "--web.config.file", str(path))

    def job(name, password, client: Optional[str] = "client"):
        tls = {"ca_file": str(certs / "ca.crt"), "server_name": "localhost"}
        if client:
            tls.update(cert_file=str(certs / f"{client}.crt"), key_file=str(certs / f"{client}.key"))
        return {"job_name": name, "scheme": "https", "tls_config": tls,
                "basic_auth": {"username": "prometheus", "password": password},
                "static_configs": [{"targets": [f"127.0.0.1:{exp.port}"]}]}

    prom = Prometheus(tmp_path / "prom", [job("ollama", PASSWORD), job("wrong-password", "nope"),
                                          job("intruder", PASSWORD, "intruder"), job("no-cert", PASSWORD, None)])
    try:
        wait_for(lambda: prom.query('up{job="ollama"} == 1'), timeout=30, message="authenticated scrape")
        assert [r["value"][1] for r in prom.query('ollama_up{job="ollama"}')] == ["1"]
        for name in ("wrong-password", "intruder", "no-cert"):
            wait_for(lambda: prom.query(f'up{{job="{name}"}} == 0'), timeout=30, message=f"refused scrape {name}")
            assert prom.query(f'ollama_up{{job="{name}"}}') == []
        errors = {t["labels"]["job"]: t["lastError"] for t in prom.targets()}
        assert "401" in errors["wrong-password"]
        assert errors["intruder"] and errors["no-cert"] and "401" not in errors["intruder"] + errors["no-cert"]
    finally:
        prom.stop()


# exporter-toolkit's own files, served from tests/fixtures/web-config (their relative paths resolve
# there), probed as web/tls_config_test.go probes them. Upstream's server certificate chains to a CA
# whose extended key usage OpenSSL's clients refuse, so these clients skip server verification (-k).
CLIENT_SELFSIGNED = ["--cert", str(TOOLKIT / "client_selfsigned.pem"), "--key", str(TOOLKIT / "client_selfsigned.key")]
CLIENT2_SELFSIGNED = ["--cert", str(TOOLKIT / "client2_selfsigned.pem"), "--key", str(TOOLKIT / "client2_selfsigned.key")]
TOOLKIT_SERVED = [
    "web_config_noAuth.good.yml", "web_config_noAuth_tlsInline.good.yml", "web_config_noAuth_someCiphers.good.yml",
    "web_config_noAuth_someCiphers_noOrder.good.yml", "web_config_noAuth_someCurves.good.yml",
    "web_config_noAuth_noHTTP2.good.yml", "web_config_noAuth_allCiphers.good.yml",
    "tls_config_noAuth.requireanyclientcert.good.yml", "tls_config_noAuth.requireanyclientcertkeyinline.good.yml",
    "tls_config_noAuth.requireandverifyclientcert.good.yml", "web_config_auth_client_san.good.yaml",
    "web_config_auth_client_san.bad.yaml", "web_config_headers.good.yml", "web_config_users.good.yml",
    "web_config_users_noTLS.good.yml", "web_config_rate_limiter_one_second.yaml",
    "web_config_rate_limiter_nonblocking.yaml",
]


@pytest.fixture(scope="module")
def toolkit():
    started = serve(*(TOOLKIT / name for name in TOOLKIT_SERVED))
    yield {name: exp for name, exp in zip(TOOLKIT_SERVED, started)}
    stop_all(started)


def handshake(port: int, *args: str) -> Optional[str]:
    """The cipher s_client agreed on, or None if the handshake failed."""
    result = s_client(port, *args)
    for line in result.stdout.splitlines():
        if "Cipher is " in line and "(NONE)" not in line:
            return line.split("Cipher is ", 1)[1].strip()
    return None


def test_toolkit_cipher_suites_and_their_order(toolkit):
    some, no_order = toolkit["web_config_noAuth_someCiphers.good.yml"], toolkit["web_config_noAuth_someCiphers_noOrder.good.yml"]
    both_256_first = ["-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256"]
    assert handshake(some.port, *both_256_first) == "ECDHE-RSA-AES128-GCM-SHA256"  # the server's order wins
    assert handshake(no_order.port, *both_256_first) == "ECDHE-RSA-AES256-GCM-SHA384"  # the client's order wins
    assert handshake(some.port, "-tls1_2", "-cipher", "ECDHE-RSA-AES256-SHA") is None  # no common suite
    assert handshake(toolkit["web_config_noAuth_allCiphers.good.yml"].port, "-tls1_2", "-cipher",
                     "ECDHE-RSA-AES256-SHA") == "ECDHE-RSA-AES256-SHA"


def test_toolkit_versions_and_curves(toolkit):
    good, curves = toolkit["web_config_noAuth.good.yml"], toolkit["web_config_noAuth_someCurves.good.yml"]
    assert handshake(good.port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0") is None  # min_version TLS12
    assert handshake(good.port, "-tls1_2") and handshake(good.port, "-tls1_3")
    assert handshake(toolkit["web_config_noAuth_noHTTP2.good.yml"].port, "-tls1_3") is None  # max_version TLS12
    assert handshake(curves.port, "-groups", "P-521") and handshake(curves.port, "-groups", "P-384") is None


def test_toolkit_client_certificates(toolkit):
    def get(name: str, *cert: str) -> str:
        return status("-k", *cert, toolkit[name].url + "/-/healthy")

    assert get("web_config_noAuth_tlsInline.good.yml") == "200"
    for name in ("tls_config_noAuth.requireanyclientcert.good.yml",
                 "tls_config_noAuth.requireanyclientcertkeyinline.good.yml"):
        assert (get(name), get(name, *CLIENT_SELFSIGNED)) == ("000", "200"), name
    verify = "tls_config_noAuth.requireandverifyclientcert.good.yml"
    assert (get(verify, *CLIENT_SELFSIGNED), get(verify, *CLIENT2_SELFSIGNED)) == ("200", "000")
    assert get("web_config_auth_client_san.good.yaml", *CLIENT2_SELFSIGNED) == "200"
    assert get("web_config_auth_client_san.bad.yaml", *CLIENT2_SELFSIGNED) == "000"


def test_toolkit_users_headers_and_rate_limit(toolkit):
    tls_users = toolkit["web_config_users.good.yml"].url + "/-/healthy"
    for user, code in (("dave:dave123", "200"), ("carol:carol123", "200"), ("dave:bad", "401"),
                       ("nonexistent:nonexistent", "401")):
        assert status("-k", "-u", user, tls_users) == code, user
    assert status("-k", tls_users) == "401"
    plain_users = toolkit["web_config_users_noTLS.good.yml"].url.replace("https://", "http://") + "/-/healthy"
    assert (status("-u", "dave:dave123", plain_users), status(plain_users)) == ("200", "401")
    headers = curl("-D", "-", toolkit["web_config_headers.good.yml"].url.replace("https", "http") + "/-/healthy")
    for line in ("Strict-Transport-Security: max-age=31536000; includeSubDomains", "X-Frame-Options: deny",
                 "X-Content-Type-Options: nosniff", "X-XSS-Protection: 1"):
        assert line + "\n" in headers.stdout
    blocking = toolkit["web_config_rate_limiter_one_second.yaml"].url.replace("https", "http") + "/-/healthy"
    open_url = toolkit["web_config_rate_limiter_nonblocking.yaml"].url.replace("https", "http") + "/-/healthy"
    assert {status(blocking) for _ in range(10)} == {"429"}  # burst 0: Go's limiter admits nothing
    assert {status(open_url) for _ in range(10)} == {"200"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("basic_auth_users:\n  prometheus: hunter2\n", "basic_auth_users.prometheus: expected a bcrypt hash"),
        ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n",
         "tls_server_config.cert_file: cannot read /nonexistent.crt: No such file or directory"),
        ("tls_server_config:\n  cert_file: /a.crt\n", "tls_server_config: missing one of key or key_file"),
        ("tls_server_config:\n  certfile: x\n", "unknown key 'tls_server_config.certfile'"),
        ("basic_auth: {}\n", "unknown key 'basic_auth'"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS9\n", "unknown TLS version 'TLS9'"),
    ],
)
def test_bad_web_config_exits_2_naming_the_problem(tmp_path, content, message):
    path = tmp_path / "web.yml"
    path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "ollama_exporter", "--web.config.file", str(path),
                             "--web.listen-address", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"web config file {path}: " in result.stderr
    assert message in result.stderr, result.stderr


def test_the_example_web_config_is_valid_apart_from_its_certificate_paths(tmp_path):
    from ollama_exporter.config import ConfigError
    from ollama_exporter.webconfig import load_web_config

    example = Path(__file__).resolve().parents[1] / "examples" / "web-config.yml"
    with pytest.raises(ConfigError, match="tls_server_config.cert_file: cannot read /etc/ollama-exporter/tls.crt"):
        load_web_config(str(example))
    data = yaml.safe_load(example.read_text())
    del data["tls_server_config"]
    (tmp_path / "auth-only.yml").write_text(yaml.safe_dump(data))
    assert list(load_web_config(str(tmp_path / "auth-only.yml")).auth.users) == [b"prometheus"]


def test_the_ssl_context_serves_asyncio_with_rotation_and_any_client_certificate(certs, tmp_path):
    """An asyncio server as the exporter's: ssl=web.ssl_context(), then web.verify_peer(ssl_object)."""
    import asyncio
    import threading

    from ollama_exporter.webconfig import load_web_config

    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(certs / name, live / name)
    web = load_web_config(str(web_config(tmp_path / "web.yml", live, users=False, tls_server_config={
        "client_auth_type": "RequireAnyClientCert", "client_allowed_sans": ["prometheus"]})))
    port, ready, stop = free_port(), threading.Event(), threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            web.verify_peer(writer.get_extra_info("ssl_object"))
        except ValueError:
            writer.close()
            return
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nOK\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=web.ssl_context())
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        server.close()
        await server.wait_closed()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    url = f"https://127.0.0.1:{port}/"

    def get(ca: str, client: Optional[str]) -> str:
        cert = ["--cert", str(certs / f"{client}.crt"), "--key", str(certs / f"{client}.key")] if client else []
        return status("--cacert", str(certs / f"{ca}.crt"), *cert, url)

    try:
        assert (get("ca", "rogue"), get("ca", "intruder"), get("ca", None)) == ("200", "000", "000")
        for name in ("server.crt", "server.key"):
            shutil.copy(certs / name.replace("server", "server2"), live / f".{name}")
        for name in ("server.key", "server.crt"):
            os.replace(live / f".{name}", live / name)
        assert (get("ca2", "rogue"), get("ca", "rogue")) == ("200", "000")
    finally:
        stop.set()
        thread.join(10)


def test_no_request_is_answered_before_the_handshake_and_the_peer_check_are_done(exporters, certs, tmp_path):
    """With TLS 1.3 curl sends its request right behind its last handshake flight. Answered before the
    peer check, an intruder's POST /-/reload would run, and the answer would go out unencrypted."""
    path = web_config(tmp_path / "web.yml", certs, users=False, tls_server_config={
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(certs / "ca.crt"),
        "client_allowed_sans": ["prometheus"]})
    (exp,) = exporters(path)
    ca = ["--cacert", str(certs / "ca.crt")]
    for _ in range(5):
        intruder = ["--cert", str(certs / "intruder.crt"), "--key", str(certs / "intruder.key")]
        assert status(*ca, *intruder, "-X", "POST", exp.url + "/-/reload") == "000"
        client = ["--cert", str(certs / "client.crt"), "--key", str(certs / "client.key")]
        assert status(*ca, *client, exp.url + "/-/healthy") == "200"  # unencrypted, curl would say 000
    messages = [r["msg"] for r in exp.log_records()]
    assert "configuration reloaded" not in messages
    assert status(*ca, "--cert", str(certs / "client.crt"), "--key", str(certs / "client.key"), "-X", "POST",
                  exp.url + "/-/reload") == "200"
    assert "configuration reloaded" in [r["msg"] for r in exp.log_records()]


def test_tls_keep_alive_serves_large_bodies_whole_with_basic_auth(certs, tmp_path):
    """Big answers go out over TLS in many records across partial writes, request after request."""
    import base64
    import hashlib
    import ssl
    from dataclasses import replace

    from ollama_exporter.snapshot import InstalledModel, ModelDetails
    from ollama_exporter.webconfig import load_web_config
    from tests.test_metrics import rich_snapshot
    from tests.test_server_unit import App, _read_response, serve_app

    app = App()
    app.web = load_web_config(str(web_config(tmp_path / "web.yml", certs)))
    many = tuple(InstalledModel(f"m{i}:1", hashlib.sha256(b"%d" % i).hexdigest(), i, ModelDetails())
                 for i in range(3000))
    app.exposition.update(replace(rich_snapshot(), installed=many))
    expected = app.exposition.get().data
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    auth = base64.b64encode(f"prometheus:{PASSWORD}".encode())
    with serve_app(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as s:
        left = b""
        for _ in range(3):
            s.sendall(b"GET /metrics HTTP/1.1\r\nAuthorization: Basic " + auth + b"\r\n\r\n")
            head, body, left = _read_response(s, left)
            assert head.startswith(b"HTTP/1.1 200") and body == expected and len(expected) > 500_000
        s.sendall(b"GET /metrics HTTP/1.1\r\nAuthorization: Basic " + base64.b64encode(b"prometheus:no") + b"\r\n\r\n")
        head, _, _ = _read_response(s, left)
        assert head.startswith(b"HTTP/1.1 401")
