#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it. .ci/run calls this same script.
#   - Debian's `prometheus` package: promtool and a real Prometheus server for the end-to-end tests
#   - Debian's `prometheus-alertmanager`: a real Alertmanager for the alerting end-to-end test
#   - openssl and curl: test certificates and a real HTTPS client for the TLS/basic-auth tests
#   - Debian's `systemd`: systemd-analyze verify/security for the shipped unit (and libseccomp)
#   - a C compiler (the fake NVML driver library is built by the tests)
#   - podman with runc, and mmdebstrap: the container image is built and run by the tests, on a base
#     made from Debian's packages (image registries are out of reach)
#   - a virtualenv in .venv with the package and its test extra
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k config`).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v podman >/dev/null && command -v runc >/dev/null || need+=(podman runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "scripts/test.sh: installing Debian packages: ${need[*]}"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
         --no-install-recommends "${need[@]}" >/dev/null; }; then
    echo "scripts/test.sh: could not install ${need[*]}; tests that need them will be skipped" >&2
    [ -z "${CI:-}" ] || exit 1
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
