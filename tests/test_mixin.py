"""The monitoring mixin: one config -> dashboard, rules, Kubernetes objects, and every committed copy of them.

- The committed grafana/, alerts/ and deploy/kubernetes/ files, and the copies the package ships
  (ollama_exporter/assets/), are exactly what the generator makes from the default config.
- A non-default config (alerts/tests/custom-config.mixin.yml) reaches every rule and every query, and its
  rules pass their own promtool unit tests.
- `ollama-exporter mixin build` writes the bundle; a bad config or a missing `mixin` extra is one line
  and exit status 2; the daemon never imports grafana-foundation-sdk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ollama_exporter.mixin import FILES, MixinConfigError, config as mixin_config
from tests import dashboard as dash
from tests.conftest import REPO

CUSTOM = REPO / "alerts" / "tests" / "custom-config.mixin.yml"
CUSTOM_SELECTOR = 'job="gpu-fleet", team="ml"'
ASSETS = REPO / "ollama_exporter" / "assets"
HAND_KEPT = ("systemd/ollama-exporter.service", "systemd/ollama-exporter.env", "examples/mixin.yml")
# a metric name in PromQL (a recording-rule name, a function call or a keyword is not one)
_METRIC = re.compile(r"\b(ollama_[a-z0-9_]+|up)\b(?!\s*\()")

sdk = pytest.importorskip("grafana_foundation_sdk", reason="the mixin extra (Python 3.11+) is not installed")

from ollama_exporter.mixin import bundle  # noqa: E402  (needs the sdk for the dashboard)


@pytest.fixture(scope="module")
def default_bundle() -> dict[str, str]:
    return bundle(mixin_config.default_config())


@pytest.fixture(scope="module")
def custom_bundle() -> dict[str, str]:
    return bundle(mixin_config.load(str(CUSTOM)))


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ollama_exporter", *args], capture_output=True, text=True,
                          timeout=60, env=env)


# ------------------------------------------------------------------------------------------------ drift

@pytest.mark.parametrize("name", FILES)
def test_committed_files_are_the_generators_output(default_bundle, name):
    for copy in (REPO / name, ASSETS / name):
        assert copy.read_text(encoding="utf-8") == default_bundle[name], \
            f"{copy.relative_to(REPO)} differs from the generator's output: run `bash scripts/generate.sh`"


@pytest.mark.parametrize("name", HAND_KEPT)
def test_packaged_copies_of_hand_kept_files(name):
    assert (ASSETS / name).read_bytes() == (REPO / name).read_bytes(), \
        f"ollama_exporter/assets/{name} differs from {name}: run `bash scripts/generate.sh`"


def test_example_config_lists_every_default():
    text = (REPO / "examples" / "mixin.yml").read_text()
    assert mixin_config.load(str(REPO / "examples" / "mixin.yml")) == mixin_config.default_config()
    for key in [*mixin_config.DEFAULTS, *mixin_config.DEFAULTS["thresholds"], *mixin_config.DEFAULTS["alerts"]]:
        assert re.search(rf"^\s*{key}:", text, re.M), f"examples/mixin.yml does not show {key}"


def test_kubernetes_objects_hold_the_rules_and_the_dashboard(default_bundle):
    rule = yaml.safe_load(default_bundle["deploy/kubernetes/prometheusrule.yaml"])
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(default_bundle["alerts/ollama-exporter.rules.yml"])["groups"]
    text = default_bundle["deploy/kubernetes/dashboards-configmap.yaml"]
    cm = yaml.safe_load(text)
    assert (cm["apiVersion"], cm["kind"]) == ("v1", "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["ollama-exporter.json"]) == json.loads(default_bundle["grafana/ollama-exporter.json"])
    # `kubectl apply` copies the object into an annotation limited to 256 KiB
    assert len(text.encode()) < 200_000


# ----------------------------------------------------------------------------------- config reaches all

def rule_exprs(rules_text: str) -> list[tuple[str, str]]:
    groups = yaml.safe_load(rules_text)["groups"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]


def unselected(expr: str, selector: str) -> list[str]:
    """Metric names in `expr` not followed by `{<selector>`."""
    return [m.group(1) for m in _METRIC.finditer(expr) if not expr[m.end():].startswith("{" + selector)]


@pytest.mark.parametrize("which, selector", [("default", 'job="ollama"'), ("custom", CUSTOM_SELECTOR)])
def test_the_selector_reaches_every_rule_and_query(default_bundle, custom_bundle, which, selector):
    files = default_bundle if which == "default" else custom_bundle
    for name, expr in rule_exprs(files["alerts/ollama-exporter.rules.yml"]):
        assert not unselected(expr, selector), (name, expr)
    board = json.loads(files["grafana/ollama-exporter.json"])
    exprs = [e for _, e in dash.raw_queries(board)] + [dash.parse_label_values(q)[0] for q in dash.variable_queries(board)]
    for expr in exprs:
        assert not unselected(expr, selector), expr
    assert len(exprs) > 80


def test_thresholds_are_literals_in_the_alerts(default_bundle, custom_bundle):
    for files, vram, p99 in ((default_bundle, "0.85", "30"), (custom_bundle, "0.9", "5")):
        rules = dict(rule_exprs(files["alerts/ollama-exporter.rules.yml"]))
        assert rules["OllamaGPUMemoryHigh"].endswith(f"> {vram}")
        assert rules["OllamaLatencyP99High"].endswith(f"> {p99}")
        assert not [n for n in rules if n.startswith("ollama:threshold")]  # no threshold recording rules
        board = files["grafana/ollama-exporter.json"]
        assert f"vector({vram})" in board and f"vector({p99})" in board  # the dashed lines agree


def test_custom_config_rules_pass_their_promtool_unit_tests(custom_bundle, promtool, tmp_path):
    (tmp_path / "custom-config.rules.yml").write_text(custom_bundle["alerts/ollama-exporter.rules.yml"])
    shutil.copy(REPO / "alerts" / "tests" / "custom-config.test.yml", tmp_path)
    result = subprocess.run([promtool, "test", "rules", str(tmp_path / "custom-config.test.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    alerts = [name for name, _ in rule_exprs(custom_bundle["alerts/ollama-exporter.rules.yml"])]
    assert "OllamaGPUTemperatureHigh" not in alerts and "OllamaGPULost" in alerts  # disabled in that config


# ------------------------------------------------------------------------------------------ config file

@pytest.mark.parametrize("text, message", [
    ("thresholds: {gpu_memory_ratio: 1.5}", "thresholds.gpu_memory_ratio: 1.5 is not a ratio"),
    ("thresholds: {gpu_memory: 0.9}", "thresholds.gpu_memory: unknown key"),
    ("thresholds: {latency_p99_seconds: fast}", "thresholds.latency_p99_seconds: expected a number"),
    ("alerts: {OllamaDown: {for: soon}}", "alerts.OllamaDown.for: 'soon' is not a Prometheus duration"),
    ("alerts: {OllamaNope: {for: 1m}}", "alerts.OllamaNope: unknown key"),
    ("alerts: {OllamaDown: {enabled: 'no'}}", "alerts.OllamaDown.enabled: expected true or false"),
    ("selector: '{job=\"x\"}'", "selector: '{job=\"x\"}': give the matchers without braces"),
    ("dashboard: {uid: 'has space'}", "dashboard.uid: 'has space' must be"),
    ("- just a list", "the mixin config: expected a mapping"),
    ("thresholds: [", "is not valid YAML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "mixin.yml"
    path.write_text(text)
    with pytest.raises(MixinConfigError) as err:
        mixin_config.load(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_partial_config_keeps_the_other_defaults(tmp_path):
    path = tmp_path / "mixin.yml"
    path.write_text("thresholds: {gpu_memory_ratio: 0.9}\nalerts: {OllamaDown: {severity: page}}\n")
    config, default = mixin_config.load(str(path)), mixin_config.default_config()
    assert config.thresholds == {**default.thresholds, "gpu_memory_ratio": 0.9}
    assert config.alerts["OllamaDown"] == mixin_config.AlertSettings("page", "2m", True)
    assert config.selector == default.selector and config.dashboard_uid == default.dashboard_uid


# -------------------------------------------------------------------------------------------------- CLI

def test_mixin_build_writes_the_bundle_for_a_config(tmp_path, custom_bundle):
    result = run_cli("mixin", "build", "--config", str(CUSTOM), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "out" / name) for name in FILES]
    for name in FILES:
        assert (tmp_path / "out" / name).read_text() == custom_bundle[name]


def test_mixin_build_bad_config_exits_2_in_one_line(tmp_path):
    (tmp_path / "bad.yml").write_text("thresholds: {gpu_memory_ratio: 2}\n")
    result = run_cli("mixin", "build", "--config", str(tmp_path / "bad.yml"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ollama-exporter: error: thresholds.gpu_memory_ratio: 2 is not a ratio between 0 and 1"]
    assert not (tmp_path / "out").exists()


def _fake_sdk(root, version: str = "", broken: bool = False):
    """A grafana_foundation_sdk shadowing the real one: unimportable, or of another Grafana version."""
    pkg = root / "grafana_foundation_sdk"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('not installed')\n" if broken else "")
    if version:
        info = root / f"grafana_foundation_sdk-{version.replace('!', '_')}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: grafana_foundation_sdk\nVersion: {version}\n")
    return {**os.environ, "PYTHONPATH": str(root)}


@pytest.mark.parametrize("fake, expected", [
    (dict(broken=True), "ollama-exporter: error: the mixin needs grafana-foundation-sdk: "
                        "pip install 'ollama-exporter[mixin]' (Python 3.11+)"),
    (dict(version="1769699998!10.1.0"), "ollama-exporter: error: grafana-foundation-sdk 1769699998!10.1.0 builds "
                                        "Grafana 10.1.0 dashboards; the mixin needs a Grafana 11+ build: "
                                        "pip install 'ollama-exporter[mixin]' (Python 3.11+)"),
])
def test_mixin_build_without_the_extra_says_how_to_install_it(tmp_path, fake, expected):
    env = _fake_sdk(tmp_path / "site", **fake)
    result = run_cli("mixin", "build", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()


def test_the_daemon_never_imports_the_dashboard_builders():
    code = textwrap.dedent("""
        import sys
        import ollama_exporter.cli, ollama_exporter.__main__
        loaded = sorted(m for m in sys.modules if m.startswith(("grafana_foundation_sdk", "ollama_exporter.mixin.")))
        print(loaded)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['ollama_exporter.mixin.command', 'ollama_exporter.mixin.config']"


def test_the_readme_rebuild_commands_work(tmp_path, promtool):
    section = (REPO / "README.md").read_text().split("### Your own selectors and thresholds", 1)[1]
    commands = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euc", commands], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    rules = tmp_path / "my-bundle" / "alerts" / "ollama-exporter.rules.yml"
    exprs = dict(rule_exprs(rules.read_text()))
    assert exprs["OllamaGPUMemoryHigh"] == ('ollama_gpu_memory_used_bytes{job="gpu-fleet"} '
                                            '/ ollama_gpu_memory_total_bytes{job="gpu-fleet"} > 0.9')
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
