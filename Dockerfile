# The ollama-exporter container image: the daemon in a virtualenv on a slim Python base, run as a
# non-root user, writing nothing (it works with a read-only root filesystem and no tmpfs at all).
#
#   scripts/build-image.sh                  # docker or podman; sets the version and revision labels
#   docker run -d -p 9778:9778 -e OLLAMA_HOST=http://ollama-host:11434 ollama-exporter
#
# Named Dockerfile (not Containerfile) because every engine reads it without -f: docker build, podman
# and buildah (which look for Containerfile, then Dockerfile), kaniko, CI build actions, hadolint.
# Podman and buildah keep HEALTHCHECK only in the Docker image format: build with --format docker
# (scripts/build-image.sh does).

# Any Debian-based image with python3 (3.9+) and the venv module. The tests build one from Debian's
# own packages (registries of images are out of their reach) and pass it here.
ARG BASE_IMAGE=docker.io/library/python:3.12-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG VERSION=0.1.0
COPY pyproject.toml README.md /src/
COPY ollama_exporter /src/ollama_exporter
# pip fetches the dependencies from PyPI (or from what /etc/pip.conf names: a mirror, or an offline
# wheelhouse mounted with `podman build -v`, as the tests do). It compiles the installed modules to
# bytecode here, so the read-only image never has to.
# The version label must be the package's: the build stops if the two disagree.
RUN python3 -m venv /opt/ollama-exporter \
 && /opt/ollama-exporter/bin/pip install --no-cache-dir --disable-pip-version-check --no-warn-script-location /src \
 && installed="$(/opt/ollama-exporter/bin/python -c 'import ollama_exporter; print(ollama_exporter.__version__)')" \
 && if [ "$installed" != "$VERSION" ]; then \
      echo "build-arg VERSION=$VERSION but the package is $installed: pass --build-arg VERSION=$installed" >&2; \
      exit 1; \
    fi \
 && /opt/ollama-exporter/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="ollama-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Ollama: models, VRAM, and latency as users feel it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.documentation="/usr/share/ollama-exporter/README.md"

# A fixed numeric id, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --system --gid 10001 -K SYS_GID_MAX=10001 ollama-exporter \
 && useradd --system --uid 10001 --gid 10001 -K SYS_UID_MAX=10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin ollama-exporter

COPY --from=build /opt/ollama-exporter /opt/ollama-exporter
# Compile the standard-library modules the daemon imports (python:*-slim ships them without bytecode),
# so that each start, with nowhere to write, does not compile them again in memory.
RUN /opt/ollama-exporter/bin/python -c 'import importlib, pkgutil, ollama_exporter as p; \
      [importlib.import_module(f"{p.__name__}.{m.name}") for m in pkgutil.iter_modules(p.__path__) if m.name[0] != "_"]'
# The pieces that go around the daemon, for `podman cp` / `docker cp` or an init container:
# the dashboard, the rules, the systemd unit, example configs, the Kubernetes and compose files.
COPY README.md /usr/share/ollama-exporter/
COPY grafana /usr/share/ollama-exporter/grafana
COPY alerts /usr/share/ollama-exporter/alerts
COPY systemd /usr/share/ollama-exporter/systemd
COPY examples /usr/share/ollama-exporter/examples
COPY deploy /usr/share/ollama-exporter/deploy

# PYTHONDONTWRITEBYTECODE: never try to write __pycache__ (the root filesystem may be read-only).
# NVIDIA_DRIVER_CAPABILITIES: with the NVIDIA container toolkit (--gpus, or a GPU in compose or
# Kubernetes) mount only the driver's management library (NVML), which is all the exporter reads.
ENV PATH=/opt/ollama-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=utility

USER 10001:10001
EXPOSE 9778
# Follows OLLAMA_EXPORTER_WEB_LISTEN_ADDRESS; 401 (basic auth on) counts as alive. For TLS, override:
#   --health-cmd 'python3 -m ollama_exporter.healthcheck https://127.0.0.1:9778/-/healthy'
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python3", "-m", "ollama_exporter.healthcheck"]
ENTRYPOINT ["ollama-exporter"]
