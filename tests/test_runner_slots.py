"""The runners source against fake runners: real processes with runner command lines and real HTTP."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from ollama_exporter.runner_slots import RunnersState, RunnerSource, parse_slot
from ollama_exporter.snapshot import InstalledModel, LoadedModel, ModelDetails, ShowInfo
from tests.fakes.llama_server import FakeLlamaServer

# Blobs of this session only: the runners source scans every process of the machine, and other test
# sessions on it run runner-like processes too.
A, B = secrets.token_hex(32), secrets.token_hex(32)


def installed(name: str, blob: str) -> InstalledModel:
    return InstalledModel(name, "d" + blob[1:], 1, ModelDetails(), show=ShowInfo(weights_blob=blob))


def loaded(name: str, blob: str) -> LoadedModel:
    return LoadedModel(name, "d" + blob[1:], 1, 1, None, 4096, ModelDetails())


@pytest.fixture
def fakes():
    started: list[FakeLlamaServer] = []

    def start(blob: str, argv0: str = "/usr/lib/ollama/llama-server", **kwargs) -> FakeLlamaServer:
        fake = FakeLlamaServer(blob, **kwargs).start(argv0)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def models(*pairs):
    return [loaded(n, b) for n, b in pairs], [installed(n, b) for n, b in pairs]


def test_slots_per_model_from_two_llama_servers(fakes):
    qwen, llama = fakes(A, n_slots=2, n_ctx=8192), fakes(B, n_slots=1, next_token_shape="object")
    qwen.busy(1, task=17, prompt_tokens=300, decoded=25)
    llama.busy(0, task=17, prompt_tokens=40, decoded=2)
    state = RunnerSource(timeout=2).sample(*models(("qwen3:8b", A), ("llama3.1:8b", B)))
    by_model = {r.model: r for r in state.runners}
    assert state.complete and state.found
    assert (by_model["qwen3:8b"].slots, by_model["qwen3:8b"].busy) == (2, 1)
    assert [(s.id, s.context_tokens, s.busy, s.task, s.used_tokens) for s in by_model["qwen3:8b"].slot_states] == \
        [(0, 8192, False, None, 0), (1, 8192, True, 17, 325)]
    assert (by_model["llama3.1:8b"].slots, by_model["llama3.1:8b"].busy) == (1, 1)
    assert by_model["llama3.1:8b"].slot_states[0].used_tokens == 42  # next_token as an object
    assert state.in_flight() == {(1, 17): "qwen3:8b", (0, 17): "llama3.1:8b"}


def test_the_same_slot_and_task_on_two_runners_names_no_model(fakes):
    fakes(A).busy(0, task=3)
    fakes(B).busy(0, task=3)
    state = RunnerSource(timeout=2).sample(*models(("qwen3:8b", A), ("llama3.1:8b", B)))
    assert state.in_flight() == {(0, 3): None}


def test_only_read_only_endpoints_and_props_once(fakes):
    fake = fakes(A, n_slots=2)
    source = RunnerSource(timeout=2)
    for _ in range(3):
        source.sample(*models(("qwen3:8b", A)))
    assert fake.requests == [("GET", "/props")] + [("GET", "/slots")] * 3


def test_a_slow_runner_is_a_timeout_not_zero_and_is_not_asked_twice_at_once(fakes):
    fake = fakes(A, delay=1.0)
    source = RunnerSource(timeout=0.3)
    first = source.sample(*models(("qwen3:8b", A)))
    second = source.sample(*models(("qwen3:8b", A)))
    for state in (first, second):
        (sample,) = state.runners
        assert sample.error == "timeout" and sample.busy is None and not state.complete
    assert fake.requests.count(("GET", "/slots")) == 1


@pytest.mark.parametrize("status, error, slots", [(501, None, 2), (401, "http_4xx", None)])
def test_slots_endpoint_off_or_locked(fakes, status, error, slots):
    fakes(A, n_slots=2, slots_status=status)
    (sample,) = RunnerSource(timeout=2).sample(*models(("qwen3:8b", A))).runners
    assert (sample.error, sample.busy) == (error, None)
    assert sample.slots == (2 if status == 501 else None)


def test_old_cpp_runner_health_slot_counts(fakes):
    fake = fakes(A, argv0="/tmp/ollama/runners/cuda_v11/ollama_llama_server", kind="old", n_slots=4)
    fake.busy(2, task=1)
    (sample,) = RunnerSource(timeout=2).sample(*models(("llama3:8b", A))).runners
    assert (sample.kind, sample.slots, sample.busy, sample.slot_states) == ("ollama_llama_server", 4, 1, ())
    assert fake.requests == [("GET", "/health")]


@pytest.mark.parametrize("argv", [
    ["/usr/local/bin/ollama", "runner", "--ollama-engine"],  # v0.5.2-v0.24
    ["/usr/lib/ollama/runners/cuda_v12_avx/ollama_llama_server", "runner"],  # v0.5.x under the old name
])
def test_go_runner_is_not_polled(fakes, argv):
    """Its /health has no slots, and nothing else on it is safe to read."""
    fake = fakes(A, kind="old")
    fake._proc.kill()  # noqa: SLF001 - replace it with a Go runner's command line on the same port
    fake._proc.wait()  # noqa: SLF001
    script = ["-c", "import sys, time; time.sleep(60)"]
    proc = subprocess.Popen([argv[0], *script, *argv[1:], "--model", f"/m/blobs/sha256-{A}", "--port", str(fake.port)],
                            executable=sys.executable)
    try:
        state = RunnerSource(timeout=2).sample(*models(("llama3:8b", A)))
        assert state.runners == () and state.found and fake.requests == []
    finally:
        proc.kill()
        proc.wait()


def test_runner_of_a_model_not_in_ps_is_skipped(fakes):
    fake = fakes(A)
    state = RunnerSource(timeout=2).sample([], [installed("qwen3:8b", A)])
    assert state.runners == () and state.found and not state.complete and fake.requests == []


def test_no_runner_visible():
    state = RunnerSource(timeout=2, proc="/nonexistent").sample(*models(("qwen3:8b", A)))
    assert (state.runners, state.found, state.complete) == ((), False, False)


@pytest.mark.parametrize("item, expected", [
    ({"id": 0, "n_ctx": 100, "is_processing": False}, (0, 100, False, None, 0)),
    ({"id": 1, "n_ctx": 100, "is_processing": True, "id_task": 9, "n_past": 77}, (1, 100, True, 9, 77)),
    ({"id": 1, "is_processing": True, "id_task": 9}, (1, None, True, 9, None)),
    ({"id": 2, "n_ctx": 100, "is_processing": True, "id_task": -1, "n_prompt_tokens": 5,
      "next_token": [{"n_decoded": 1}]}, (2, 100, True, None, 6)),
])
def test_slot_shapes(item, expected):
    s = parse_slot(item)
    assert (s.id, s.context_tokens, s.busy, s.task, s.used_tokens) == expected


@pytest.mark.parametrize("item", [None, [], {"n_ctx": 5}, {"id": "0"}, {"id": True}])
def test_slot_garbage(item):
    assert parse_slot(item) is None


def test_a_reused_pid_is_read_again(tmp_path):
    """argv is cached per process, not per PID: a PID that comes back as a runner is seen as one."""
    argv = {4242: ["/usr/bin/bash"]}

    def stat(start: int) -> None:
        (tmp_path / "4242").mkdir(exist_ok=True)
        (tmp_path / "4242" / "stat").write_text(f"4242 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n")

    source = RunnerSource(timeout=0.2, proc=str(tmp_path), read_cmdline=lambda pid: argv.get(pid))
    stat(100)
    assert source.sample(*models(("qwen3:8b", A))) == RunnersState((), False, False)
    argv[4242] = ["/usr/lib/ollama/llama-server", "--model", f"/m/blobs/sha256-{A}", "--port", "1"]
    assert not source.sample(*models(("qwen3:8b", A))).found  # the same process: its argv is not read again
    stat(200)  # exited, and its PID went to a runner
    state = source.sample(*models(("qwen3:8b", A)))
    assert state.found and state.runners[0].error == "connection"


@pytest.mark.parametrize("steps, reason", [
    ("drip", "timeout"),  # one header byte every 0.2 s: each read's timeout restarted, the deadline did not
    ("deep", None),
    ("nan", None),
])
def test_a_hostile_runner_port_is_bounded_by_the_deadline_and_parsed_strictly(steps, reason):
    """A runner is an upstream too: its answer must end at the deadline, and nesting that recurses out of
    the parser or NaN is "not JSON" (a traceback in the log and an unexpected-error path before)."""
    import time

    from ollama_exporter.runner_slots import RunnerError, get_json
    from tests.fakes.hostile import ScriptedServer, drip, head

    with ScriptedServer() as runner:
        bodies = {"deep": b"[" * 100_000 + b"1" + b"]" * 100_000, "nan": b"NaN"}
        runner.script("GET", "/slots", drip(head(200, b"[]"), every=0.2) if steps == "drip" else [head(200, bodies[steps])])
        started = time.monotonic()
        if reason:
            with pytest.raises(RunnerError) as err:
                get_json(runner.port, "/slots", 1.0)
            assert err.value.reason == reason and time.monotonic() - started < 1.5
        else:
            assert get_json(runner.port, "/slots", 1.0) == (200, None)
