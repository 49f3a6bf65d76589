"""README "How a request flows"'s checks as pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metadata_proxy import guards
from metadata_proxy.config import Limits, ListenAddress, Route
from metadata_proxy.limits import Limiter
from metadata_proxy.sessions import SessionTokens

ALLOWED = guards.allowed_hosts(
    [ListenAddress("169.254.169.254", 80), ListenAddress("fd00:a9fe::254", 80)], ["Metadata.Internal"]
)


@pytest.mark.parametrize(
    "host",
    [
        b"169.254.169.254",
        b"169.254.169.254:80",
        b"[fd00:a9fe::254]",
        b"[fd00:a9fe::254]:80",
        b"[FD00:A9FE:0::254]:80",
        b"metadata.internal",
        b"METADATA.internal",
    ],
)
def test_host_accepted(host: bytes) -> None:
    assert guards.check_host(host, ALLOWED) is None


@pytest.mark.parametrize(
    "host",
    [
        None,
        b"",
        b"evil.example",
        b"169.254.169.254:8080",
        b"169.254.169.254.evil.example",
        b"fd00:a9fe::254",
        b"[fd00:a9fe::254",
        b"127.0.0.1",
        b"169.254.169.254:80:80",
        b"metadata.internal.",
    ],
)
def test_host_refused(host: bytes | None) -> None:
    assert guards.check_host(host, ALLOWED) is guards.BAD_HOST


@pytest.mark.parametrize(
    "path",
    [b"/runtime/x", b"/runtime/a%20b", b"/runtime/%7Euser", b"/runtime/caf%C3%A9", b"/runtime/100%", b"/runtime//x"],
)
def test_path_accepted(path: bytes) -> None:
    assert guards.check_path(path) is None


@pytest.mark.parametrize(
    "path",
    [
        b"/runtime/../metadata/v1/instance",
        b"/runtime/./x",
        b"/runtime/..",
        b"/runtime/%2e%2e/x",
        b"/runtime/%2E%2e/x",
        b"/runtime/%252e%252e/x",
        b"/runtime/%25252e%25252e/x",
        b"/runtime/a%2Fb",
        b"/runtime/a%252Fb",
        b"/runtime/a%5c..%5cb",
        b"/runtime/a\\b",
        b"/runtime/%00",
        b"/runtime/%0d%0aX-Injected:%201",
        b"/runtime/%7f",
        b"/runtime/%ff",
        b"/runtime/\xff",
        b"runtime/x",
        b"/runtime/%2525252525252e",
    ],
)
def test_path_refused(path: bytes) -> None:
    assert guards.check_path(path) is guards.BAD_PATH


def test_percent_decoding_is_followed_for_three_rounds_and_no_further() -> None:
    """Each round is checked: a path clean after three rounds passes (a client that encoded
    an already encoded name twice more); one still encoded after them is refused, whatever
    it decodes to, rather than forwarded with rounds nobody looked at."""
    assert guards.check_path(b"/runtime/a%252520b") is None  # -> %2520 -> %20 -> " "
    assert guards.check_path_fully(b"/runtime/a%252520b") is None
    assert guards.check_path(b"/runtime/a%25252520b") is guards.BAD_PATH  # a fourth round needed


# Pieces a path is built from: plain ones (what the fast path lets through), and the bytes
# and escapes each part of the full check looks for, encoded once or twice, in both cases.
_PLAIN_PIECES = [b"/", b"a", b"runtime", b"-", b"~", b"_", b"x1", b";", b"=", b"?", b"!", b"@"]
_ODD_PIECES = [
    *(b".", b"..", b"%", b"%2e", b"%2E", b"%252e", b"%2f", b"%2F", b"%252f", b"%5c", b"%5C", b"\\"),
    *(b"%00", b"%0a", b"%7f", b"%ff", b"%c3%a9", b"%C3", b"\x00", b"\x1f", b"\x7f", b"\x80", b"\xff"),
    *("é".encode(), "．".encode(), "／".encode(), "＼".encode(), b"%25", b"%%", b"%2", b"%zz"),
]
_PATHS = st.lists(
    st.one_of(st.sampled_from(_PLAIN_PIECES), st.sampled_from(_ODD_PIECES), st.binary(max_size=3)), max_size=12
).map(lambda pieces: b"".join(pieces))


@settings(max_examples=2000, deadline=None, database=None)
@given(st.one_of(_PATHS, _PATHS.map(lambda path: b"/" + path)))
def test_the_fast_path_check_agrees_with_the_full_check(path: bytes) -> None:
    """A path the fast path lets through that the full check refuses would be forwarded with
    the VM's token attached: the two must give the same answer for every path."""
    assert guards.check_path(path) is guards.check_path_fully(path)


def test_route_match_is_longest_prefix() -> None:
    routes = [Route("/runtime/"), Route("/runtime/public/", "none")]
    assert guards.match_route(b"/runtime/public/x", routes) == routes[1]
    assert guards.match_route(b"/runtime/x", routes) == routes[0]
    assert guards.match_route(b"/runtime", routes) is None
    assert guards.match_route(b"/other/", routes) is None
    # As a case-insensitive control plane reads it: under another route, so under none.
    assert guards.match_route(b"/runtime/PUBLIC/x", routes) is None
    assert guards.match_route(b"/runtime/Public", routes) is None
    assert guards.match_route(b"/runtime/Other/x", routes) == routes[0]  # the same route either way
    mixed = [Route("/runtime/"), Route("/runtime/Secret/", privileged_port=True)]
    assert guards.match_route(b"/runtime/secret/x", mixed) is None  # a lower-case path folds into the prefix
    assert guards.match_route(b"/runtime/Secret/x", mixed) == mixed[1]
    assert guards.match_route(b"/runtime/SECRET/x", mixed) is None


def test_headers_checks() -> None:
    assert guards.check_headers([(b"x-forwarded-for", b"1.2.3.4")]) is guards.FORWARDED
    assert guards.check_headers([(b"forwarded", b"for=1.2.3.4")]) is guards.FORWARDED
    assert guards.check_headers([(b"x-real-ip", b"1.2.3.4")]) is guards.FORWARDED
    assert guards.check_headers([(b"x-big", b"a" * 33000)]) is guards.HEADERS_TOO_LARGE
    assert guards.check_headers([(b"x-ok", b"a" * 30000)]) is None
    both = [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")]
    assert guards.check_headers(both) is guards.BAD_FRAMING
    assert guards.check_headers([(b"content-length", b"5"), (b"content-length", b"6")]) is guards.BAD_FRAMING
    chunked = [(b"transfer-encoding", b"chunked")]
    for method in ("GET", "HEAD"):  # a body never forwarded nor counted: refused when its length is unknown
        assert guards.check_headers(chunked, method) is guards.CHUNKED_WITHOUT_BODY
        assert guards.check_headers([(b"content-length", b"5")], method) is None  # counted by its length
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        assert guards.check_headers(chunked, method) is None


def test_metadata_header() -> None:
    assert guards.check_metadata_header([(b"metadata", b"true")]) is None
    assert guards.check_metadata_header([(b"metadata", b"True")]) is None
    assert guards.check_metadata_header([]) is guards.MISSING_METADATA
    assert guards.check_metadata_header([(b"metadata", b"false")]) is guards.MISSING_METADATA
    assert guards.check_metadata_header([(b"metadata", b"true"), (b"metadata", b"true")]) is guards.MISSING_METADATA


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"1", 1),
        (b"21600", 21600),
        (b"0", None),
        (b"21601", None),
        (b"-1", None),
        (b"abc", None),
        (b"1.5", None),
        (b"", None),
        (None, None),
        (b"0000001", None),
    ],
)
def test_ttl(value: bytes | None, expected: int | None) -> None:
    assert guards.parse_ttl(value) == expected


def test_session_tokens_bound_to_vm_and_expiry() -> None:
    now = [1000.0]
    sessions = SessionTokens(clock=lambda: now[0])
    token = sessions.issue("vm-a", "id-a", 10).encode()
    assert sessions.valid(token, "vm-a", "id-a")
    assert not sessions.valid(token, "vm-b", "id-b")
    assert not sessions.valid(token, "vm-a", "id-other")
    assert not sessions.valid(token, "vm-other", "id-a")  # the same id under another name: another VM
    assert not sessions.valid(token[:-2] + b"xx", "vm-a", "id-a")
    version, expiry, nonce, mac = token.split(b".")
    assert not sessions.valid(b".".join([version, b"99999999", nonce, mac]), "vm-a", "id-a")
    assert not sessions.valid(SessionTokens().issue("vm-a", "id-a", 10).encode(), "vm-a", "id-a")
    now[0] += 10
    assert not sessions.valid(token, "vm-a", "id-a")
    assert not sessions.valid(b"garbage", "vm-a", "id-a")
    assert not sessions.valid(None, "vm-a", "id-a")


def test_limiter_bucket_and_concurrency() -> None:
    now = [0.0]
    limiter = Limiter(Limits(requests_per_second=2, burst=3, max_concurrent=2), clock=lambda: now[0])
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") == 1  # two in flight
    limiter.release("a")
    limiter.release("a")
    assert limiter.acquire("a") is None  # third token of the burst
    limiter.release("a")
    assert limiter.acquire("a") == 1  # bucket empty: 1 token needs 0.5 s, rounded up
    assert limiter.acquire("b") is None  # another VM is untouched
    limiter.release("b")
    now[0] += 0.5
    assert limiter.acquire("a") is None
    limiter.release("a")
    assert limiter.acquire("a") == 1  # 0.5 s at 2 per second was one token, no more
    now[0] += 100  # refilled for far longer than the burst takes: the bucket holds the burst, no more
    for _ in range(3):
        assert limiter.acquire("a") is None
        limiter.release("a")
    assert limiter.acquire("a") == 1
    now[0] += 10_000  # quiet VMs with nothing in flight are evicted
    limiter.acquire("c")
    assert len(limiter) == 1


def test_a_request_held_past_the_idle_period_still_counts_against_max_concurrent() -> None:
    """A long-poll route's request may be held longer than the limiter's idle period (300 s:
    examples/config.toml's long-poll route has timeout = 310, and a route's timeout has no
    upper bound): while it is held the VM is not quiet, and its slot stays taken, both when
    the VM's next request comes after the period and after a sweep ran for another VM."""
    now = [0.0]
    limiter = Limiter(Limits(requests_per_second=1, burst=3, max_concurrent=1), clock=lambda: now[0])
    assert limiter.acquire("a") is None  # held, not released
    now[0] += 301
    assert limiter.acquire("a") == 1  # still one in flight: the cap
    assert limiter.acquire("b") is None  # another VM: the sweep runs
    now[0] += 1
    assert limiter.acquire("a") == 1  # swept or not, still one in flight
    limiter.release("a")
    assert limiter.acquire("a") is None  # released: its slot is free again


def test_a_quiet_vm_starts_again_with_a_full_bucket_swept_or_not() -> None:
    """A bucket kept past the idle period for what it has in flight refills as an evicted one
    would: to the burst (a slow refill, 0.1 a second, would have given 30 of 100)."""
    now = [0.0]
    limiter = Limiter(Limits(requests_per_second=0.1, burst=100, max_concurrent=200), clock=lambda: now[0])
    for _ in range(100):
        assert limiter.acquire("a") is None  # the bucket emptied, the last one held
    for _ in range(99):
        limiter.release("a")
    now[0] += 301
    for _ in range(100):
        assert limiter.acquire("a") is None
    assert limiter.acquire("a") is not None


def test_limiter_reconfigure_applies_to_the_next_request_and_keeps_each_vms_state() -> None:
    now = [0.0]
    limiter = Limiter(Limits(requests_per_second=1, burst=3, max_concurrent=1), clock=lambda: now[0])
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") == 1  # one in flight, the cap
    limiter.reconfigure(Limits(requests_per_second=1, burst=3, max_concurrent=2))  # a reload
    assert limiter.acquire("a") is None  # the new cap
    assert limiter.acquire("a") == 1  # two in flight: the one admitted before the reload still counts
    limiter.reconfigure(Limits(requests_per_second=1, burst=3, max_concurrent=8))
    assert limiter.acquire("a") is None  # the third token of the burst
    assert limiter.acquire("a") == 1  # the bucket carried over, empty now
