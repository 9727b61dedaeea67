"""The container image, built with the real Dockerfile and scripts/build-image.sh and run with podman.

Image registries are out of reach here, so the base is built from Debian's own packages (mmdebstrap, the
host's release and apt sources) and imported as localhost/ollama-exporter-test-base, then passed in
with the Dockerfile's BASE_IMAGE argument; pip installs the dependencies from a wheelhouse that the
test venv's pip downloads, mounted into the build. Everything else is the Dockerfile as shipped. The
base is kept in podman's store between runs (~30 s to make); the image build takes ~10 s.

Podman runs rootful with `--runtime runc` where runc is installed (crun refuses the hybrid cgroup
v1/v2 layout some hosts have) and with ulimits no higher than this process's own (a container
engine without CAP_SYS_RESOURCE cannot raise them).
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

import ollama_exporter
from tests.conftest import REPO, free_port, sample, wait_for

BASE = "localhost/ollama-exporter-test-base"
IMAGE = "localhost/ollama-exporter:test"
SHARE = "/usr/share/ollama-exporter"
# Files podman itself writes into a container's /etc to set up its network and identity.
ENGINE_FILES = {"/etc", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/run", "/run/.containerenv"}


def os_release() -> dict[str, str]:
    lines = Path("/etc/os-release").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


class Podman:
    """`podman` with the options this host needs; every call bounded in time."""

    def __init__(self) -> None:
        self.binary = shutil.which("podman")
        if not self.binary:
            pytest.skip("podman not found: install Debian's `podman` package (scripts/test.sh does this)")
        self.runtime = ["--runtime", "runc"] if shutil.which("runc") else []
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = min(32768, resource.getrlimit(resource.RLIMIT_NPROC)[1])
        self.ulimits = ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.binary, *self.runtime, *args], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:3])} ... exited {result.returncode}: {result.stderr[-3000:]}")
        return result

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return self("run", *self.ulimits, *args, timeout=timeout, check=check)


def build_base(podman: Podman, tmp: Path) -> str:
    """A minimal Debian of this host's release with python3 and its venv module, as a local image."""
    codename = os_release().get("VERSION_CODENAME", "").strip('"')
    tag = f"{BASE}:{codename or 'unknown'}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    mmdebstrap = shutil.which("mmdebstrap")
    if not mmdebstrap or not codename:
        pytest.skip("mmdebstrap (Debian's `mmdebstrap` package) on a Debian host is needed to make the base image")
    sources = [str(p) for p in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
               if p.is_file() and p.stat().st_size][:1]  # the mirror this host's apt uses
    excluded = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")]
    tarball = tmp / "base.tar"
    result = subprocess.run([mmdebstrap, "--variant=essential", "--include=python3,python3-venv,passwd",
                             *excluded, "--format=tar", codename, str(tarball), *sources],
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        pytest.fail(f"mmdebstrap failed: {result.stderr[-3000:]}")
    podman("import", "--change", 'CMD ["python3"]', str(tarball), tag, timeout=300)
    tarball.unlink()
    return tag


def engine_works(podman: Podman, base: str) -> None:
    result = podman.run("--rm", "--network", "none", base, "true", check=False)
    if result.returncode != 0:
        pytest.skip(f"podman cannot run a container on this host: {result.stderr.strip()[-500:]}")


def wheelhouse(podman: Podman, base: str, tmp: Path) -> Path:
    """The dependencies as wheels for the base's Python, fetched by the test venv's pip."""
    py = podman.run("--rm", "--network", "none", base, "python3", "-c",
                    "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--only-binary=:all:", "--python-version", py, "--dest", str(wheels),
                    "setuptools>=61", "wheel", *deps], check=True, capture_output=True, timeout=300)
    (tmp / "pip.conf").write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    return wheels


def build(podman: Podman, base: str, wheels: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """scripts/build-image.sh, offline: the base from the local store, pip from the wheelhouse."""
    args = ["-t", IMAGE, *podman.runtime, *podman.ulimits, "--pull=never", "--layers=false", "--network", "host",
            "-v", f"{wheels}:/wheels:ro", "-v", f"{wheels.parent / 'pip.conf'}:/etc/pip.conf:ro",
            "--build-arg", f"BASE_IMAGE={base}", *extra]
    result = subprocess.run(["bash", str(REPO / "scripts" / "build-image.sh"), *args], capture_output=True,
                            text=True, timeout=600, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                         "CONTAINER_ENGINE": podman.binary})
    if check and result.returncode != 0:
        pytest.fail(f"image build failed: {result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[tuple[Podman, dict, str, Path]]:
    if platform.system() != "Linux":
        pytest.skip("needs Linux")
    podman = Podman()
    tmp = tmp_path_factory.mktemp("image")
    base = build_base(podman, tmp)
    engine_works(podman, base)
    wheels = wheelhouse(podman, base, tmp)
    started = time.monotonic()
    build(podman, base, wheels)
    print(f"image built in {time.monotonic() - started:.1f} s")
    inspect = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    yield podman, inspect, base, wheels
    podman("rmi", "--force", IMAGE, check=False)


@pytest.fixture
def container(image, ollama_with_models) -> Iterator:
    """Start the image on the host network against the fake Ollama; yields (name, url)."""
    podman = image[0]
    names = []

    def start(*options: str, env: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> tuple[str, str]:
        port = free_port()
        name = f"ollama-exporter-test-{port}"
        names.append(name)
        podman.run("-d", "--name", name, "--network", "host", *options,
                   "-e", f"OLLAMA_HOST={ollama_with_models.url}", "-e", "OLLAMA_EXPORTER_POLL_INTERVAL=500ms",
                   "-e", f"OLLAMA_EXPORTER_WEB_LISTEN_ADDRESS=127.0.0.1:{port}", *[f"-e{e}" for e in env],
                   IMAGE, *flags)
        if flags:
            port = int(flags[0].rpartition(":")[2])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/-/ready", timeout=1).status_code == 200, timeout=30,
                 message=f"container {name} ready ({podman('logs', name, check=False).stderr[-500:]})")
        return name, url

    yield start
    for name in names:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_read_only_non_root_container_serves_metrics_and_stops_on_sigterm(image, container):
    podman = image[0]
    name, url = container("--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
                          "--security-opt", "no-new-privileges")
    # Ready means a first poll was published, not that it reached Ollama: on a busy machine that first
    # poll can time out; the next one (500 ms later) must get through.
    wait_for(lambda: sample(requests.get(url + "/metrics", timeout=5).text, "ollama_up") == 1, timeout=10,
             message=f"ollama_up 1 ({podman('logs', name, check=False).stderr[-500:]})")
    text = requests.get(url + "/metrics", timeout=5).text
    assert sample(text, "ollama_loaded_model_size_bytes", model="qwen3:32b") > 0
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    started = time.monotonic()
    podman("stop", "--time", "10", name)
    assert time.monotonic() - started < 5, "the daemon (PID 1) did not stop on SIGTERM"
    assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"


def test_healthcheck_reports_healthy_and_unhealthy(image, container):
    podman = image[0]
    name, url = container("--read-only", "--read-only-tmpfs=false")
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    assert podman("inspect", name, "--format", "{{.State.Health.Status}}").stdout.strip() == "healthy"
    # the check follows OLLAMA_EXPORTER_WEB_LISTEN_ADDRESS, not the flag: with the daemon moved by the
    # flag, the check asks a port nobody serves, and fails
    other, _ = container("--read-only", flags=(f"--web.listen-address=127.0.0.1:{free_port()}",))
    result = podman("healthcheck", "run", other, check=False)
    assert result.returncode != 0 and "unhealthy" in result.stdout + result.stderr


def test_the_daemon_writes_nothing_and_needs_no_bytecode_compiled_at_run_time(image, container):
    # A writable root with bytecode writing on: any file the daemon wrote, or any module whose bytecode
    # the image lacks (Python would write __pycache__), shows up in `podman diff`.
    podman = image[0]
    name, url = container(env=("PYTHONDONTWRITEBYTECODE=",))
    for _ in range(3):
        assert requests.get(url + "/metrics", timeout=5).status_code == 200
    changes = [line.split(None, 1) for line in podman("diff", name).stdout.splitlines()]
    assert [c for c in changes if c[1] not in ENGINE_FILES] == []


def test_labels_user_healthcheck_and_shipped_files(image):
    podman, inspect, base, _ = image
    config = inspect["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == ollama_exporter.__version__
    assert labels["org.opencontainers.image.title"] == "ollama-exporter"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"] == base
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert labels["org.opencontainers.image.revision"].split("-")[0] == head.stdout.strip()
    assert time.strptime(labels["org.opencontainers.image.created"], "%Y-%m-%dT%H:%M:%SZ")
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["ollama-exporter"]
    health = inspect.get("Healthcheck") or config.get("Healthcheck")
    assert health["Test"] == ["CMD", "python3", "-m", "ollama_exporter.healthcheck"]
    shipped = {"grafana/ollama-exporter.json", "alerts/ollama-exporter.rules.yml", "systemd/ollama-exporter.service",
               "examples/ollama-exporter.yml", "deploy/kubernetes/kustomization.yaml", "deploy/compose/compose.yaml"}
    listing = podman.run("--rm", "--network", "none", "--entrypoint", "sha256sum", IMAGE,
                         *[f"{SHARE}/{f}" for f in sorted(shipped)]).stdout
    in_image = {line.split()[1][len(SHARE) + 1:]: line.split()[0] for line in listing.splitlines()}
    assert in_image == {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest() for f in shipped}
    # the package's own copies too: `ollama-exporter assets` works in the image
    dashboard = podman.run("--rm", "--network", "none", IMAGE, "assets", "dashboard").stdout
    assert json.loads(dashboard) == json.loads((REPO / "grafana" / "ollama-exporter.json").read_text())


def test_the_build_refuses_a_version_label_that_is_not_the_packages(image):
    podman, _, base, wheels = image
    result = build(podman, base, wheels, "--build-arg", "VERSION=9.9.9", check=False)
    assert result.returncode != 0
    assert f"build-arg VERSION=9.9.9 but the package is {ollama_exporter.__version__}" in result.stderr
