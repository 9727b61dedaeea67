"""A real Alertmanager (Debian's `prometheus-alertmanager`) on loopback, and a webhook receiver for it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from tests.services import ServiceProcess


class WebhookReceiver:
    """Collects the notifications Alertmanager posts (its webhook JSON), in arrival order."""

    def __init__(self):
        self.notifications: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.notifications.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, name: str, status: str) -> list[dict]:
        """Every alert named `name` delivered with `status` ("firing" or "resolved")."""
        return [a for n in self.notifications for a in n["alerts"]
                if a["labels"].get("alertname") == name and a["status"] == status]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Alertmanager(ServiceProcess):
    """Routes every alert to one webhook, grouping and repeating fast enough for a test."""

    def __init__(self, workdir: Path, webhook_url: str):
        config = {
            "route": {"receiver": "test", "group_by": ["alertname", "instance"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "test", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "alertmanager.yml").write_text(yaml.safe_dump(config))
        super().__init__(("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager", workdir,
                         [f"--config.file={workdir / 'alertmanager.yml'}", f"--storage.path={workdir / 'data'}",
                          "--cluster.listen-address="])
