"""`python -m ollama_exporter.healthcheck`, the container image's HEALTHCHECK, against a real exporter."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from ollama_exporter.healthcheck import check, default_url
from tests.conftest import wait_for
from tests.test_web_security import certs, web_config  # noqa: F401 - certs is a fixture used below


def healthcheck(*args: str, listen: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if listen:
        env["OLLAMA_EXPORTER_WEB_LISTEN_ADDRESS"] = listen
    return subprocess.run([sys.executable, "-m", "ollama_exporter.healthcheck", *args], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("listen, url", [
    (":9778", "http://127.0.0.1:9778/-/healthy"),
    ("0.0.0.0:9100", "http://127.0.0.1:9100/-/healthy"),
    ("[::]:9778", "http://[::1]:9778/-/healthy"),
    ("10.1.2.3:9778", "http://10.1.2.3:9778/-/healthy"),
    ("[::1]:9778", "http://[::1]:9778/-/healthy"),
    ("127.0.0.1:9100,[::1]:9100", "http://127.0.0.1:9100/-/healthy"),  # the env var's list form
])
def test_the_listen_address_becomes_a_loopback_url(listen, url):
    assert default_url(listen) == url


def test_a_running_exporter_is_healthy(fake_ollama, exporter_factory):
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--no-probes.enabled").wait_ready()
    result = healthcheck(listen=f"127.0.0.1:{exp.port}")
    assert (result.returncode, result.stderr) == (0, "")
    exp.stop()
    result = healthcheck(listen=f"127.0.0.1:{exp.port}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"unhealthy: http://127.0.0.1:{exp.port}/-/healthy: ")
    assert "refused" in result.stderr


def test_an_exporter_behind_basic_auth_and_tls_is_alive(fake_ollama, exporter_factory, certs, tmp_path):  # noqa: F811
    plain = exporter_factory("--ollama.url", fake_ollama.url, "--no-probes.enabled", "--web.config.file",
                             str(web_config(tmp_path / "auth.yml", certs, tls=False)))
    tls = exporter_factory("--ollama.url", fake_ollama.url, "--no-probes.enabled", "--web.config.file",
                           str(web_config(tmp_path / "tls.yml", certs)))
    wait_for(lambda: healthcheck(listen=f"127.0.0.1:{plain.port}").returncode == 0, message="401 counts as alive")
    https = f"https://127.0.0.1:{tls.port}/-/healthy"
    wait_for(lambda: healthcheck(https).returncode == 0, message="self-signed TLS listener is alive")
    # plain HTTP to the TLS port is not an answer from /-/healthy
    assert healthcheck(listen=f"127.0.0.1:{tls.port}").returncode == 1


def test_an_error_status_is_unhealthy(fake_ollama, exporter_factory):
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--no-probes.enabled").wait_ready()
    result = healthcheck(f"{exp.url}/no-such-path")
    assert result.returncode == 1
    assert result.stderr.strip() == f"unhealthy: {exp.url}/no-such-path: HTTP 404"


def test_a_bad_listen_address_is_reported_not_raised():
    result = healthcheck(listen="9778")
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: OLLAMA_EXPORTER_WEB_LISTEN_ADDRESS: invalid listen address '9778'")
    assert "Traceback" not in result.stderr


def test_a_hung_listener_fails_within_the_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the connection in the kernel, never answers
        problem = check(f"http://127.0.0.1:{listener.getsockname()[1]}/-/healthy", timeout=0.3)
    assert problem is not None and "timed out" in problem
