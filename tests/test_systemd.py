"""The systemd unit and its EnvironmentFile example (systemd/).

- `systemd-analyze verify` accepts the unit as shipped (only ExecStart's path is pointed at the installed
  console script, since verify checks that the binary exists), and says nothing about it: an unknown or
  misspelt setting is only a warning there, with exit status 0, so any line naming the unit fails.
- `systemd-analyze security --offline=true` rates it at most MAX_EXPOSURE ("OK").
- The unit keeps what the exporter needs: NVIDIA device nodes (no PrivateDevices), other users'
  processes in /proc (Ollama's runners), the network, and the hardening the conventions ask for.
- The example /etc/default/ollama-exporter passes only flags the CLI has, and they start the exporter.
- The exporter runs, GPU metrics and per-model attribution included, under the seccomp filters systemd
  installs for this unit (SystemCallFilter=, MemoryDenyWriteExecute=, RestrictAddressFamilies=,
  NoNewPrivileges=), rebuilt here with libseccomp, since no systemd runs as PID 1 in a test.

`systemd-analyze` works without systemd as PID 1 (it reads unit files offline); scripts/test.sh installs
Debian's `systemd` package for it. Without it these tests skip, saying so.

Not covered here: the mount, device-cgroup and user-namespace settings (they need systemd as PID 1), and
the real driver. Checked by hand on Debian 12: the real libnvidia-ml.so.1 (libnvidia-ml1 535.261.03) has no
TEXTREL and a non-executable GNU_STACK, loads under SANDBOX below and reaches the driver check
(nvmlInit -> DriverNotLoaded on a machine without the kernel module, as outside the sandbox).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import requests

from tests.conftest import BLOBS, REPO, free_port, require_tool, sample, terminate, wait_for
from tests.fakes.nvml import two_gpu_box

UNIT = REPO / "systemd" / "ollama-exporter.service"
ENV_FILE = REPO / "systemd" / "ollama-exporter.env"
SHIPPED_EXEC = "/usr/local/bin/ollama-exporter"
# Measured with systemd 252 (Debian 12): 1.4 "OK". A setting dropped by mistake adds 0.1 to 0.5.
MAX_EXPOSURE = 1.6


# --- helpers ----------------------------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists; keys may repeat (DeviceAllow=...)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: Optional[list[tuple[str, str]]] = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):  # continuation: systemd joins the lines with a space
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            assert current is not None, f"setting outside a section: {line!r}"
            key, sep, value = line.partition("=")
            assert sep, f"not a KEY=value line: {line!r}"
            current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def last(section: list[tuple[str, str]], key: str) -> Optional[str]:
    found = values(section, key)
    return found[-1] if found else None


def list_setting(section: list[tuple[str, str]], key: str) -> list[str]:
    """A list setting's effective value: entries accumulate, an empty assignment resets the list."""
    result: list[str] = []
    for value in values(section, key):
        result = [] if not value else result + value.split()
    return result


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines the way systemd's EnvironmentFile= reads them (comments, optional quotes)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()), f"not KEY=value: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def truthy(value: Optional[str]) -> bool:
    return (value or "").lower() in ("1", "yes", "true", "on")


def console_script() -> Path:
    """The installed `ollama-exporter` entry point (the venv's, even when the venv is not on PATH)."""
    beside = Path(sys.executable).parent / "ollama-exporter"
    if beside.is_file():
        return beside
    found = shutil.which("ollama-exporter")
    if not found:
        pytest.fail("the ollama-exporter console script is not installed: pip install -e . (scripts/test.sh does)")
    return Path(found)


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    return require_tool("systemd-analyze", "systemd")


def installed_copy(tmp_path: Path, text: Optional[str] = None) -> Path:
    """The unit as shipped, in tmp_path, with only ExecStart's binary replaced by the installed script."""
    text = UNIT.read_text() if text is None else text
    new, count = re.subn(rf"^(ExecStart=[-@:+!]*){re.escape(SHIPPED_EXEC)}(?=\s|$)",
                         lambda m: m.group(1) + str(console_script()), text, flags=re.M)
    assert count == 1, f"expected one ExecStart={SHIPPED_EXEC} line in {UNIT}"
    path = tmp_path / UNIT.name
    path.write_text(new)
    return path


def verify(systemd_analyze: str, unit_path: Path) -> subprocess.CompletedProcess:
    # --man=no: Documentation= man pages need not be installed; --generators=no: no generators to run.
    return subprocess.run([systemd_analyze, "verify", "--man=no", "--generators=no", str(unit_path)],
                          capture_output=True, text=True, timeout=60, cwd=unit_path.parent)


# --- systemd-analyze --------------------------------------------------------------------------------

def test_systemd_analyze_verify_accepts_the_unit(systemd_analyze, tmp_path):
    result = verify(systemd_analyze, installed_copy(tmp_path))
    print(f"systemd-analyze verify: exit {result.returncode}\n{result.stdout}{result.stderr}")
    about_us = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stderr
    # Anything verify says about this unit is a finding (unknown key, bad value, missing binary, ...).
    # Lines about other units on the host (their own deprecation warnings) are not ours to fix.
    assert not about_us, "\n".join(about_us)


def test_verify_would_catch_a_misspelt_setting(systemd_analyze, tmp_path):
    """The check above is not vacuous: verify exits 0 on an unknown key, but names the unit."""
    broken = UNIT.read_text().replace("\nProtectSystem=strict\n", "\nProtectSytem=strict\n")
    assert broken != UNIT.read_text()
    result = verify(systemd_analyze, installed_copy(tmp_path, broken))
    assert any(UNIT.name in line and "ProtectSytem" in line for line in result.stderr.splitlines()), result.stderr


def test_systemd_analyze_security_rates_it_ok(systemd_analyze, tmp_path):
    path = installed_copy(tmp_path)
    result = subprocess.run([systemd_analyze, "security", "--offline=true", "--no-pager", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, f"no overall exposure line in:\n{result.stdout}"
    score, rating = float(match.group(1)), match.group(2)
    print(f"exposure {score} {rating}")
    assert score <= MAX_EXPOSURE, f"exposure {score} {rating} is above {MAX_EXPOSURE}: a hardening setting got lost"
    assert rating in ("OK", "SAFE", "PERFECT")

    # What systemd itself reads from the unit, item by item (JSON): the settings we rely on are in force.
    report = subprocess.run([systemd_analyze, "security", "--offline=true", "--json=short", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True)
    items = {item["name"]: item for item in json.loads(report.stdout)}
    for name in ("NoNewPrivileges=", "User=/DynamicUser=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=",
                 "MemoryDenyWriteExecute=", "SystemCallArchitectures=", "RestrictSUIDSGID=", "LockPersonality=",
                 "RestrictRealtime=", "ProtectKernelTunables=", "ProtectKernelModules=", "ProtectKernelLogs=",
                 "ProtectControlGroups=", "ProtectClock=", "ProtectHostname=", "AmbientCapabilities=",
                 "CapabilityBoundingSet=~CAP_SYS_ADMIN", "SystemCallFilter=~@privileged",
                 "SystemCallFilter=~@resources", "RestrictNamespaces=~user", "RestrictAddressFamilies=~AF_NETLINK",
                 "RestrictAddressFamilies=~AF_PACKET", "UMask="):
        assert items[name]["set"], f"systemd does not see {name} as set: {items[name]['description']}"
    # Left open on purpose, and nothing else: devices (NVML), the process tree (runners), the network.
    open_items = sorted(name for name, item in items.items() if not item["set"] and float(item["exposure"] or 0) > 0)
    print("not set:", open_items)
    assert set(open_items) <= {
        "PrivateDevices=", "DeviceAllow=", "ProtectProc=", "ProcSubset=", "PrivateNetwork=", "IPAddressDeny=",
        "RestrictAddressFamilies=~AF_(INET|INET6)", "RestrictAddressFamilies=~AF_UNIX",
        "RootDirectory=/RootImage=",
    }, open_items


# --- the unit's content -----------------------------------------------------------------------------

def test_nvidia_devices_stay_reachable(unit):
    service = unit["Service"]
    assert not truthy(last(service, "PrivateDevices")), "PrivateDevices=yes hides /dev/nvidia* from NVML"
    assert last(service, "DevicePolicy") == "closed"
    allowed: dict[str, str] = {}
    for value in values(service, "DeviceAllow"):
        node, _, access = value.partition(" ")
        allowed[node] = access.strip() or "rwm"

    def grants(nodes: tuple[str, ...], access: str) -> bool:
        return any(node in allowed and set(access) <= set(allowed[node]) for node in nodes)

    # Major 195 (/dev/nvidiactl, /dev/nvidia0..N) is "nvidia-frontend" on older drivers, "nvidia" on current.
    for major_name in ("char-nvidia-frontend", "char-nvidia"):
        assert grants((major_name,), "rw"), f"DeviceAllow={major_name} rw missing"
    assert grants(("/dev/nvidiactl", "char-nvidia", "char-nvidia-frontend"), "rw"), "/dev/nvidiactl"
    assert grants(("/dev/nvidia-uvm", "char-nvidia-uvm"), "rw"), "/dev/nvidia-uvm"
    assert grants(("/dev/nvidia-uvm-tools", "char-nvidia-uvm"), "rw"), "/dev/nvidia-uvm-tools"
    assert grants(("char-nvidia-caps",), "r"), "/dev/nvidia-caps/* (MIG monitoring)"
    assert not any("m" in access for access in allowed.values()), "no mknod: the nodes exist already"


def test_other_users_processes_stay_visible(unit):
    """Runners run as the ollama user; with DynamicUser every other process belongs to another user."""
    service = unit["Service"]
    assert last(service, "ProtectProc") in (None, "default"), "hidepid would hide Ollama's runners"
    assert last(service, "ProcSubset") in (None, "all"), "subset=pid would hide /proc/driver/nvidia"


def test_hardening(unit):
    service = unit["Service"]
    expect_yes = ("DynamicUser", "NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                  "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictRealtime",
                  "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "RestrictNamespaces")
    for key in expect_yes:
        assert truthy(last(service, key)), f"{key}=yes missing"
    assert last(service, "ProtectSystem") == "strict"
    assert last(service, "ProtectHome") in ("yes", "true")
    assert list_setting(service, "CapabilityBoundingSet") == [] and values(service, "CapabilityBoundingSet")
    assert list_setting(service, "AmbientCapabilities") == [] and values(service, "AmbientCapabilities")
    assert last(service, "SystemCallArchitectures") == "native"
    assert values(service, "SystemCallFilter")[0] == "@system-service"
    assert sorted(list_setting(service, "RestrictAddressFamilies")) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert re.fullmatch(r"0[0-7]{3}", last(service, "UMask") or "")
    assert not values(service, "User"), "DynamicUser=yes, no fixed user to create"


def test_service_basics(unit):
    service, unit_section = unit["Service"], unit["Unit"]
    assert last(service, "Restart") == "on-failure"
    assert last(service, "RestartSec")
    assert values(service, "EnvironmentFile") == ["-/etc/default/ollama-exporter"]
    assert values(service, "ExecStart") == [f"{SHIPPED_EXEC} $OLLAMA_EXPORTER_ARGS"]
    assert values(service, "ExecReload") == ["/bin/kill -HUP $MAINPID"]  # the daemon reloads on SIGHUP
    assert list_setting(unit_section, "Wants") == ["network-online.target"]
    assert {"network-online.target", "ollama.service"} <= set(list_setting(unit_section, "After"))
    for strong in ("Requires", "BindsTo", "Requisite", "PartOf"):
        assert "ollama.service" not in list_setting(unit_section, strong), \
            f"{strong}=ollama.service would stop the exporter with Ollama; it must report ollama_up 0 instead"
    assert list_setting(unit["Install"], "WantedBy") == ["multi-user.target"]


def test_the_open_files_limit_is_set_for_a_connection_flood(unit):
    """Issue 9: with systemd's soft limit of 1 024 descriptors, 1 024 idle connections took /metrics
    offline. The unit sets the limit itself; the server's connection cap is at most half of it."""
    from ollama_exporter.config import KEYS_BY_NAME, Config

    value = last(unit["Service"], "LimitNOFILE")
    assert value, "LimitNOFILE= missing"
    soft, _, hard = value.partition(":")
    soft_n, hard_n = int(soft), int(hard or soft)
    assert soft_n > 1024 and hard_n >= soft_n
    assert soft_n // 2 >= Config().web_max_connections
    assert soft_n // 2 >= 8 * Config().web_max_connections, "little room to raise web.max_connections"
    assert KEYS_BY_NAME["web.max_connections"].parse("k", str(soft_n // 2)) == soft_n // 2


def test_the_network_is_left_alone(unit):
    """The exporter reaches Ollama on 127.0.0.1:11434 (or OLLAMA_HOST) and is scraped on :9778."""
    service = unit["Service"]
    assert not truthy(last(service, "PrivateNetwork"))
    assert not values(service, "IPAddressDeny")
    assert not values(service, "NetworkNamespacePath")
    assert not values(unit["Unit"], "JoinsNamespaceOf")


# --- the EnvironmentFile example --------------------------------------------------------------------

def example_args() -> list[str]:
    env = parse_env_file(ENV_FILE)
    assert "OLLAMA_EXPORTER_ARGS" in env, f"{ENV_FILE} sets no OLLAMA_EXPORTER_ARGS"
    return env["OLLAMA_EXPORTER_ARGS"].split()  # "$OLLAMA_EXPORTER_ARGS" splits at whitespace


def help_flags() -> set[str]:
    out = subprocess.run([str(console_script()), "--help"], capture_output=True, text=True, timeout=60, check=True)
    return set(re.findall(r"--[a-z][a-z0-9.-]*", out.stdout))


def test_example_env_file_uses_only_real_flags():
    known = help_flags()
    every_flag = re.findall(r"(?<![\w-])--[a-z][a-z0-9.-]*", ENV_FILE.read_text())  # commented examples too
    assert every_flag, ENV_FILE
    unknown = sorted(set(every_flag) - known)
    assert not unknown, f"{ENV_FILE.name} mentions flags that `ollama-exporter --help` does not list: {unknown}"
    for arg in example_args():
        assert arg.startswith("--") and arg.split("=", 1)[0] in known, arg


def test_example_env_file_args_start_the_exporter(tmp_path):
    """The shipped OLLAMA_EXPORTER_ARGS, config file path pointed at a copy of the example config."""
    config = tmp_path / "config.yml"
    shutil.copy(REPO / "examples" / "ollama-exporter.yml", config)
    args = [re.sub(r"^(--config\.file=).*", lambda m: m.group(1) + str(config), a) for a in example_args()]
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
    result = subprocess.run([str(console_script()), *args, "--once", "--ollama.url", "http://127.0.0.1:1",
                             "--gpu.enabled=false"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert sample(result.stdout, "ollama_up") == 0


# --- the exporter under the unit's seccomp filters ---------------------------------------------------

# Run as `python -c SANDBOX LIBSECCOMP ALLOW_LIST_FILE -- ARGV...`: installs the filters systemd 252 installs for
# MemoryDenyWriteExecute=yes and RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX, then the
# SystemCallFilter= allow list with SystemCallErrorNumber=EPERM (last, as systemd does: it does not allow
# seccomp() itself), with no_new_privs as NoNewPrivileges=yes, then execs ARGV.
SANDBOX = r'''
import ctypes, errno, os, socket, sys
lib = ctypes.CDLL(sys.argv[1], use_errno=True)
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                       ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_release.argtypes = [ctypes.c_void_p]
ALLOW = 0x7FFF0000
def ERRNO(e): return 0x00050000 | e
EQ, GE, MASKED_EQ = 4, 5, 7

def load(default, rules):
    ctx = lib.seccomp_init(default)
    assert ctx, "seccomp_init failed"
    try:
        for action, name, conds in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a system call on this architecture
            array = (Cmp * len(conds))(*[Cmp(*c) for c in conds]) if conds else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(conds), array)
            if rc < 0:
                raise OSError(-rc, "seccomp_rule_add_array(%s): %s" % (name, os.strerror(-rc)))
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, "seccomp_load: " + os.strerror(-rc))
    finally:
        lib.seccomp_release(ctx)

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
load(ALLOW, [  # MemoryDenyWriteExecute=yes (systemd 252 src/shared/seccomp-util.c)
    (ERRNO(errno.EPERM), "mmap", [(2, MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC)]),
    (ERRNO(errno.EPERM), "mprotect", [(2, MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
    (ERRNO(errno.EPERM), "pkey_mprotect", [(2, MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
    (ERRNO(errno.EPERM), "shmat", [(2, MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
])
families = {socket.AF_UNIX, socket.AF_INET, socket.AF_INET6}
load(ALLOW, [(ERRNO(errno.EAFNOSUPPORT), "socket", [(0, EQ, f, 0)]) for f in range(64) if f not in families]
            + [(ERRNO(errno.EAFNOSUPPORT), "socket", [(0, GE, 64, 0)])])
allowed = open(sys.argv[2]).read().split()
sep = sys.argv.index("--")
argv = sys.argv[sep + 1:]
load(ERRNO(errno.EPERM), [(ALLOW, name, []) for name in allowed])
os.execv(argv[0], argv)
'''


def syscall_groups(systemd_analyze: str) -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group and its members (system calls or @groups)."""
    out = subprocess.run([systemd_analyze, "syscall-filter", "--no-pager"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: Optional[list[str]] = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.startswith((" ", "\t")):
            current = None  # the "# Ungrouped ..." trailer
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    for name in names:
        result |= expand(groups[name], groups) if name.startswith("@") else {name}
    return result


def unit_syscall_allow_list(unit, systemd_analyze: str) -> list[str]:
    """The effective SystemCallFilter= of the unit: an allow list (plus @default), minus ~ entries."""
    groups = syscall_groups(systemd_analyze)
    filters = values(unit["Service"], "SystemCallFilter")
    assert filters and not filters[0].startswith("~"), "expected an allow list first"
    allowed = expand(["@default"], groups)
    for value in filters:
        if value.startswith("~"):
            allowed -= expand(value[1:].split(), groups)
        else:
            allowed |= expand(value.split(), groups)
    return sorted(allowed)


@pytest.fixture
def sandbox(unit, systemd_analyze, tmp_path):
    """Command prefix that runs a program under the unit's seccomp filters."""
    libseccomp = ctypes.util.find_library("seccomp")
    if not libseccomp:
        pytest.skip("libseccomp (libseccomp2, a dependency of Debian's systemd) not found")
    allow_file = tmp_path / "syscalls.allow"
    allow_file.write_text("\n".join(unit_syscall_allow_list(unit, systemd_analyze)) + "\n")

    def prefix(*argv: str) -> list[str]:
        return [sys.executable, "-c", SANDBOX, libseccomp, str(allow_file), "--", *argv]

    return prefix


def test_the_sandbox_is_not_a_no_op(sandbox):
    """The filters do refuse what the unit forbids, so the exporter test below means something."""
    check = r'''
import errno, mmap, os, socket
def refused(fn, code):
    try:
        fn()
    except OSError as exc:
        assert exc.errno == code, exc
        return
    raise AssertionError("not refused: %r" % fn)
refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC), errno.EPERM)
refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW), errno.EAFNOSUPPORT)
refused(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW), errno.EAFNOSUPPORT)
refused(lambda: os.sched_setaffinity(0, {0}), errno.EPERM)           # ~@resources
refused(lambda: os.setgroups([]), errno.EPERM)                       # ~@privileged
assert open("/proc/self/status").read().count("NoNewPrivs:\t1") == 1
print("ok")
'''
    result = subprocess.run(sandbox(sys.executable, "-c", check), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_exporter_raises_its_soft_descriptor_limit_under_the_units_filters(sandbox):
    """Outside LimitNOFILE= (a drop-in that removes it, another service manager), the exporter lifts its
    soft limit to the hard one at start; the unit's system call filter must not refuse that."""
    check = ("import resource; from ollama_exporter.daemon import raise_fd_limit; raise_fd_limit(); "
             "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    result = subprocess.run(sandbox(sys.executable, "-c", check), capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.split() == [str(hard), str(hard)]


def stop_cleanly(proc: subprocess.Popen) -> None:
    """SIGTERM the sandboxed exporter: it must exit 0 with nothing refused and no traceback on stderr."""
    terminate(proc, 10)
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Operation not permitted" not in stderr, stderr


def test_exporter_with_nvml_runs_under_the_units_seccomp_filters(sandbox, nvml, runners, ollama_with_models):
    """CPython, ctypes and pynvml loading libnvidia-ml.so.1 (the fake) under MemoryDenyWriteExecute, the
    system call allow list and the address families; GPU metrics, runner attribution, probes, shutdown."""
    nvml.write(two_gpu_box(pids=runners))
    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "LD_LIBRARY_PATH", "FAKE_NVML_CONFIG")}
    env.update(nvml.env())
    # Listen as the unit does by default (":PORT", dual-stack), GPU required so that NVML must work.
    proc = subprocess.Popen(sandbox(str(console_script()), "--ollama.url", ollama_with_models.url,
                                    "--web.listen-address", f":{port}", "--gpu.enabled=true",
                                    "--poll.interval=1s", "--probes.interval=1s"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def ready():
            if proc.poll() is not None:
                pytest.fail(f"exporter exited with {proc.returncode} under the sandbox: {proc.stderr.read()}")
            return requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200
        wait_for(ready, 20, message="sandboxed exporter /-/ready")
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1", status  # filtered
        text = wait_for(lambda: (t := requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
                        and sample(t, "ollama_probes_total", model="qwen3:32b") and t,
                        20, message="a probe under the sandbox")
        assert sample(text, "ollama_up") == 1
        assert sample(text, "ollama_gpu_nvml_up") == 1
        assert sample(text, "ollama_exporter_gpu_processes_unattributed", reason="unreadable") == 0
        for model in BLOBS:
            assert any(line.startswith("ollama_loaded_model_gpu_memory_bytes{") and f'model="{model}"' in line
                       for line in text.splitlines()), f"no GPU memory attributed to {model}"
    finally:
        stop_cleanly(proc)


def test_journal_read_access_and_a_state_directory(unit):
    """The logs source reads `journalctl -u ollama` (the systemd-journal group) and keeps its position and
    counters in $STATE_DIRECTORY, the only writable place under ProtectSystem=strict."""
    service = unit["Service"]
    groups = [last(service, "Group") or ""] + list_setting(service, "SupplementaryGroups")
    assert "systemd-journal" in groups
    assert list_setting(service, "StateDirectory") == ["ollama-exporter"]
    assert last(service, "StateDirectoryMode") == "0700"


def test_logs_and_runners_sources_run_under_the_units_seccomp_filters(sandbox, tmp_path):
    """journalctl started by the exporter (the fake here), the state file written to $STATE_DIRECTORY as
    systemd sets it, and /proc scanned for runners, all under the unit's system call filters."""
    from tests.fakes.journalctl import FakeJournal
    from tests.fakes.ollama import FakeOllama
    from tests.fakes.ollama_log import gin_line

    journal = FakeJournal(tmp_path / "journal.jsonl")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
    env.update(journal.env(tmp_path / "bin"), STATE_DIRECTORY=str(state_dir))
    port = free_port("127.0.0.1")
    with FakeOllama() as fake:
        proc = subprocess.Popen(sandbox(str(console_script()), "--ollama.url", fake.url, "--web.listen-address",
                                        f"127.0.0.1:{port}", "--poll.interval=300ms", "--no-probes.enabled",
                                        "--logs.source=journald", "--runners.enabled=true"),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for(lambda: sample(requests.get(url, timeout=1).text, "ollama_exporter_source_up", source="logs") == 1,
                     20, message="sandboxed logs source up")
            journal.extend(gin_line(200, 0.2, "127.0.0.1", "POST", "/api/chat") for _ in range(4))
            wait_for(lambda: sample(requests.get(url, timeout=1).text, "ollama_http_requests_total", route="/api/chat",
                                    method="POST", code="200") == 4, 20, message="4 requests under the sandbox")
            assert sample(requests.get(url, timeout=1).text, "ollama_exporter_source_up", source="runners") == 1
            wait_for(lambda: (state_dir / "logs-state.json").is_file(), message="state file in $STATE_DIRECTORY")
        finally:
            stop_cleanly(proc)
    assert json.loads((state_dir / "logs-state.json").read_text())["position"]["cursor"]
