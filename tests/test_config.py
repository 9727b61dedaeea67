"""Configuration: defaults, OLLAMA_HOST as Ollama reads it, file < flag precedence, and clear exit-2 errors."""

from __future__ import annotations

import os
from dataclasses import replace
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
        web_listen_address=(":9778",), log_level="info")


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
    env = env if env is not None else {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_EXPORTER_", "OLLAMA_HOST"))}
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
        ("", ["--probes.forwarded-for", "probes.local"],
         "probes.forwarded_for: invalid value 'probes.local': expected an IP address"),
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


# --- environment variables, lists, bounds, file faults (issues 8 and 9) ---

def test_every_flag_has_an_environment_variable_named_after_it():
    from ollama_exporter.config import KEYS, env_name, flag_name

    for key in KEYS:
        if key.file_only:
            continue
        expected = "OLLAMA_EXPORTER_" + flag_name(key)[2:].upper().replace(".", "_").replace("-", "_")
        assert env_name(key) == expected
    assert env_name(KEYS[0]) == "OLLAMA_EXPORTER_OLLAMA_URL"


def test_precedence_flag_over_env_over_file_over_ollama_host(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("ollama:\n  url: http://from-file:1\npoll:\n  interval: 10s\nlog:\n  level: debug\n")
    env = {"OLLAMA_HOST": "from-host:2", "OLLAMA_EXPORTER_OLLAMA_URL": "http://from-env:4",
           "OLLAMA_EXPORTER_POLL_INTERVAL": "20s"}
    merged = build_config(str(cfg), {"ollama.url": "http://from-flag:3"}, environ=env)
    assert merged.ollama_url == "http://from-flag:3"  # flag beats env
    assert merged.poll_interval == 20.0  # env beats file
    assert merged.log_level == "debug"  # the file's value where nothing overrides it
    assert build_config(str(cfg), {}, environ=env).ollama_url == "http://from-env:4"
    assert build_config(None, {}, environ={"OLLAMA_HOST": "from-host:2"}).ollama_url == "http://from-host:2"


def test_a_bad_environment_variable_is_named(tmp_path):
    result = run_cli("--once", env={"PATH": "/usr/bin:/bin", "OLLAMA_EXPORTER_POLL_INTERVAL": "soon"})
    assert result.returncode == 2
    assert "poll.interval (from OLLAMA_EXPORTER_POLL_INTERVAL): invalid duration 'soon'" in result.stderr


def test_listen_address_is_repeatable_in_flags_env_and_file(tmp_path):
    assert build_config(None, {"web.listen_address": ("127.0.0.1:1", "[::1]:2")}, environ={}).web_listen_address \
        == ("127.0.0.1:1", "[::1]:2")
    env = {"OLLAMA_EXPORTER_WEB_LISTEN_ADDRESS": "127.0.0.1:1, [::1]:2"}
    assert build_config(None, {}, environ=env).web_listen_address == ("127.0.0.1:1", "[::1]:2")
    cfg = tmp_path / "c.yml"
    cfg.write_text("web:\n  listen_address: ['127.0.0.1:5', ':6']\n")
    assert build_config(str(cfg), {}, environ={}).listen == [("127.0.0.1", 5), ("", 6)]


@pytest.mark.parametrize("key, value, message", [
    ("poll.interval", "99999999999y", "out of range: expected 100ms to 1h"),
    ("poll.interval", "10ms", "out of range"),
    ("ollama.timeout", "1d", "out of range: expected 10ms to 10m"),
    ("probes.interval", "400d", "out of range"),
    ("web.telemetry_path", "metrics", "invalid path"),
    ("web.telemetry_path", "/-/ready", "invalid path"),
    ("ollama.max_models", "0", "expected a whole number from 1 to 100000"),
])
def test_values_are_bounded(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, {key: value}, environ={})


def test_config_file_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"ollama:\n  url: http://caf\xe9:1\n")
    result = run_cli("--config.file", str(path), "--once")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"ollama-exporter: error: config file {path}: not valid UTF-8 (line 2, byte 25)"


@pytest.mark.parametrize("make", ["fifo", "directory"])
def test_a_config_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path, make):
    import os

    path = tmp_path / "config.yml"
    os.mkfifo(path) if make == "fifo" else path.mkdir()
    result = run_cli("--config.file", str(path), "--once")  # a FIFO would block a reader forever
    assert result.returncode == 2
    assert result.stderr.strip() == f"ollama-exporter: error: config file {path}: not a regular file"


def test_config_file_from_the_environment(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("poll:\n  interval: 7s\n")
    result = run_cli("--config.check", env={"PATH": "/usr/bin:/bin", "OLLAMA_EXPORTER_CONFIG_FILE": str(path)})
    assert result.returncode == 0 and "every 7s" in result.stdout


def test_config_check_validates_and_exits(tmp_path):
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text("ollama:\n  url: http://user:hunter2@gpu-box:11434\n")
    bad.write_text("poll:\n  interval: never\n")
    ok = run_cli("--config.file", str(good), "--config.check")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("config OK: polling http://user:xxxxx@gpu-box:11434 every 5s")
    assert "hunter2" not in ok.stdout + ok.stderr
    failed = run_cli("--config.file", str(bad), "--config.check")
    assert failed.returncode == 2 and "poll.interval" in failed.stderr and failed.stdout == ""
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  prometheus: plain\n")
    failed = run_cli("--config.file", str(good), "--web.config.file", str(web), "--config.check")
    assert failed.returncode == 2 and "basic_auth_users.prometheus" in failed.stderr


def test_passwords_in_urls_never_appear_in_errors():
    with pytest.raises(ConfigError) as err:
        build_config(None, {"ollama.url": "ftp://admin:hunter2@host"}, environ={})
    assert "hunter2" not in str(err.value) and "xxxxx" in str(err.value)
    with pytest.raises(ConfigError) as err:
        url_from_ollama_host("ftp://admin:hunter2@host")
    assert "hunter2" not in str(err.value)


def test_multi_target_modules_are_validated(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("multi_target:\n  allow: ['http://10.0.*:11434']\n"
                    "  modules:\n    quick: {timeout: 2s, sources: [version, ps]}\n")
    config = build_config(str(path), environ={})
    assert config.multi_target_allow == ("http://10.0.*:11434",)
    assert config.module("quick").sources == ("version", "ps") and config.module("quick").timeout == 2
    assert config.module("default") is not None
    for text, message in [("  modules:\n    q: {sources: [gpu]}\n", "unknown source 'gpu'"),
                          ("  modules:\n    q: {tiemout: 2s}\n", "unknown key 'tiemout'"),
                          ("  allow: ['10.0.0.1:11434']\n", "must start with http:// or https://")]:
        path.write_text("multi_target:\n" + text)
        with pytest.raises(ConfigError, match=message):
            build_config(str(path), environ={})


def test_group_options_apply_to_the_subcommand(fake_ollama):
    """`ollama-exporter --ollama.url X probe` used to ignore X and probe 127.0.0.1:11434."""
    fake_ollama.add_model("qwen3:8b")
    fake_ollama.load("qwen3:8b", keep_alive=-1)
    result = run_cli("--ollama.url", fake_ollama.url, "probe", "--count", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "qwen3:8b" in result.stdout and fake_ollama.count("/api/generate") == 1
    # the subcommand's own flag wins over the group's
    result = run_cli("--ollama.url", "http://127.0.0.1:9", "probe", "--ollama.url", fake_ollama.url)
    assert result.returncode == 0 and fake_ollama.count("/api/generate") == 2


# --- hostile config files: each is refused with one line, at once, without reading or walking it all ---

def alias_bomb(prefix: str, indent: int) -> str:
    """A "billion laughs": nine levels of nine aliases, 9**9 strings once expanded, in 600 bytes."""
    pad = " " * indent
    lines = [prefix, f'{pad}- &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{pad}- &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("flag, text, message", [
    ("--config.file", alias_bomb("probes:\n  models:", 4), "more than 100000 values once YAML aliases are expanded"),
    ("--config.file", alias_bomb("multi_target:\n  modules:\n    m:\n      sources:", 8), "more than 100000 values"),
    ("--web.config.file", alias_bomb("http_server_config:\n  headers:\n    X-Frame-Options:", 6), "more than 100000"),
    ("--config.file", "poll: " + "[" * 50_000 + "]" * 50_000 + "\n", "invalid YAML: nested too deeply"),
    ("--web.config.file", "basic_auth_users: " + "{a: " * 50_000 + "}" * 50_000 + "\n", "nested too deeply"),
    ("--config.file", "probes:\n  models: &a [*a]\n", "more than 100000 values"),  # an alias inside itself
    ("--config.file", "# padding\n" * 300_000, "larger than 1048576 bytes"),  # 3 MB
    ("--web.config.file", "# padding\n" * 300_000, "larger than 1048576 bytes"),
])
def test_hostile_config_files_are_one_line_exit_2_and_quick(tmp_path, flag, text, message):
    """An alias bomb in a known key used to run for ever (its value printed in the error), deep nesting
    printed a RecursionError traceback, and the web config file was read whole whatever its size."""
    import time

    path = tmp_path / "hostile.yml"
    path.write_text(text)
    started = time.monotonic()
    result = run_cli(flag, str(path), "--config.check")
    assert time.monotonic() - started < 10
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], lines


def test_aliases_of_a_sane_size_still_work(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("multi_target:\n  modules:\n    a: &quick {timeout: 2s, sources: [version, ps]}\n    b: *quick\n")
    config = build_config(str(path), environ={})
    assert config.module("a") == replace(config.module("b"), name="a")


@pytest.mark.parametrize("what", ["web config", "certificate"])
def test_a_fifo_as_a_web_config_or_certificate_file_is_refused_without_reading(tmp_path, what):
    """open() of a FIFO blocks until someone writes to it: the exporter used to hang at start or reload."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if what == "web config":
        web = fifo
    else:
        web = tmp_path / "web.yml"
        web.write_text(f"tls_server_config:\n  cert_file: {fifo}\n  key_file: {fifo}\n")
    result = run_cli("--web.config.file", str(web), "--config.check")  # run_cli gives up after 30 s
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"{fifo}: not a regular file"), result.stderr
