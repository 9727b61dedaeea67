#!/usr/bin/env bash
# Run the test suite on every CPython from pyproject.toml's requires-python floor up that this machine
# has (python3.X on PATH, or a pyenv-installed version), each in its own virtualenv .venv-3.X. This is
# what backs the Python versions pyproject.toml claims; CI runs only scripts/test.sh on the one Python
# it has. Run scripts/test.sh once first: it installs the Debian tools the tests use.
# Extra arguments go to pytest (e.g. `bash scripts/test-pythons.sh -q -x`).
set -uo pipefail
cd "$(dirname "$0")/.."

floor="$(sed -n 's/^requires-python = ">=3\.\([0-9]*\)"$/\1/p' pyproject.toml)"
pyenv_root="$(command -v pyenv >/dev/null && pyenv root 2>/dev/null || true)"
results=()
status=0
for minor in $(seq "${floor:?no requires-python floor in pyproject.toml}" 14); do
  python="$(command -v "python3.$minor" || true)"
  if [ -n "$pyenv_root" ]; then  # pyenv's shims may not resolve a version not selected: ask directly
    for dir in "$pyenv_root"/versions/3."$minor".*; do
      [ -x "$dir/bin/python3.$minor" ] && python="$dir/bin/python3.$minor"
    done
  fi
  [ -n "$python" ] || continue
  venv=".venv-3.$minor"
  if ! { [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"; } ||
     ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'; then
    results+=("3.$minor: could not install"); status=1; continue
  fi
  if "$venv/bin/python" -m pytest -p no:cacheprovider "$@"; then
    results+=("3.$minor ($("$venv/bin/python" -V 2>&1)): passed")
  else
    results+=("3.$minor ($("$venv/bin/python" -V 2>&1)): FAILED"); status=1
  fi
done
printf '%s\n' "${results[@]:-no CPython 3.$floor+ found}"
exit $status
