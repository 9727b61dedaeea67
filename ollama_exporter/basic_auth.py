"""HTTP basic auth against bcrypt hashes, as exporter-toolkit does it, without its two weak spots.

- No user-name oracle: an unknown user is checked against a dummy hash of the users' usual cost, so
  "no such user" takes as long as "wrong password".
- No CPU flood: one bcrypt check at a time in the whole process (`_BCRYPT`), so a stream of wrong
  passwords costs at most one core, never all of them.
- A bounded cache of recent answers so a scrape every few seconds pays bcrypt's deliberate cost once.
  The key is a SHA-256 over the length-framed user, stored hash and password: no two different
  triples share a key (the concatenation mix-up behind CVE-2022-46146 cannot happen), a changed hash
  misses, and no plain password is kept. Successes and failures have separate caches, so a flood of
  wrong passwords cannot evict the scraper's cached success.

`cached()` answers from the cache or the header's syntax alone (never bcrypt): safe on an event loop.
`check()` may run bcrypt: blocking, for a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import threading
from collections import Counter, OrderedDict
from typing import Mapping, Optional

import bcrypt

CACHE_SIZE = 100  # per kind (successes, failures); the toolkit keeps 100 in all
PREFIXES = ("$2a$", "$2b$", "$2y$")
MAX_PASSWORD = 72  # bcrypt reads at most 72 bytes; htpasswd and Go truncate, bcrypt>=5 would raise

_BCRYPT = threading.Lock()  # process-wide: at most one bcrypt computation at a time


def hash_problem(value: object) -> Optional[str]:
    """Why `value` is not a usable bcrypt hash, or None. Cheap: the salt is tried at cost 4."""
    if not isinstance(value, str) or not value.startswith(PREFIXES) or len(value) != 60 or value[6] != "$":
        return "expected a bcrypt hash ($2y$10$ and 53 more characters), not a plain password"
    cost = value[4:6]
    if not cost.isdigit() or not 4 <= int(cost) <= 31:
        return f"bcrypt cost {cost!r} must be a number from 04 to 31"
    try:
        bcrypt.hashpw(b"", (value[:4] + "04" + value[6:29]).encode())
    except ValueError:
        return "invalid bcrypt salt"
    return None


def parse_header(header: Optional[str]) -> Optional[tuple[bytes, bytes]]:
    """(user, password) from `Authorization: Basic ...`, or None when absent or malformed."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:], validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


def _framed_sha256(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


class BasicAuth:
    """Checks `Authorization: Basic` headers against {user: bcrypt hash}."""

    def __init__(self, users: Mapping[str, str]):
        self.users = {user.encode(): hashed.encode() for user, hashed in users.items()}
        # The dummy for unknown users costs what most users cost (ties: the cheaper); its random
        # salt and hash mean no password matches it, and it is never a known user's answer anyway.
        cost = min(Counter(h[4:6] for h in self.users.values()).most_common(),
                   key=lambda item: (-item[1], item[0]))[0] if self.users else b"10"
        salt = bcrypt.gensalt(int(cost))  # cheap: no hashing
        self._dummy = salt + bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(4))[29:]
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()  # guards the caches only, never held during bcrypt

    def cached(self, header: Optional[str]) -> Optional[bool]:
        """The answer if it needs no bcrypt (malformed header, or seen recently), else None."""
        parsed = parse_header(header)
        if parsed is None:
            return False
        return self._lookup(self._key(*parsed))

    def check(self, header: Optional[str]) -> bool:
        """True if the header names a user and that user's password. Blocking (bcrypt)."""
        parsed = parse_header(header)
        if parsed is None:
            return False
        user, password = parsed
        key = self._key(user, password)
        answer = self._lookup(key)
        if answer is not None:
            return answer
        hashed = self.users.get(user)
        with _BCRYPT:
            answer = self._lookup(key)  # another thread may have just checked the same credentials
            if answer is None:
                try:
                    matches = bcrypt.checkpw(password[:MAX_PASSWORD], hashed or self._dummy)
                except ValueError:  # a hash that passed hash_problem() but bcrypt still refuses
                    matches = False
                answer = matches and hashed is not None
                self._remember(key, answer)
        return answer

    def _key(self, user: bytes, password: bytes) -> bytes:
        return _framed_sha256(user, self.users.get(user, self._dummy), password)

    def _lookup(self, key: bytes) -> Optional[bool]:
        with self._lock:
            for cache, answer in ((self._good, True), (self._bad, False)):
                if key in cache:
                    cache.move_to_end(key)
                    return answer
        return None

    def _remember(self, key: bytes, answer: bool) -> None:
        cache = self._good if answer else self._bad
        with self._lock:
            cache[key] = None
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
