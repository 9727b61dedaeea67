"""The running exporter: builds the poller, prober and HTTP server from a Config, and reloads them.

SIGHUP and `POST /-/reload` re-read `--config.file` and `--web.config.file` (flags and environment
variables stay as they were given). A bad new file keeps the running configuration and says why, in the
log and in `ollama_exporter_config_last_reload_successful 0`. Everything can change on reload except
the listen addresses, which need a restart (the sockets stay bound to the old ones, and a warning says
so). SIGTERM and SIGINT stop it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from ollama_exporter import __version__, logformat
from ollama_exporter.config import Config, ConfigError, build_config, redact_url
from ollama_exporter.exposition import Exposition, render
from ollama_exporter.gpu import GpuSource
from ollama_exporter.logfollow import LogFollower
from ollama_exporter.logsources import FileSource, JournaldSource, PipeSource
from ollama_exporter.logstate import StateFile, default_state_path
from ollama_exporter.memory import after_each_poll, tune_allocator
from ollama_exporter.multitarget import MultiTarget
from ollama_exporter.ollama import OllamaClient, make_client
from ollama_exporter.poller import Poller
from ollama_exporter.prober import Prober
from ollama_exporter.runner_slots import RunnerSource
from ollama_exporter.server import Request, Response, Server, bind
from ollama_exporter.snapshot import GpuState, ReloadStatus, SourceError
from ollama_exporter.webconfig import WebConfig, load_web_config

log = logging.getLogger("ollama_exporter")
SWITCH_INTERVAL = 0.0001  # seconds; CPython's default is 0.005


def make_gpu_source(config: Config) -> tuple[Optional[GpuSource], Optional[GpuState]]:
    """The GPU source for gpu.enabled, or what the snapshot says instead: nothing (false) or nvml_up 0.

    Raises ConfigError when gpu.enabled is true and NVML cannot be used.
    """
    if config.gpu_enabled == "false":
        return None, None
    source = GpuSource(config.poll_interval)
    try:
        source.start()
    except SourceError as exc:
        if config.gpu_enabled == "true":
            raise ConfigError(f"gpu.enabled is true but NVML cannot be used: {exc}") from None
        if exc.reason == "library_not_found":
            log.info("running without GPU metrics", extra={"reason": exc.reason, "error": str(exc)})
            return None, GpuState(nvml_up=False)
        log.warning("NVML is not ready, retrying with backoff", extra={"reason": exc.reason, "error": str(exc)})
    return source, None


def make_runner_source(config: Config) -> Optional[RunnerSource]:
    """The runners source (slots per model from each runner), unless runners.enabled is false."""
    return RunnerSource(min(1.0, config.ollama_timeout)) if config.runners_enabled != "false" else None


LOGS_KEYS = ("logs_source", "logs_path", "logs_unit", "logs_command", "logs_state_file", "probes_forwarded_for")


def make_log_follower(config: Config) -> Optional[LogFollower]:
    """The logs source for logs.source (None when it is none); not started yet."""
    from ollama_exporter.traffic import TrafficStats

    if config.logs_source == "none":
        return None
    if config.logs_source == "file":
        source = FileSource(config.logs_path)
    elif config.logs_source == "journald":
        source = JournaldSource(config.logs_unit)
    elif config.logs_source == "command":
        source = PipeSource(config.logs_command)
    else:
        source = PipeSource()
    path = config.logs_state_file or default_state_path(os.environ)
    if path is None:
        log.warning("log position and counters kept in memory only", extra={
            "reason": "no logs.state_file and no $STATE_DIRECTORY", "error": "after a restart, counting starts "
            "at zero from the end of the log"})
    return LogFollower(source, TrafficStats(config.probes_forwarded_for), StateFile(path) if path else None)


def check_config(config: Config) -> str:
    """What --config.check prints when everything loads; raises ConfigError otherwise."""
    if config.web_config_file:
        load_web_config(config.web_config_file)
    return (f"config OK: polling {redact_url(config.ollama_url)} every {config.poll_interval:g}s, "
            f"listening on {', '.join(config.web_listen_address)}")


def poll_once(config: Config) -> bytes:
    """--once: one poll, rendered as the text format (no runtime metrics)."""
    gpu, gpu_off = make_gpu_source(config)
    poller = Poller(make_client(config), config.poll_interval, gpu=gpu, gpu_off_state=gpu_off,
                    runner_source=make_runner_source(config), runners_required=config.runners_enabled == "true")
    poller.settle_shows = True
    body, _ = render(poller.poll_once())
    return body


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (as Go programs do), so a connection flood meets the
    server's own cap long before the process runs out of descriptors."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit", extra={"error": str(exc)})


@dataclass
class _Running:
    """The parts built from one Config; a reload swaps what changed."""

    config: Config
    client: OllamaClient
    web: Optional[WebConfig]


class Daemon:
    def __init__(self, config_file: Optional[str], flags: dict[str, Any], config: Config):
        self.config_file = config_file
        self.flags = flags
        self.stop = threading.Event()
        self._reload_wanted = threading.Event()
        self._reload_lock = threading.Lock()
        web = load_web_config(config.web_config_file) if config.web_config_file else None
        self.now = _Running(config, make_client(config), web)
        self.exposition = Exposition(runtime_metrics=not config.web_disable_exporter_metrics)
        gpu, gpu_off = make_gpu_source(config)
        self.poller = Poller(self.now.client, config.poll_interval, gpu=gpu, gpu_off_state=gpu_off,
                             forget_after=config.poll_forget_after, logs=make_log_follower(config),
                             runner_source=make_runner_source(config),
                             runners_required=config.runners_enabled == "true")
        self.poller.reload_status = ReloadStatus(True, time.time())
        self.poller.subscribe(self.exposition.update)
        self.prober: Optional[Prober] = None
        self._prober_stop: Optional[threading.Event] = None
        self.server: Optional[Server] = None
        self.targets = MultiTarget(config, self.exposition.alone)
        self._poll_thread: Optional[threading.Thread] = None

    # --- start and stop ---

    def start(self) -> None:
        """Bind the listeners (OSError if one cannot be bound) and start polling, probing and serving."""
        config = self.now.config
        raise_fd_limit()
        tune_allocator()  # before any thread starts: memory a burst took goes back afterwards
        # A scrape waits for the interpreter while a poll or probe runs Python; by default the waiting thread
        # may only take over after 5 ms. Threads seldom want to run at once here, so switching sooner costs
        # next to nothing and keeps a scrape that lands in a poll within a fraction of a millisecond.
        sys.setswitchinterval(SWITCH_INTERVAL)
        sockets = []
        for (host, port), address in zip(config.listen, config.web_listen_address):
            try:
                sockets.append(bind(host, port))
            except OSError as exc:
                for sock in sockets:
                    sock.close()
                raise OSError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        if self.poller.logs is not None:
            self.poller.logs.start()
        self._poll_thread = threading.Thread(target=self.poller.run, args=(self.stop,), name="poller", daemon=True)
        self._poll_thread.start()
        self._apply_probes(config)
        self.server = Server(self, sockets)
        self.server.start()
        log.info("ollama-exporter started", extra={
            "version": __version__, "url": redact_url(config.ollama_url), "interval": config.poll_interval,
            "listen": ",".join(config.web_listen_address)})

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the configuration files. The process is the daemon's
        now: its garbage collector is set up for it (no full walk of 2 000 models under a scrape), and its
        heaps are trimmed after a burst."""
        self.poller.after_poll = after_each_poll(lambda: self.poller.forgotten)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop.set())
        signal.signal(signal.SIGHUP, lambda signum, frame: self._reload_wanted.set())
        while not self.stop.wait(0.2):
            if self._reload_wanted.is_set():
                self._reload_wanted.clear()
                self.reload()
        log.info("shutting down")
        if self._prober_stop is not None:
            self._prober_stop.set()
        if self.server is not None:
            self.server.stop()
        self.targets.close()
        if self.poller.logs is not None:
            self.poller.logs.stop()  # writes the last checkpoint: a restart goes on from exactly here

    # --- what the HTTP server asks of the daemon ---

    @property
    def config(self) -> Config:
        return self.now.config

    @property
    def web(self) -> Optional[WebConfig]:
        return self.now.web

    def healthy(self) -> tuple[bool, str]:
        """Healthy while the poll loop runs and keeps publishing snapshots: a dead or stuck loop would
        leave /metrics serving frozen data, which a liveness check (Kubernetes, HEALTHCHECK) should restart."""
        if self._poll_thread is not None and not self._poll_thread.is_alive() and not self.stop.is_set():
            return False, "the poll loop has stopped"
        stalled = self.poller.stalled_for()
        if stalled is not None:
            return False, f"the poll loop has not finished a poll for {stalled:.0f}s"
        return True, "OK"

    def ready(self) -> tuple[bool, str]:
        """Ready once the first poll has finished, while the poll loop is healthy and rendering works."""
        alive, why = self.healthy()
        if not alive:
            return False, why
        if not self.exposition.snapshot.ready:
            return False, "waiting for the first poll"
        if not self.exposition.healthy:
            return False, "rendering the metrics failed; serving the last good exposition"
        return True, "OK"

    def probe(self, request: Request) -> Response:
        """/probe?target=...: another Ollama, scraped now (multitarget.py); refused unless allowed."""
        return self.targets.handle(request)

    # --- reload ---

    def reload(self) -> tuple[bool, str]:
        """Re-read the configuration files and apply them; returns (ok, what happened)."""
        with self._reload_lock:
            try:
                config = build_config(self.config_file, self.flags)
                web = load_web_config(config.web_config_file) if config.web_config_file else None
                self._apply(config, web)
            except ConfigError as exc:
                self._reloaded(ReloadStatus(False, self.poller.reload_status.last_success))
                log.error("reload failed, keeping the running configuration", extra={"error": str(exc)})
                return False, str(exc)
            self._reloaded(ReloadStatus(True, time.time()))
            log.info("configuration reloaded", extra={"path": self.config_file or ""})
            return True, "configuration reloaded"

    def _reloaded(self, status: ReloadStatus) -> None:
        """Record how the reload went; the metrics say so at once, and a poll with the new settings follows."""
        self.poller.reload_status = status
        current = self.exposition.snapshot
        if current.ready:
            self.exposition.update(dataclasses.replace(current, reload=status))
        self.poller.wake()

    def _apply(self, config: Config, web: Optional[WebConfig]) -> None:
        old = self.now.config
        if config.web_listen_address != old.web_listen_address:
            log.warning("listen addresses change only on restart, still listening on the old ones",
                        extra={"listen": ",".join(old.web_listen_address)})
        if config.gpu_enabled != old.gpu_enabled:
            self.poller.gpu, self.poller.gpu_off_state = make_gpu_source(config)
        client = self.now.client
        if (config.ollama_url, config.ollama_timeout, config.ollama_max_models, config.probes_forwarded_for) != \
                (old.ollama_url, old.ollama_timeout, old.ollama_max_models, old.probes_forwarded_for):
            client = make_client(config)
        if [getattr(config, k) for k in LOGS_KEYS] != [getattr(old, k) for k in LOGS_KEYS]:
            self._apply_logs(config)
        if (config.runners_enabled, config.ollama_timeout) != (old.runners_enabled, old.ollama_timeout):
            self.poller.runner_source = make_runner_source(config)
            self.poller.runners_required = config.runners_enabled == "true"
        logformat.setup(config.log_level, config.log_format)
        self.exposition.runtime_metrics = not config.web_disable_exporter_metrics
        self.now = _Running(config, client, web)
        self.poller.client, self.poller.interval = client, config.poll_interval
        self.poller.forget_after = config.poll_forget_after
        self.targets.configure(config)
        self._apply_probes(config)

    def _apply_logs(self, config: Config) -> None:
        """Another log source: the old follower writes its last checkpoint, the new one starts from its own."""
        old = self.poller.logs
        if old is not None:
            old.stop()
        self.poller.logs = make_log_follower(config)
        if self.poller.logs is not None:
            self.poller.logs.start()

    def _apply_probes(self, config: Config) -> None:
        """Start, stop or reconfigure the prober to match `config`."""
        if self.prober is not None and (not config.probes_enabled or self.prober.client is not self.now.client):
            self._prober_stop.set()
            self.prober, self.poller.probe_stats = None, None
        if not config.probes_enabled:
            return
        if self.prober is None:
            self.prober = Prober(self.now.client, config, lambda: self.poller.snapshot)
            self.poller.probe_stats = self.prober.stats
            self._prober_stop = threading.Event()
            threading.Thread(target=self.prober.run, args=(self._prober_stop,), name="prober", daemon=True).start()
        else:
            self.prober.config = config
