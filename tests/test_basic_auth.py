"""Basic auth: the toolkit's users and passwords, no user-name oracle, a bounded cache that needs no
bcrypt, and one bcrypt computation at a time in the whole process. bcrypt is the real one throughout;
`recording` only watches its calls. Timings are in benchmarks/bench_basic_auth.py."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import bcrypt
import pytest

from ollama_exporter import basic_auth
from ollama_exporter.basic_auth import CACHE_SIZE, BasicAuth
from ollama_exporter.webconfig import load_web_config

TOOLKIT = Path(__file__).resolve().parent / "fixtures" / "web-config"


def basic(user: str | bytes, password: str | bytes) -> str:
    raw = (user.encode() if isinstance(user, str) else user) + b":" + (
        password.encode() if isinstance(password, str) else password)
    return "Basic " + base64.b64encode(raw).decode()


def cheap_hash(password: bytes) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)


@pytest.fixture
def recording(monkeypatch):
    """Every real bcrypt.checkpw call: the cost of the hash it ran, and how many ran at once at most."""
    calls: list[int] = []
    state = {"running": 0, "most": 0}
    lock = threading.Lock()
    real = bcrypt.checkpw

    def checkpw(password: bytes, hashed: bytes) -> bool:
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
            calls.append(int(hashed[4:6]))
        try:
            return real(password, hashed)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(basic_auth.bcrypt, "checkpw", checkpw)
    return calls, state


def test_the_toolkit_users_and_passwords():
    auth = load_web_config(str(TOOLKIT / "web_config_users_noTLS.good.yml")).auth
    assert auth.check(basic("dave", "dave123")) and auth.check(basic("carol", "carol123"))
    assert not auth.check(basic("dave", "bad"))
    assert not auth.check(basic("nonexistent", "nonexistent"))


def test_an_unknown_user_costs_one_bcrypt_at_the_users_cost(recording):
    calls, _ = recording
    auth = load_web_config(str(TOOLKIT / "web_config_users_noTLS.good.yml")).auth  # costs 12, 18, 10, 10
    assert not auth.check(basic("nobody", "dave123"))
    assert not auth.check(basic("dave", "wrong"))
    assert calls == [10, 10]  # the most common cost: as long as carol's or dave's wrong password
    same = BasicAuth({"a": cheap_hash(b"x"), "b": cheap_hash(b"y")})
    calls.clear()
    assert not same.check(basic("nobody", "x"))
    assert calls == [4]


def test_the_dummy_hash_accepts_no_password_not_even_for_a_user_named_like_it(recording):
    auth = BasicAuth({"a": cheap_hash(b"x")})
    assert not auth.check(basic("", ""))
    assert not auth.check(basic("b", "x"))  # right password, unknown user


def test_answers_are_cached_without_bcrypt_successes_and_failures_apart(recording):
    calls, _ = recording
    auth = BasicAuth({"prometheus": cheap_hash(b"scrape")})
    good, bad = basic("prometheus", "scrape"), basic("prometheus", "nope")
    assert auth.cached(good) is None and auth.cached(bad) is None
    assert auth.check(good) and not auth.check(bad)
    assert len(calls) == 2
    assert auth.cached(good) is True and auth.cached(bad) is False
    assert auth.check(good) and not auth.check(bad)
    assert len(calls) == 2  # the second round needed no bcrypt
    for i in range(CACHE_SIZE * 2):  # a flood of wrong passwords fills the failure cache only
        auth.check(basic("prometheus", f"guess-{i}"))
    assert len(auth._bad) == CACHE_SIZE and len(auth._good) == 1
    assert auth.cached(good) is True  # the scraper's entry survived the flood


def test_malformed_headers_are_refused_without_bcrypt(recording):
    calls, _ = recording
    auth = BasicAuth({"prometheus": cheap_hash(b"scrape")})
    for header in (None, "", "Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(),
                   "Basic " + base64.b64encode(b"prometheus:scrape").decode().rstrip("=")[:-1]):
        assert auth.cached(header) is False and auth.check(header) is False
    assert calls == []
    assert auth.check("basic " + base64.b64encode(b"prometheus:scrape").decode())  # the scheme is case-insensitive


def test_the_cache_key_cannot_be_forged_across_the_user_password_boundary(recording):
    """CVE-2022-46146 came from a cache key two different credentials could share."""
    auth = BasicAuth({"ab": cheap_hash(b"c"), "a": cheap_hash(b"other")})
    assert auth.check(basic("ab", "c"))
    assert auth.cached(basic("a", "bc")) is None and not auth.check(basic("a", "bc"))
    assert auth.cached(basic("ab", "c")) is True


def test_passwords_over_72_bytes_are_truncated_like_htpasswd_and_go(recording):
    auth = BasicAuth({"long": cheap_hash(b"p" * 72)})
    assert auth.check(basic("long", b"p" * 80))
    assert not auth.check(basic("long", b"p" * 71))


def test_a_flood_of_wrong_passwords_runs_one_bcrypt_at_a_time_across_the_process(recording):
    calls, state = recording
    auths = [BasicAuth({"prometheus": cheap_hash(b"scrape")}) for _ in range(2)]  # e.g. old and new config
    start = threading.Barrier(8)

    def flood(n: int) -> None:
        start.wait()
        for i in range(4):
            assert not auths[n % 2].check(basic("prometheus" if i % 2 else "ghost", f"wrong-{n}-{i}"))

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 32 and state["most"] == 1
