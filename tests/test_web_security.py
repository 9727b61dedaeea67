"""TLS and basic auth on /metrics (--web.config.file), with real clients: curl and a real Prometheus."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.conftest import wait_for
from tests.prometheus import Prometheus

PASSWORD = "s3cret-scrape"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=ollama-exporter test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return d


def web_config(path: Path, certs: Path, users: bool = True, tls: bool = True) -> Path:
    config: dict = {}
    if tls:
        config["tls_server_config"] = {"cert_file": str(certs / "server.crt"), "key_file": str(certs / "server.key")}
    if users:
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
        config["basic_auth_users"] = {"prometheus": hashed}  # $2y$ as htpasswd writes it
    path.write_text(yaml.safe_dump(config))
    return path


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                          timeout=30)


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
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "200" and "ollama_up 1.0" in body and "ollama_model_info{" in body


@pytest.mark.parametrize("auth", [["-u", "prometheus:wrong"], ["-u", "nobody:" + PASSWORD], []])
def test_wrong_or_missing_credentials_get_401_and_no_data(secured, certs, auth):
    for path in ("/metrics", "/", "/-/ready"):
        result = curl("--cacert", str(certs / "ca.crt"), *auth, "-D", "-", secured.url + path)
        body, status = result.stdout.rsplit("\n", 1)
        assert status == "401"
        assert 'WWW-Authenticate: Basic realm="ollama-exporter"' in body
        assert "ollama_" not in body and "Ollama Exporter" not in body


def test_plain_http_to_the_tls_port_gets_nothing(secured):
    result = curl(secured.url.replace("https://", "http://") + "/metrics")
    assert "ollama_" not in result.stdout and not result.stdout.endswith("200")


def test_real_prometheus_scrapes_with_basic_auth_and_tls(secured, certs, tmp_path):
    def job(name, password):
        return {"job_name": name, "scheme": "https",
                "basic_auth": {"username": "prometheus", "password": password},
                "tls_config": {"ca_file": str(certs / "ca.crt"), "server_name": "localhost"},
                "static_configs": [{"targets": [f"127.0.0.1:{secured.port}"]}]}

    prom = Prometheus(tmp_path / "prom", [job("ollama", PASSWORD), job("ollama-wrong-password", "nope")])
    try:
        wait_for(lambda: prom.query('up{job="ollama"} == 1'), timeout=30, message="authenticated scrape")
        assert [r["value"][1] for r in prom.query('ollama_up{job="ollama"}')] == ["1"]
        wait_for(lambda: prom.query('up{job="ollama-wrong-password"} == 0'), timeout=30, message="refused scrape")
        target = next(t for t in prom.targets() if t["labels"]["job"] == "ollama-wrong-password")
        assert "401" in target["lastError"]
        assert prom.query('ollama_up{job="ollama-wrong-password"}') == []
    finally:
        prom.stop()


def test_basic_auth_without_tls(fake_ollama, exporter_factory, certs, tmp_path):
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--no-probes.enabled", "--web.config.file",
                           str(web_config(tmp_path / "web.yml", certs, tls=False)))
    wait_for(lambda: curl("-u", f"prometheus:{PASSWORD}", exp.url + "/-/ready").stdout.endswith("200"),
             message="ready")
    assert curl(exp.url + "/metrics").stdout.endswith("401")


@pytest.mark.parametrize(
    "content, message",
    [
        ("basic_auth_users:\n  prometheus: hunter2\n", "basic_auth_users.prometheus: expected a bcrypt hash"),
        ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n",
         "cannot load TLS certificate or key (/nonexistent.crt, /nonexistent.key)"),
        ("tls_server_config:\n  cert_file: /a.crt\n", "tls_server_config needs both cert_file and key_file"),
        ("tls_server_config:\n  certfile: x\n", "unknown key 'tls_server_config.certfile'"),
        ("basic_auth: {}\n", "unknown key 'basic_auth'"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS9\n", "min_version 'TLS9'"),
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
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        load_web_config(str(example))
    data = yaml.safe_load(example.read_text())
    del data["tls_server_config"]
    (tmp_path / "auth-only.yml").write_text(yaml.safe_dump(data))
    assert list(load_web_config(str(tmp_path / "auth-only.yml")).users) == ["prometheus"]
