"""The daemon must say when its data is frozen (issue 9): a poll loop that dies, hangs or fails every
poll makes /-/healthy and /-/ready answer 503; a render that fails keeps the last good exposition on
/metrics, is counted, and makes /-/ready say so; a GPU that hangs for ever stalls nothing.

The daemon runs in this process (its real poller, exposition and HTTP server on loopback, against the
scripted upstream), so a test can break one of its parts for real: kill the poll thread, block it, make
every poll raise, let an unencodable name past validation.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
import requests

from ollama_exporter import ollama, poller
from ollama_exporter.config import build_config
from ollama_exporter.daemon import Daemon
from ollama_exporter.ollama import OllamaClient
from ollama_exporter.poller import Poller
from ollama_exporter.snapshot import GpuState
from tests.conftest import free_port, run_python, sample, wait_for
from tests.fakes.hostile import ScriptedServer
from tests.test_hostile_upstream import row, serve


@pytest.fixture
def up():
    with ScriptedServer() as server:
        serve(server, [row("ok:1")])
        yield server


@contextmanager
def running(url: str, forget_after: str = "1h") -> Iterator[tuple[Daemon, str]]:
    port = free_port()
    flags = {"ollama.url": url, "poll.interval": "100ms", "poll.forget_after": forget_after,
             "ollama.timeout": "500ms", "gpu.enabled": "false", "runners.enabled": "false", "probes.enabled": False,
             "web.listen_address": (f"127.0.0.1:{port}",)}
    daemon = Daemon(None, flags, build_config(None, flags, environ={}))
    daemon.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(base + "/-/ready", timeout=1).status_code == 200, message="ready")
        yield daemon, base
    finally:
        daemon.stop.set()
        daemon.server.stop()


def status(url: str) -> tuple[int, str]:
    resp = requests.get(url, timeout=2)
    return resp.status_code, resp.text.strip()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_poll_loop_that_dies_makes_health_and_readiness_fail(up, monkeypatch):
    """A poll thread ended by something its `except Exception` does not catch (SystemExit from a library
    here; an OverflowError from an absurd interval before) used to leave /-/healthy at 200 for good."""
    with running(up.url) as (daemon, base):
        assert status(base + "/-/healthy") == (200, "OK")

        def exit_thread():
            raise SystemExit(3)

        monkeypatch.setattr(daemon.poller, "poll_once", exit_thread)
        wait_for(lambda: not daemon._poll_thread.is_alive(), timeout=5, message="the poll thread to end")
        assert status(base + "/-/healthy") == (503, "the poll loop has stopped")
        assert status(base + "/-/ready") == (503, "the poll loop has stopped")
        assert requests.get(base + "/metrics", timeout=2).status_code == 200  # the last data, still served


def test_a_poll_loop_that_hangs_makes_health_and_readiness_fail_until_it_recovers(up, monkeypatch):
    monkeypatch.setattr(poller, "STALL_GRACE", 0.5)
    with running(up.url) as (daemon, base):
        release = threading.Event()
        daemon.poller.subscribe(lambda snapshot: release.wait(30))  # the next poll never finishes
        try:
            code, text = wait_for(lambda: (s := status(base + "/-/healthy"))[0] == 503 and s, timeout=5,
                                  message="/-/healthy to see the stall")
            assert text.startswith("the poll loop has not finished a poll for")
            assert status(base + "/-/ready")[0] == 503
            assert requests.get(base + "/metrics", timeout=1).status_code == 200  # never blocked by the poll
        finally:
            release.set()
        daemon.poller._listeners.pop()
        wait_for(lambda: status(base + "/-/healthy")[0] == 200 and status(base + "/-/ready")[0] == 200,
                 timeout=5, message="recovery once polls finish again")


def test_a_poll_that_raises_every_time_is_a_stall_not_a_heartbeat(up, monkeypatch):
    """The loop survives each exception, but publishes nothing: the data is frozen, so it is not healthy."""
    monkeypatch.setattr(poller, "STALL_GRACE", 0.5)
    with running(up.url) as (daemon, base):
        def broken(*args):
            raise ValueError("a bug in every poll")

        monkeypatch.setattr(daemon.poller, "_remember", broken)
        wait_for(lambda: status(base + "/-/healthy")[0] == 503, timeout=5, message="/-/healthy to fail")
        assert daemon._poll_thread.is_alive()
        before = sample(requests.get(base + "/metrics", timeout=2).text, "ollama_exporter_snapshot_timestamp_seconds")
        time.sleep(0.3)
        after = sample(requests.get(base + "/metrics", timeout=2).text, "ollama_exporter_snapshot_timestamp_seconds")
        assert before == after  # frozen, and the age says so
        monkeypatch.undo()
        wait_for(lambda: status(base + "/-/healthy")[0] == 200, timeout=5, message="recovery")


def test_an_absurd_interval_cannot_kill_the_loop(up):
    """poll.interval 99999999999y was accepted once and Event.wait() overflowed, ending the thread. The
    config bounds it now; the loop clamps its wait anyway and a wake() still polls at once."""
    p = Poller(OllamaClient(up.url, 0.5), 1e18)
    stop = threading.Event()
    thread = threading.Thread(target=p.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: p.snapshot.ready, timeout=5, message="the first poll")
        first = p.snapshot
        time.sleep(0.2)
        assert thread.is_alive()
        p.wake()
        wait_for(lambda: p.snapshot is not first, timeout=5, message="a poll after wake()")
    finally:
        stop.set()
        p.wake()
        thread.join(5)


class HangingGpu:
    """An NVML that never returns (a driver stuck in the kernel)."""

    timeout = 1.0

    def __init__(self):
        self.release = threading.Event()

    def sample(self) -> GpuState:
        self.release.wait(60)
        return GpuState(nvml_up=True)


def test_a_gpu_that_hangs_for_ever_stalls_nothing(up, monkeypatch):
    monkeypatch.setattr(poller, "STALL_GRACE", 0.5)
    gpu = HangingGpu()
    with running(up.url) as (daemon, base):
        daemon.poller.gpu = gpu
        try:
            text = wait_for(lambda: (t := requests.get(base + "/metrics", timeout=2).text)
                            and sample(t, "ollama_exporter_source_errors_total", source="gpu", reason="timeout")
                            and t, timeout=5, message="the GPU source timing out")
            assert sample(text, "ollama_gpu_nvml_up") == 0 and sample(text, "ollama_up") == 1
            time.sleep(2.0)  # well past the stall threshold (3 x 0.1 s + 0.5 s + 0.5 s)
            assert status(base + "/-/healthy") == (200, "OK") and status(base + "/-/ready") == (200, "OK")
            text = requests.get(base + "/metrics", timeout=2).text
            assert sample(text, "ollama_exporter_source_errors_total", source="gpu", reason="timeout") > 5
            gpu_threads = [t for t in threading.enumerate() if t.name == "poll-gpu"]
            assert len(gpu_threads) == 1  # one stuck call, never one per poll
        finally:
            gpu.release.set()


def test_a_render_failure_is_left_out_counted_and_makes_ready_say_so(up, monkeypatch):
    """If a value gets past validation anyway (here: a lone surrogate in a model name, with the name check
    switched off), every scrape used to get an empty reply while /-/ready said 200, and the name lived on
    in the counters. Now its series are left out, the rest stays current, the failure is counted at
    once, /-/ready says so, and once the name has been gone for poll.forget_after all is well again."""
    with running(up.url, forget_after="1s") as (daemon, base):
        good = requests.get(base + "/metrics", timeout=2).text
        assert sample(good, "ollama_exporter_render_failures_total") == 0
        monkeypatch.setattr(ollama, "_label", lambda value, limit=0: value if isinstance(value, str) else "")
        serve(up, [row("ok:1", size=200), row("bad\ud800name")])
        code, why = wait_for(lambda: (s := status(base + "/-/ready"))[0] == 503 and s, timeout=5,
                             message="/-/ready to report the render failure")
        assert why == "rendering the metrics failed; serving the last good exposition"
        assert status(base + "/-/healthy") == (200, "OK")  # the loop is fine: nothing to restart
        resp = requests.get(base + "/metrics", timeout=2)
        assert resp.status_code == 200
        text = resp.text
        assert sample(text, "ollama_exporter_render_failures_total") >= 1  # counted in the same render
        assert sample(text, "ollama_loaded_model_size_bytes", model="ok:1") == 200  # the rest is current
        assert sample(text, "ollama_up") == 1 and "bad" not in text
        serve(up, [row("ok:1")])  # the upstream is fixed; the name is in the load counters a while longer
        wait_for(lambda: status(base + "/-/ready")[0] == 200, timeout=5, message="ready after forget_after")
        text = requests.get(base + "/metrics", timeout=2).text
        assert "bad" not in text and sample(text, "ollama_loaded_model_size_bytes", model="ok:1") == 100


def test_a_snapshot_that_cannot_be_collected_keeps_the_last_good_families(up, monkeypatch):
    from ollama_exporter import exposition

    with running(up.url) as (daemon, base):
        real = exposition.collect

        def broken(snapshot, *sections):
            if any(m.name == "trigger:1" for m in snapshot.loaded):
                raise OverflowError("int too large to convert to float")
            return real(snapshot, *sections)

        monkeypatch.setattr(exposition, "collect", broken)
        serve(up, [row("ok:1"), row("trigger:1")])
        wait_for(lambda: status(base + "/-/ready")[0] == 503, timeout=5, message="/-/ready to fail")
        text = requests.get(base + "/metrics", timeout=2).text
        assert sample(text, "ollama_exporter_render_failures_total") >= 1
        assert sample(text, "ollama_loaded_model_size_bytes", model="ok:1") == 100
        assert "trigger" not in text
        serve(up, [row("ok:1")])
        wait_for(lambda: status(base + "/-/ready")[0] == 200, timeout=5, message="ready again")


# --- signals an unlucky operator (or a supervisor) sends ---

def test_a_storm_of_sighups_reloads_without_dying(fake_ollama, exporter_factory, tmp_path):
    import signal

    config = tmp_path / "config.yml"
    config.write_text(f"ollama:\n  url: {fake_ollama.url}\npoll:\n  interval: 200ms\nprobes:\n  enabled: false\n")
    exp = exporter_factory("--config.file", str(config)).wait_ready()
    for _ in range(50):
        exp.proc.send_signal(signal.SIGHUP)
        time.sleep(0.005)
    time.sleep(1.0)
    assert exp.proc.poll() is None
    assert status(exp.url + "/-/ready") == (200, "OK")
    reloads = [r for r in exp.log_records() if r["msg"] == "configuration reloaded"]
    assert 1 <= len(reloads) <= 50  # coalesced while one runs, never run concurrently


def test_stopped_and_continued_it_serves_fresh_data_again(fake_ollama, exporter_factory):
    """SIGSTOP (a debugger, a frozen VM, a cgroup freezer) then SIGCONT: no crash, and polls resume."""
    import signal

    exp = exporter_factory("--ollama.url", fake_ollama.url, "--poll.interval", "200ms", "--no-probes.enabled"
                           ).wait_ready()
    exp.proc.send_signal(signal.SIGSTOP)
    time.sleep(2.0)
    exp.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: time.time() - sample(exp.metrics(), "ollama_exporter_snapshot_timestamp_seconds") < 1,
             timeout=5, message="a fresh snapshot after SIGCONT")
    assert status(exp.url + "/-/healthy") == (200, "OK")


def test_malloc_takes_the_settings_that_let_a_bursts_memory_go_back():
    """benchmarks/bench_soak.py measures the effect; here: glibc accepts them, and afterwards a 64 KB block
    is a mapping of its own, unmapped when freed (glibc's default threshold grows with what it sees)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt() is glibc's")
    check = r'''
import ctypes, sys
from ollama_exporter.memory import tune_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mapped():
    return libc.mallinfo2().hblks  # chunks in mappings of their own
if sys.argv[1] == "tuned":
    assert tune_allocator()
before = mapped()
blocks = [bytearray(64 * 1024) for _ in range(50)]
during = mapped() - before
del blocks
print(during, mapped() - before)
'''
    tuned, default = (run_python(check, arg, timeout=30) for arg in ("tuned", "default"))
    (during, after), (default_during, _) = ([int(n) for n in out.split()] for out in (tuned, default))
    assert during >= 45 and after <= 0  # each block mapped on its own, and unmapped when freed
    assert default_during <= 5  # by default in the heap, where freed space stays


def test_after_a_burst_the_free_pages_in_mallocs_heaps_go_back_and_not_before():
    """Space freed in the middle of a heap stays resident (glibc gives back only a heap's top): after a
    burst frees enough of it, the next look trims the heaps; with nothing new freed, it does not."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallinfo2() and malloc_trim() are glibc's")
    check = r'''
from ollama_exporter.memory import HeapTrimmer, TRIM_EVERY
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
now = [0.0]
trimmer = HeapTrimmer(clock=lambda: now[0])
now[0] += TRIM_EVERY; trimmer.after_poll()  # the first look: what is free before the burst
blocks = [bytearray(b"x" * 4096) for _ in range(4000)]  # 16 MB in the heap
kept = blocks[::100]  # a few survivors pin the heap's top
del blocks
now[0] += TRIM_EVERY / 2; trimmer.after_poll()
assert trimmer.trims == 0, "looked before TRIM_EVERY"
before = rss_kb()
now[0] += TRIM_EVERY / 2; trimmer.after_poll()
after = rss_kb()
assert trimmer.trims == 1, trimmer.trims
assert before - after > 8 * 1024, (before, after)
now[0] += TRIM_EVERY; trimmer.after_poll()
assert trimmer.trims == 1, "trimmed again with nothing new freed"
print("ok")
'''
    assert run_python(check).strip() == "ok"


def test_a_forget_has_the_heaps_trimmed_at_the_next_look_whatever_it_freed():
    """A trim waited for TRIM_ABOVE more free in the heaps than after the last one: the pages a forget
    freed below live blocks stayed resident when the forget freed less than that."""
    from types import SimpleNamespace

    from ollama_exporter.memory import TRIM_EVERY, HeapTrimmer

    now, trims = [0.0], []
    trimmer = HeapTrimmer(clock=lambda: now[0])
    trimmer._info, trimmer._trim = (lambda: SimpleNamespace(fordblks=1000)), trims.append
    now[0] += TRIM_EVERY
    trimmer.after_poll()
    assert trims == []  # nothing freed
    now[0] += 1
    trimmer.after_poll(released=True)
    assert trims == []  # too soon to look again: remembered
    now[0] += TRIM_EVERY
    trimmer.after_poll()
    assert trims == [0]
    now[0] += TRIM_EVERY
    trimmer.after_poll()
    assert trims == [0]  # once per forget


def test_after_a_poll_that_forgot_models_a_full_collection_empties_the_free_lists():
    """The tuples a burst of names freed last stayed on the interpreter's free lists, which only a full
    collection empties (gc.collect's documentation), and those ran every FULL_COLLECT_EVERY (10
    minutes): after a poll that forgot models one runs, at most every AFTER_FORGET. In a child
    process: gc.freeze() is process-wide. A cycle among frozen objects tells a full collection ran."""
    check = r'''
import gc, weakref
from ollama_exporter.memory import AFTER_FORGET, after_each_poll
now, forgotten = [1000.0], [0]
after_poll = after_each_poll(lambda: forgotten[0], clock=lambda: now[0])
class Node: pass
def cycle():
    a, b = Node(), Node(); a.other, b.other = b, a
    return weakref.ref(a)
alive = cycle()
after_poll()  # frozen, as after every poll
gc.collect()
assert alive() is not None
now[0] += AFTER_FORGET; after_poll()
assert alive() is not None, "a full collection with nothing forgotten"
forgotten[0] += 5; after_poll()
assert alive() is None, "no full collection after a forget"
alive = cycle(); after_poll()
now[0] += 1; forgotten[0] += 1; after_poll()
assert alive() is not None, "collected again within AFTER_FORGET"
now[0] += AFTER_FORGET; after_poll()  # the forget is not lost: done once the time has come
assert alive() is None
print("ok")
'''
    assert run_python(check).strip() == "ok"


def test_polls_keep_long_lived_objects_out_of_gc_walks_and_cycles_are_still_reclaimed():
    """A full GC walk of a 2 000-model exporter held the interpreter ~20 ms under a scrape (bench_scale's
    paced p99): after a poll what is alive is frozen, and a full collection every FULL_COLLECT_EVERY
    still reclaims cycles among it. In a child process: gc.freeze() is process-wide."""
    check = r'''
import gc, weakref
from ollama_exporter.memory import QuietCollector
now = [0.0]
quiet = QuietCollector(full_every=600.0, clock=lambda: now[0])
class Node: pass
kept = [[i] for i in range(100_000)]  # an inventory's worth of long-lived containers
a, b = Node(), Node(); a.other, b.other = b, a  # a cycle that becomes garbage later
alive = weakref.ref(a)
quiet.after_poll()
assert gc.get_freeze_count() >= 100_000, gc.get_freeze_count()
del a, b
gc.collect()  # what the collector sees now: not the frozen cycle
assert alive() is not None, "frozen objects were walked"
now[0] = 599.0; quiet.after_poll()
assert alive() is not None
now[0] = 600.0; quiet.after_poll()  # the periodic full collection
assert alive() is None, "a cycle among frozen objects was never reclaimed"
assert gc.get_freeze_count() >= 100_000  # and what is alive is frozen again
print("ok")
'''
    assert run_python(check).strip() == "ok"


def test_the_loop_runs_after_poll_after_every_poll_and_survives_it_failing(up):
    p = Poller(OllamaClient(up.url, 0.5), 0.05)
    calls = []

    def after() -> None:
        calls.append(p.snapshot.timestamp)
        if len(calls) == 1:
            raise RuntimeError("a broken hook")

    p.after_poll = after
    stop = threading.Event()
    thread = threading.Thread(target=p.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(calls) >= 3, timeout=5, message="three polls")
        assert thread.is_alive() and len(set(calls)) == len(calls)  # once per published snapshot
    finally:
        stop.set()
        p.wake()
        thread.join(5)
