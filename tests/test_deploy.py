"""The Kubernetes manifests and the compose file, checked offline the way a cluster and Compose would.

- Built-in kinds against the Kubernetes API's own schemas (the pinned `kubernetes-validate`, strict:
  an unknown field fails) for the oldest and newest Kubernetes versions we claim.
- Prometheus Operator objects against the CRDs' OpenAPI schemas vendored in tests/schemas (strict too,
  as the API server's field validation is).
- The PrometheusRule's groups through `promtool check rules`.
- `kubectl kustomize` renders the base and every overlay, and the output passes the same checks.
- compose.yaml against the Compose Specification's JSON schema.
Plus what no schema knows: selectors that select, ports that exist, the security context, the
hard-coded fleet Service address, the image tag, job="ollama" (what the alerts select).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

import ollama_exporter
from ollama_exporter import config as exporter_config
from tests.conftest import REPO

KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = REPO / "deploy" / "kubernetes-overlays"
SIDECAR_PATCH = KUBE / "sidecar" / "ollama-sidecar-patch.yaml"
SCHEMAS = REPO / "tests" / "schemas"
# The oldest Kubernetes release still maintained upstream when this was written, and the newest the
# pinned kubernetes-validate ships.
K8S_VERSIONS = ("1.31", "1.37")
JOB = "ollama"  # the mixin's default selector is job="ollama"
IMAGE = f"ollama-exporter:{ollama_exporter.__version__}"
WORKLOADS = ("DaemonSet", "Deployment", "StatefulSet")


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def source_objects() -> list[tuple[str, dict]]:
    """Every Kubernetes object in deploy/ as written (not kustomization files, not the sidecar patch)."""
    out = []
    for path in sorted([*KUBE.rglob("*.yaml"), *OVERLAYS.rglob("*.yaml")]):
        if path.name == "kustomization.yaml" or path == SIDECAR_PATCH:
            continue
        out += [(str(path.relative_to(REPO)), doc) for doc in load_all(path)]
    return out


def sidecar_pod() -> dict:
    """An Ollama Deployment as Ollama's charts make it, with the sidecar patch merged the way kubectl
    patch (strategic merge) merges it: containers are merged by name, so ours is appended."""
    patch = yaml.safe_load(SIDECAR_PATCH.read_text())
    labels = {"app.kubernetes.io/name": "ollama"}
    ollama = {"name": "ollama", "image": "ollama/ollama", "ports": [{"name": "http", "containerPort": 11434}]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ollama"},
            "spec": {"selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [ollama, *patch["spec"]["template"]["spec"]["containers"]]}}}}


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted((SCHEMAS / "prometheus-operator").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


CRDS = crd_schemas()


def validate(doc: dict, version: str) -> None:
    """Raise with the object's kind, name and the first error if it would not be accepted."""
    key = (doc["apiVersion"], doc["kind"])
    where = f"{doc['kind']} {doc.get('metadata', {}).get('name')}"
    if key in CRDS:
        try:
            jsonschema.Draft7Validator(CRDS[key]).validate(doc)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} (Kubernetes {version}): {exc.message} at {'/'.join(map(str, exc.path))}")


def pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (with its built-in kustomize) not found: install it to render the manifests")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


# -- schemas -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_accepted_by_the_api_and_the_operator_crds(version):
    objects = source_objects()
    kinds = {doc["kind"] for _, doc in objects}
    assert {"DaemonSet", "Deployment", "Service", "ConfigMap", "ServiceMonitor", "PodMonitor", "Probe",
            "PrometheusRule"} <= kinds
    for _, doc in objects:
        validate(doc, version)
    validate(sidecar_pod(), version)


def test_strict_validation_catches_a_misspelt_field():
    # the checks above are only worth something if they can fail
    ds = copy.deepcopy(next(d for _, d in source_objects() if d["kind"] == "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(pytest.fail.Exception, match="readOnlyRootFileSystem"):
        validate(ds, K8S_VERSIONS[-1])
    sm = copy.deepcopy(next(d for _, d in source_objects() if d["kind"] == "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["relabellings"] = []
    with pytest.raises(pytest.fail.Exception, match="relabellings"):
        validate(sm, K8S_VERSIONS[-1])


def test_the_kustomization_lists_every_manifest_in_its_folder():
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {"prometheusrule.yaml", "dashboards-configmap.yaml"} <= set(listed)  # the mixin's output


@pytest.mark.parametrize("directory", [KUBE, *sorted(OVERLAYS.iterdir()), KUBE / "sidecar"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_kustomize_renders_objects_the_api_accepts(directory):
    docs = kustomize(directory)
    assert docs
    for doc in docs:
        for version in K8S_VERSIONS:
            validate(doc, version)
    if directory != KUBE / "sidecar":
        assert {d["metadata"].get("namespace") for d in docs} == {"monitoring"}
        assert {c["image"] for _, spec in pod_specs(docs) for c in spec["containers"]} == {IMAGE}
    host_pid = {name: spec.get("hostPID", False) for name, spec in pod_specs(docs)}
    if directory.name == "gpu-attribution":
        assert host_pid == {"ollama-exporter": True, "ollama-exporter-fleet": False}
    else:
        assert not any(host_pid.values())


# -- what the schemas do not know ----------------------------------------------------------------

def base_objects() -> list[dict]:
    return [doc for path, doc in source_objects() if Path(path).parent == KUBE.relative_to(REPO)]


def test_pods_run_locked_down_with_probes_and_resources():
    specs = list(pod_specs(base_objects())) + list(pod_specs([sidecar_pod()]))
    assert {name for name, _ in specs} == {"ollama-exporter", "ollama-exporter-fleet", "ollama"}
    for name, spec in specs:
        assert not any(spec.get(k) for k in ("hostPID", "hostNetwork", "hostIPC")), name
        for c in spec["containers"]:
            if c["name"] != "ollama-exporter":
                continue  # Ollama's own container in the sidecar example
            ctx = {**spec.get("securityContext", {}), **c["securityContext"]}
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001, name
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"] == {"drop": ["ALL"]} and not ctx.get("privileged"), name
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], name
            ports = {p["name"] for p in c["ports"]}
            assert c["livenessProbe"]["httpGet"]["path"] == "/-/healthy", name
            for probe in ("livenessProbe", "readinessProbe"):
                assert c[probe]["httpGet"]["port"] in ports, (name, probe)
            assert c["image"] == IMAGE, name
            names = [e["name"] for e in c.get("env", [])]
            for i, e in enumerate(c.get("env", [])):  # $(VAR) only expands variables defined before it
                for ref in names[i:]:
                    assert f"$({ref})" not in e.get("value", ""), (name, e)


def test_images_and_the_kustomization_use_the_package_version():
    images = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["images"]
    assert images == [{"name": "ollama-exporter", "newName": "ollama-exporter", "newTag": ollama_exporter.__version__}]
    compose = yaml.safe_load((REPO / "deploy" / "compose" / "compose.yaml").read_text())
    assert compose["services"]["ollama-exporter"]["image"] == IMAGE


def test_services_and_monitors_select_what_exists():
    docs = base_objects()
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in WORKLOADS}
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = by_kind(docs, "Service")
    for svc in services:
        selected = [n for n, t in pods.items() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert len(selected) == 1, svc["metadata"]["name"]
        container_ports = {p["name"] for c in pods[selected[0]]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    node_sm = next(d for d in by_kind(docs, "ServiceMonitor") if d["metadata"]["name"] == "ollama-exporter")
    svc = [s for s in services if node_sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in svc] == ["ollama-exporter"]
    assert {e["port"] for e in node_sm["spec"]["endpoints"]} <= {p["name"] for p in svc[0]["spec"]["ports"]}
    pod_monitor = by_kind(load_all(KUBE / "sidecar" / "podmonitor.yaml"), "PodMonitor")[0]
    sidecar = sidecar_pod()["spec"]["template"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= sidecar["metadata"]["labels"].items()
    sidecar_ports = {p["name"] for c in sidecar["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= sidecar_ports


def relabel_sets(endpoint: dict) -> dict[str, str]:
    return {r["targetLabel"]: r.get("replacement") or ",".join(r.get("sourceLabels", []))
            for r in endpoint.get("relabelings", [])}


def test_every_scrape_is_job_ollama_as_the_alerts_select():
    objects = [d for _, d in source_objects()]
    endpoints = [e for d in by_kind(objects, "ServiceMonitor") for e in d["spec"]["endpoints"]]
    endpoints += [e for d in by_kind(objects, "PodMonitor") for e in d["spec"]["podMetricsEndpoints"]]
    assert endpoints and all(relabel_sets(e).get("job") == JOB for e in endpoints)
    assert all(p["spec"]["jobName"] == JOB for p in by_kind(objects, "Probe"))
    rules = by_kind(load_all(KUBE / "prometheusrule.yaml"), "PrometheusRule")[0]["spec"]["groups"]
    exprs = [str(r["expr"]) for g in rules for r in g["rules"]]
    if exprs:  # the mixin's generated rules select the same job
        assert any(f'job="{JOB}"' in e for e in exprs)


def fleet_address() -> str:
    namespace = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["namespace"]
    svc = load_all(KUBE / "fleet-service.yaml")[0]
    return f"{svc['metadata']['name']}.{namespace}.svc:{svc['spec']['ports'][0]['port']}"


def test_multi_target_scrapes_go_to_the_fleet_service_with_the_target_as_instance():
    sm = load_all(KUBE / "fleet-servicemonitor.yaml")[0]
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["path"] == "/probe" and endpoint["params"] == {"module": ["default"]}
    assert "default" in fleet_config(KUBE / "fleet-configmap.yaml")["multi_target"]["modules"]
    chain = [(r.get("sourceLabels"), r["targetLabel"], r.get("replacement")) for r in endpoint["relabelings"]]
    assert chain[:3] == [(["__address__"], "__param_target", None), (["__param_target"], "instance", None),
                         (None, "__address__", fleet_address())]
    probe = load_all(OVERLAYS / "static-targets" / "probe.yaml")[0]
    assert probe["spec"]["prober"] == {"url": fleet_address(), "path": "/probe"}
    modules = fleet_config(OVERLAYS / "static-targets" / "config.yml")["multi_target"]["modules"]
    assert probe["spec"]["module"] in modules


def fleet_config(path: Path) -> dict:
    if path.suffix == ".yml":
        return yaml.safe_load(path.read_text())
    return yaml.safe_load(load_all(path)[0]["data"]["config.yml"])


@pytest.mark.parametrize("path", [KUBE / "fleet-configmap.yaml", OVERLAYS / "static-targets" / "config.yml"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_fleet_configs_allow_only_ollama_urls_and_load(path, tmp_path):
    cfg = fleet_config(path)
    allow = cfg["multi_target"]["allow"]
    assert allow and all(p.startswith(("http://", "https://")) and p.endswith(":11434") for p in allow)
    assert cfg["gpu"]["enabled"] is False
    (tmp_path / "config.yml").write_text(yaml.safe_dump(cfg))
    loaded = exporter_config.build_config(str(tmp_path / "config.yml"), environ={})  # as the exporter reads it
    assert loaded.multi_target_allow == tuple(allow) and loaded.module("default").probes is False


def test_static_probe_targets_are_all_allowed():
    probe = load_all(OVERLAYS / "static-targets" / "probe.yaml")[0]
    allow = fleet_config(OVERLAYS / "static-targets" / "config.yml")["multi_target"]["allow"]
    for target in probe["spec"]["targets"]["staticConfig"]["static"]:
        url = target if "://" in target else f"http://{target}"
        assert any(fnmatch.fnmatchcase(url, p) for p in allow), target


def test_prometheus_rule_passes_promtool(promtool, tmp_path):
    rule = by_kind(load_all(KUBE / "prometheusrule.yaml"), "PrometheusRule")[0]
    groups = rule["spec"]["groups"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in result.stdout


def test_dashboard_configmap_is_found_by_grafanas_sidecar():
    cm = load_all(KUBE / "dashboards-configmap.yaml")[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    for name, body in (cm.get("data") or {}).items():
        assert name.endswith(".json") and json.loads(body)["uid"]


# -- compose -------------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification():
    compose_file = REPO / "deploy" / "compose" / "compose.yaml"
    compose = yaml.safe_load(compose_file.read_text())
    schema = json.loads((SCHEMAS / "compose-spec" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    bad = copy.deepcopy(compose)
    bad["services"]["ollama-exporter"]["read_onyl"] = True
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)  # the schema refuses unknown keys

    ollama, exporter = compose["services"]["ollama"], compose["services"]["ollama-exporter"]
    assert (compose_file.parent / exporter["build"] / "Dockerfile").is_file()
    assert exporter["read_only"] is True and exporter["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in exporter["security_opt"]
    assert exporter["pid"] == "host"  # per-model GPU memory attribution
    assert "depends_on" not in exporter  # the exporter reports Ollama down rather than waiting for it
    published = {int(p.split(":")[-1]) for p in ollama["ports"]}
    assert exporter["environment"]["OLLAMA_HOST"] == f"http://ollama:{published.pop()}"
    gpu = exporter["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
