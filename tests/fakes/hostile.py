"""A scripted HTTP server on loopback: it answers each request with exactly the bytes (and pauses) a test
gives it, so tests can be the upstream an exporter should survive — one header byte a second, a body
that never ends, a gzip bomb, a redirect to another host, 100 000 rows, NaN, lone surrogates — as well
as replay captured Ollama bodies byte for byte.

    with ScriptedServer() as up:
        up.reply("GET", "/api/ps", body=fixture.read_bytes())
        up.script("GET", "/api/version", drip(head(200, b'{"version":"0.30.0"}'), every=1.0))
        OllamaClient(up.url, 5).ps()

Every script is finite and every connection is closed when the server stops (tests are bounded).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Union

Step = Union[bytes, float]  # bytes to send, or seconds to wait
Script = Iterable[Step]
Handler = Callable[["Request"], Script]


class Request:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes):
        self.method, self.path, self.headers, self.body = method, path, headers, body


def head(status: int, body: bytes = b"", content_type: str = "application/json; charset=utf-8",
         extra: Optional[dict[str, str]] = None, length: Optional[int] = None) -> bytes:
    """A whole HTTP/1.1 response (status line, headers, body) as Go's net/http would frame it."""
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}",
             f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def drip(data: bytes, every: float, size: int = 1) -> Iterator[Step]:
    """`data` in pieces of `size` bytes, `every` seconds apart."""
    for i in range(0, len(data), size):
        yield data[i : i + size]
        yield every


class ScriptedServer:
    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[Request] = []
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-server", daemon=True)

    # --- what to answer ---

    def script(self, method: str, path: str, steps: Union[Script, Handler]) -> None:
        """Answer `method path` with `steps` (or with what `steps(request)` returns, for a fresh script)."""
        self.routes[(method, path)] = steps if callable(steps) else (lambda _r, s=list(steps): s)

    def reply(self, method: str, path: str, status: int = 200, body: bytes = b"", **kwargs) -> None:
        self.script(method, path, [head(status, body, **kwargs)])

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    # --- serving ---

    def start(self) -> "ScriptedServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in list(self._conns):
            try:
                conn.close()
            except OSError:
                pass

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            request = self._read(conn)
            if request is None:
                return
            self.requests.append(request)
            handler = self.routes.get((request.method, request.path))
            steps = handler(request) if handler else [head(404, b"404 page not found", "text/plain")]
            for step in steps:
                if self._stop.is_set():
                    return
                if isinstance(step, (int, float)):
                    self._stop.wait(step)
                else:
                    conn.sendall(step)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _read(conn: socket.socket) -> Optional[Request]:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        return Request(method, target.split("?", 1)[0], headers, rest[:length])


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False
