"""A fake runner for tests: llama-server's GET /props and /slots (Ollama v0.30+), or the old C++ runner's
GET /health with slot counts (v0.1.32-v0.3.x), on real HTTP over 127.0.0.1, plus a process whose command
line is that runner's (`llama-server --model <blob> --port N`), which is how the exporter finds it.

Shapes follow llama.cpp's server (2026 builds, as Ollama pins them): /props has `total_slots`,
`model_path`, `default_generation_settings.n_ctx` and `endpoint_slots`; each /slots entry has `id`,
`n_ctx`, `speculative`, `is_processing` and, for the current task, `id_task`, `n_prompt_tokens`,
`n_prompt_tokens_processed`, `n_prompt_tokens_cache`, `params` and `next_token`, which is an array of one
object in 2026 code and an object in older builds (`next_token_shape`). No prompt text: that needs
LLAMA_SERVER_SLOTS_DEBUG, which Ollama does not set. Every request is recorded, so tests can prove the
exporter never asks for /metrics and never writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

MODELS = "/usr/share/ollama/.ollama/models/blobs"


@dataclass
class FakeSlot:
    n_ctx: int = 4096
    task: Optional[int] = None  # processing this task id when set
    prompt_tokens: int = 0
    decoded: int = 0


@dataclass
class FakeLlamaServer:
    blob: str
    n_slots: int = 1
    n_ctx: int = 4096
    kind: str = "llama-server"  # or "old" (C++ ollama_llama_server: /health with slot counts)
    next_token_shape: str = "list"  # "list" (2026) or "object" (older builds)
    slots_status: int = 200  # 501: /slots turned off (LLAMA_ARG_ENDPOINT_SLOTS=0); 401: an API key is set
    delay: float = 0.0  # seconds before answering /slots (a long prefill holds the server loop)
    requests: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [FakeSlot(self.n_ctx) for _ in range(self.n_slots)]
        self.lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._proc: Optional[subprocess.Popen] = None
        self.port = 0

    # --- control ---

    def busy(self, slot: int, task: int, prompt_tokens: int = 100, decoded: int = 10) -> None:
        with self.lock:
            self.slots[slot] = FakeSlot(self.n_ctx, task, prompt_tokens, decoded)

    def idle(self, slot: int) -> None:
        with self.lock:
            self.slots[slot] = FakeSlot(self.n_ctx)

    def start(self, argv0: str = "/usr/lib/ollama/llama-server", extra_args: tuple[str, ...] = ()) -> "FakeLlamaServer":
        """Serve on a free loopback port and start the process whose argv names that port (`extra_args`
        before --model, e.g. ("runner", "--ollama-engine") for a Go runner's command line)."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append(("GET", self.path))
                fake._get(self)

            def _other(self) -> None:
                fake.requests.append((self.command, self.path))
                self._send(405, {"error": "method not allowed"})

            do_POST = do_PUT = do_DELETE = _other

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        args = ["--model", f"{MODELS}/sha256-{self.blob}", "--port", str(self.port), "--host", "127.0.0.1",
                "-c", str(self.n_ctx * self.n_slots), "-np", str(self.n_slots)]
        self._proc = subprocess.Popen([argv0, "-c", "import time; time.sleep(600)", *extra_args, *args],
                                      executable=sys.executable)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{self._proc.pid}/cmdline", "rb") as fh:
                if b"--port" in fh.read():
                    break
            time.sleep(0.01)
        return self

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else 0

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- endpoints ---

    def _get(self, h: Any) -> None:
        path = h.path.split("?")[0]
        if self.kind == "old":
            if path == "/health":
                with self.lock:
                    busy = sum(1 for s in self.slots if s.task is not None)
                return h._send(200, {"status": "ok", "slots_idle": self.n_slots - busy, "slots_processing": busy})
            return h._send(404, {"error": "not found"})
        if path == "/health":
            return h._send(200, {"status": "ok"})
        if path == "/props":
            return h._send(200, {"default_generation_settings": {"n_ctx": self.n_ctx}, "total_slots": self.n_slots,
                                 "model_path": f"{MODELS}/sha256-{self.blob}", "model_alias": "", "endpoint_slots":
                                 self.slots_status != 501, "endpoint_metrics": False, "build_info": "b10488-cd3704409"})
        if path == "/slots":
            if self.delay:
                time.sleep(self.delay)
            if self.slots_status != 200:
                return h._send(self.slots_status, {"error": {"code": self.slots_status, "message": "unavailable"}})
            with self.lock:
                return h._send(200, [self._slot_json(i, s) for i, s in enumerate(self.slots)])
        return h._send(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def _slot_json(self, i: int, s: FakeSlot) -> dict:
        body: dict[str, Any] = {"id": i, "n_ctx": s.n_ctx, "speculative": False, "is_processing": s.task is not None}
        if s.task is not None:
            token = {"has_next_token": True, "has_new_line": False, "n_remain": -1, "n_decoded": s.decoded}
            body.update({"id_task": s.task, "n_prompt_tokens": s.prompt_tokens,
                         "n_prompt_tokens_processed": s.prompt_tokens, "n_prompt_tokens_cache": 0,
                         "params": {"temperature": 0.8, "top_k": 40, "n_predict": -1},
                         "next_token": [token] if self.next_token_shape == "list" else token})
        return body
