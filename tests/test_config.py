"""Configuration: defaults, OLLAMA_HOST as Ollama reads it, file < flag precedence, and clear exit-2 errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ollama_exporter.config import (
    Config,
    ConfigError,
    build_config,
    parse_duration,
    parse_listen_address,
    url_from_ollama_host,
)
from tests.conftest import REPO


def test_zero_config_defaults():
    assert build_config(environ={}) == Config(
        ollama_url="http://127.0.0.1:11434", ollama_timeout=5.0, poll_interval=5.0,
        web_listen_address=":9778", log_level="info")


@pytest.mark.parametrize(
    "value, url",
    [
        ("example.org", "http://example.org:11434"),
        ("example.org:8080", "http://example.org:8080"),
        (":11435", "http://127.0.0.1:11435"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("0.0.0.0:11500", "http://127.0.0.1:11500"),
        ("[::]:11434", "http://[::1]:11434"),
        ("[fd00::5]:9", "http://[fd00::5]:9"),
        ("http://gpu-box:11434", "http://gpu-box:11434"),
        ("http://gpu-box", "http://gpu-box:80"),
        ("https://gpu-box", "https://gpu-box:443"),
        ("https://proxy.example/ollama", "https://proxy.example:443/ollama"),
        ("  10.1.2.3:7  ", "http://10.1.2.3:7"),
    ],
)
def test_ollama_host_is_read_the_way_ollamas_cli_reads_it(value, url):
    assert url_from_ollama_host(value) == url
    assert build_config(environ={"OLLAMA_HOST": value}).ollama_url == url


def test_precedence_flag_over_file_over_ollama_host(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("ollama:\n  url: http://from-file:1\npoll:\n  interval: 10s\n")
    env = {"OLLAMA_HOST": "from-env:2"}
    assert build_config(environ=env).ollama_url == "http://from-env:2"
    assert build_config(str(cfg), environ=env).ollama_url == "http://from-file:1"
    flags = {"ollama.url": "http://from-flag:3", "poll.interval": None}
    merged = build_config(str(cfg), flags, environ=env)
    assert merged.ollama_url == "http://from-flag:3"
    assert merged.poll_interval == 10.0  # not given as a flag: the file's value stays


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("5s", 5), ("1m", 60), ("1h30m", 5400), ("1m500ms", 60.5)])
def test_prometheus_style_durations(text, seconds):
    assert parse_duration("k", text) == seconds


@pytest.mark.parametrize("text", ["5", "5 s", "s", "-5s", "0s", "5sec", "1.5s", "", 5])
def test_bad_durations_are_rejected(text):
    with pytest.raises(ConfigError, match="k: .*duration"):
        parse_duration("k", text)


@pytest.mark.parametrize(
    "value, expected",
    [(":9778", ("", 9778)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:9778", ("::1", 9778)),
     ("[::]:1", ("::", 1)), ("localhost:80", ("localhost", 80))],
)
def test_listen_addresses(value, expected):
    assert parse_listen_address(value) == expected


def test_example_config_is_valid_and_documents_every_key():
    from ollama_exporter.config import KEYS

    example = REPO / "examples" / "ollama-exporter.yml"
    config = build_config(str(example), environ={})
    assert config == Config()  # the example shows the defaults
    text = example.read_text()
    for key in KEYS:
        section, _, name = key.name.partition(".")
        assert f"{section}:" in text and f"{name}:" in text, f"{key.name} missing from {example.name}"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ollama_exporter", *args], capture_output=True, text=True,
                          timeout=30, env=env)


@pytest.mark.parametrize(
    "file_text, flag_args, message",
    [
        ("ollama:\n  urll: http://x\n", [], "unknown key 'ollama.urll'"),
        ("poll:\n  interval: 5\n", [], "poll.interval (in {path}): invalid duration 5"),
        ("poll: [1, 2]\n", [], "config file {path}: 'poll' must be a mapping with the keys poll.interval"),
        ("ollama:\n  url: ftp://x\n", [], "ollama.url (in {path}): invalid URL 'ftp://x': scheme must be http or https"),
        ("ollama:\n  url: http://x:99999\n", [], "ollama.url (in {path}): invalid URL"),
        ("log:\n  level: loud\n", [], "log.level (in {path}): invalid value 'loud': expected one of"),
        ("web:\n  listen_address: 9778\n", [], "web.listen_address (in {path}): expected an address"),
        ("ollama: {url: [\n", [], "config file {path}: invalid YAML at line"),
        ("- a\n- b\n", [], "config file {path}: expected a mapping"),
        ("", ["--ollama.timeout", "fast"], "ollama.timeout: invalid duration 'fast'"),
        ("", ["--web.listen-address", "::1:9"], "web.listen_address: IPv6 addresses must be bracketed"),
    ],
)
def test_bad_config_exits_2_with_one_clear_line(tmp_path, file_text, flag_args, message):
    path = tmp_path / "bad.yml"
    path.write_text(file_text)
    result = run_cli("--config.file", str(path), *flag_args, "--once")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message.format(path=path) in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_unreadable_config_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yml"
    result = run_cli("--config.file", str(missing), "--once")
    assert result.returncode == 2
    assert result.stderr.strip() == f"ollama-exporter: error: config file {missing}: cannot read: No such file or directory"


def test_bad_ollama_host_is_named(tmp_path):
    result = run_cli("--once", env={"OLLAMA_HOST": "ftp://x", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "OLLAMA_HOST: invalid value 'ftp://x'" in result.stderr


def test_version_flag():
    from ollama_exporter import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout
