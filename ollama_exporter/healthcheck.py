"""`python -m ollama_exporter.healthcheck [URL]`: exit 0 if the exporter on this host answers `/-/healthy`.

The container image's HEALTHCHECK runs this, because the image has no curl. Without a URL it asks
`http://127.0.0.1:<port>/-/healthy`, the port taken from OLLAMA_EXPORTER_WEB_LISTEN_ADDRESS (default
:9778; the first of a comma-separated list), so moving the port with that variable moves the check
too. Pass a URL for anything else (an `https://` listener, a port set with the flag). A 401 counts as
alive: with basic auth on, every path asks for credentials, and a liveness check only needs to know
that the process answers. The certificate of an
https URL is not verified: this is a loopback liveness check, not a trust decision. Exit status 1 (what
Docker and Podman read as unhealthy) comes with one line saying why.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from typing import Optional, Sequence

from ollama_exporter.config import KEYS_BY_NAME, Config, ConfigError, env_name, parse_listen_address

ENV_LISTEN_ADDRESS = env_name(KEYS_BY_NAME["web.listen_address"])
DEFAULT_LISTEN_ADDRESS = Config.web_listen_address[0]
TIMEOUT_SECONDS = 4.0  # under the image's HEALTHCHECK --timeout, so the reason gets printed
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def default_url(listen_address: str) -> str:
    """The loopback URL of `/-/healthy` for the first of the listen addresses (`:9778`, `[::]:9778,:9100`)."""
    host, port = parse_listen_address(listen_address.split(",")[0], ENV_LISTEN_ADDRESS)
    host = WILDCARDS.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/-/healthy"


def check(url: str, timeout: float = TIMEOUT_SECONDS) -> Optional[str]:
    """None if the exporter at `url` answers 200 (or 401: alive behind basic auth), else the reason."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, timed out, TLS mismatch, a malformed URL
        reason = getattr(exc, "reason", exc)
        return f"{url}: {reason}"
    return None if status in (200, 401) else f"{url}: HTTP {status}"


def main(argv: Sequence[str] = (), environ: Optional[dict] = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        url = argv[0] if argv else default_url(environ.get(ENV_LISTEN_ADDRESS) or DEFAULT_LISTEN_ADDRESS)
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    problem = check(url)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
