"""SIGHUP and POST /-/reload re-read the configuration files, as blackbox_exporter does; a bad file keeps
the running configuration and says why."""

from __future__ import annotations

import signal

import bcrypt
import requests
import yaml

from tests.conftest import free_port, sample, wait_for


def write(path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data))


def test_sighup_reloads_instead_of_killing(fake_ollama, exporter_factory, tmp_path):
    config = tmp_path / "config.yml"
    write(config, {"ollama": {"url": fake_ollama.url}, "poll": {"interval": "200ms"}})
    exp = exporter_factory("--config.file", str(config)).wait_ready()
    first = sample(exp.metrics(), "ollama_exporter_config_last_reload_success_timestamp_seconds")
    assert sample(exp.metrics(), "ollama_exporter_config_last_reload_successful") == 1

    write(config, {"ollama": {"url": fake_ollama.url}, "poll": {"interval": "200ms"},
                   "web": {"telemetry_path": "/custom"}})
    exp.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: requests.get(exp.url + "/custom", timeout=1).status_code == 200, message="the new path")
    assert exp.proc.poll() is None  # SIGHUP used to end it with status 129
    assert requests.get(exp.url + "/metrics", timeout=1).status_code == 404
    text = requests.get(exp.url + "/custom", timeout=1).text
    assert sample(text, "ollama_exporter_config_last_reload_successful") == 1
    assert sample(text, "ollama_exporter_config_last_reload_success_timestamp_seconds") > first
    assert any(r["msg"] == "configuration reloaded" for r in exp.log_records())


def test_a_bad_file_keeps_the_running_config_and_says_why(fake_ollama, exporter_factory, tmp_path):
    config = tmp_path / "config.yml"
    write(config, {"ollama": {"url": fake_ollama.url}, "poll": {"interval": "200ms"}})
    exp = exporter_factory("--config.file", str(config)).wait_ready()
    config.write_text("poll:\n  interval: sometimes\n")
    resp = requests.post(exp.url + "/-/reload", timeout=5)
    assert resp.status_code == 500 and "poll.interval" in resp.text and "sometimes" in resp.text
    text = wait_for(lambda: (t := exp.metrics()) and sample(t, "ollama_exporter_config_last_reload_successful") == 0
                    and t, message="reload failure in the metrics")
    assert sample(text, "ollama_up") == 1  # still polling the same Ollama
    failure = next(r for r in exp.log_records() if r["msg"] == "reload failed, keeping the running configuration")
    assert failure["level"] == "error" and "poll.interval" in failure["error"]

    write(config, {"ollama": {"url": fake_ollama.url}, "poll": {"interval": "300ms"}})
    assert requests.put(exp.url + "/-/reload", timeout=5).status_code == 200
    assert sample(exp.metrics(), "ollama_exporter_config_last_reload_successful") == 1
    assert requests.get(exp.url + "/-/reload", timeout=5).status_code == 405


def test_reload_applies_a_new_web_config_and_ollama_url(fake_ollama, exporter_factory, tmp_path):
    from tests.fakes.ollama import FakeOllama

    config, web = tmp_path / "config.yml", tmp_path / "web.yml"
    write(config, {"ollama": {"url": fake_ollama.url}, "poll": {"interval": "200ms"}})
    exp = exporter_factory("--config.file", str(config)).wait_ready()
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    write(web, {"basic_auth_users": {"prom": hashed}})
    with FakeOllama() as other:
        other.add_model("only-on-the-other:latest")
        write(config, {"ollama": {"url": other.url}, "poll": {"interval": "200ms"},
                       "web": {"config_file": str(web)}})
        assert requests.post(exp.url + "/-/reload", timeout=5).status_code == 200
        assert requests.get(exp.url + "/metrics", timeout=2).status_code == 401
        text = wait_for(lambda: (t := requests.get(exp.url + "/metrics", auth=("prom", "pw"), timeout=2).text)
                        and "only-on-the-other" in t and t, message="metrics from the new URL")
        assert sample(text, "ollama_up") == 1


def test_listen_addresses_need_a_restart_and_say_so(fake_ollama, exporter_factory, tmp_path):
    config = tmp_path / "config.yml"
    port = free_port()
    write(config, {"ollama": {"url": fake_ollama.url}, "web": {"listen_address": [f"127.0.0.1:{port}"]}})
    exp = exporter_factory("--config.file", str(config), listen=False)
    exp.url = f"http://127.0.0.1:{port}"
    exp.wait_ready()
    write(config, {"ollama": {"url": fake_ollama.url}, "web": {"listen_address": [f"127.0.0.1:{free_port()}"]}})
    assert requests.post(exp.url + "/-/reload", timeout=5).status_code == 200
    assert requests.get(exp.url + "/-/healthy", timeout=2).status_code == 200  # still on the old address
    warning = next(r for r in exp.log_records() if r["msg"].startswith("listen addresses change only on restart"))
    assert warning["level"] == "warn" and warning["listen"] == f"127.0.0.1:{port}"
