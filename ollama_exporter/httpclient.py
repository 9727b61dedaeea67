"""A small HTTP/1.1 client whose deadline is a deadline: connecting, sending, the status line, every
header and every byte of the body must all arrive before it, or the socket is closed.

Ordinary clients (requests, urllib3) bound each socket read, not the whole exchange, so a server that
sends one header byte per second keeps a call alive forever and, with it, the source it reads. Here
every socket operation waits at most for what is left of the deadline. The answer is read into
memory only up to a size cap per call, compressed answers are refused (we ask for none, so a
decompression bomb never starts), and redirects are followed only within the same origin (another
host's models must never be reported as ours). http.client does the parsing (status line, headers
with its own line and count limits, chunked bodies).
"""

from __future__ import annotations

import base64
import http.client
import io
import socket
import ssl
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional
from urllib.parse import unquote, urljoin, urlsplit

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3


class HttpError(Exception):
    """A failed exchange; `reason` is timeout, connection or invalid_response."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class _DeadlineSocket:
    """The socket methods http.client uses, each waiting at most until `deadline` (time.monotonic)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline
        self._readers = 0  # like socket.makefile: the socket stays open while a reader of it is open
        self._closed = False

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self._left())
        self.sock.sendall(data)

    def recv_into(self, buffer, size: int = 0) -> int:
        self.sock.settimeout(self._left())
        return self.sock.recv_into(buffer, size)

    def makefile(self, mode: str = "rb", buffering: int = -1) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_Reader(self), 65536)

    def close(self) -> None:
        self._closed = True
        if self._readers <= 0:
            self.sock.close()

    def reader_closed(self) -> None:
        self._readers -= 1
        if self._closed and self._readers <= 0:
            self.sock.close()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)


class _Reader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket):
        self.sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self.sock.reader_closed()
        super().close()


class _Connection(http.client.HTTPConnection):
    def __init__(self, scheme: str, host: str, port: int, deadline: float, tls: Optional[ssl.SSLContext]):
        super().__init__(host, port)
        self.scheme, self.deadline, self.tls = scheme, deadline, tls

    def connect(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        sock = socket.create_connection((self.host, self.port), timeout=left)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                sock.settimeout(max(0.001, self.deadline - time.monotonic()))
                sock = (self.tls or ssl.create_default_context()).wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = _DeadlineSocket(sock, self.deadline)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


class HttpClient:
    """Calls to one base URL (which may carry user:password for basic auth, and a path prefix)."""

    def __init__(self, base_url: str, user_agent: str, tls: Optional[ssl.SSLContext] = None):
        parts = urlsplit(base_url)
        self.base = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
        self.origin = _origin(self.base)
        self.headers = {"User-Agent": user_agent, "Accept": "application/json", "Accept-Encoding": "identity"}
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        self.tls = tls

    def request(self, method: str, path: str, body: Optional[bytes] = None, *, timeout: float,
                max_bytes: int, headers: Optional[Mapping[str, str]] = None) -> Answer:
        """One exchange, body read whole (up to `max_bytes`), all within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.open(method, path, body, deadline=deadline, headers=headers) as response:
            data = b"".join(_chunks(response, max_bytes, path))
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)

    def stream(self, method: str, path: str, body: Optional[bytes] = None, *, timeout: float,
               max_bytes: int, headers: Optional[Mapping[str, str]] = None) -> Iterator[bytes]:
        """The body as it arrives, chunk by chunk (as the server flushes it), under one deadline.

        Raises HttpError before the first chunk for an HTTP error status: read `error_body` from it.
        """
        deadline = time.monotonic() + timeout
        with self.open(method, path, body, deadline=deadline, headers=headers) as response:
            if response.status >= 400:
                raise StatusError(response.status, b"".join(_chunks(response, 65536, path)))
            yield from _chunks(response, max_bytes, path)

    @contextmanager
    def open(self, method: str, path: str, body: Optional[bytes], *, deadline: float,
             headers: Optional[Mapping[str, str]] = None) -> Iterator[http.client.HTTPResponse]:
        url = self.base + path
        for _ in range(MAX_REDIRECTS + 1):
            conn = self._connection(url, deadline)
            try:
                response = self._send(conn, method, url, body, headers)
                if response.status in REDIRECTS and response.getheader("Location"):
                    url, method, body = self._redirect(response, url, method, body)
                    conn.close()
                    continue
                encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
                if encoding != "identity":
                    raise HttpError("invalid_response", f"{path}: compressed answer (Content-Encoding: "
                                                        f"{encoding[:20]}) though none was asked for")
                yield response
                return
            except HttpError:
                raise
            except (TimeoutError, socket.timeout):
                raise HttpError("timeout", f"{path}: not answered within the deadline") from None
            except ssl.SSLError as exc:
                raise HttpError("connection", f"{path}: TLS with {self.base} failed: {exc.reason or exc}") from None
            except (http.client.LineTooLong, http.client.BadStatusLine, http.client.UnknownProtocol) as exc:
                raise HttpError("invalid_response", f"{path}: not an HTTP answer: {str(exc)[:80]}") from None
            except http.client.HTTPException as exc:
                if "more than" in str(exc):  # "got more than 100 headers"
                    raise HttpError("invalid_response", f"{path}: {exc}") from None
                raise HttpError("connection", f"{path}: connection to {self.base} failed: "
                                              f"{type(exc).__name__} {str(exc)[:80]}") from None
            except OSError as exc:
                raise HttpError("connection", f"{path}: connection to {self.base} failed: "
                                              f"{exc.strerror or type(exc).__name__}") from None
            finally:
                conn.close()
                if "response" in locals():
                    response.close()  # closes its reader, and with it the socket
        raise HttpError("invalid_response", f"{path}: more than {MAX_REDIRECTS} redirects")

    def _connection(self, url: str, deadline: float) -> _Connection:
        scheme, host, port = _origin(url)
        return _Connection(scheme, host, port, deadline, self.tls)

    def _send(self, conn: _Connection, method: str, url: str, body: Optional[bytes],
              headers: Optional[Mapping[str, str]]) -> http.client.HTTPResponse:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        all_headers = {**self.headers, **(headers or {}), "Connection": "close"}
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        conn.request(method, target, body=body, headers=all_headers)
        return conn.getresponse()

    def _redirect(self, response: http.client.HTTPResponse, url: str, method: str,
                  body: Optional[bytes]) -> tuple[str, str, Optional[bytes]]:
        target = urljoin(url, response.getheader("Location", ""))
        if _origin(target) != self.origin:
            shown = "{}://{}:{}".format(*_origin(target))[:100]
            raise HttpError("invalid_response", f"{urlsplit(url).path}: redirected to another origin ({shown}); "
                                                "not followed")
        if response.status == 303 or (response.status in (301, 302) and method != "GET"):
            return target, "GET", None
        return target, method, body


class StatusError(HttpError):
    """An HTTP error status, with the (capped) body the server sent along."""

    def __init__(self, status: int, body: bytes):
        super().__init__("http_5xx" if status >= 500 else "http_4xx", f"HTTP {status}")
        self.status, self.body = status, body


def _chunks(response: http.client.HTTPResponse, max_bytes: int, path: str) -> Iterator[bytes]:
    """The body in the pieces the server sent (read1), refusing to hold more than `max_bytes` of it."""
    total = 0
    while True:
        chunk = response.read1(65536)
        if not chunk:
            if response.length:  # Content-Length promised more than arrived before the server closed
                raise HttpError("connection", f"{path}: the answer ended {response.length} bytes short")
            return
        total += len(chunk)
        if total > max_bytes:
            raise HttpError("invalid_response", f"{path}: answer larger than {max_bytes} bytes")
        yield chunk
