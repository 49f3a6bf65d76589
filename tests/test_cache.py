"""The per-VM response cache and the rule for what may be cached, as pure functions."""

from __future__ import annotations

import asyncio

import pytest

from metadata_proxy.cache import UNCACHEABLE_SECONDS, Flights, ResponseCache, cacheable_max_age, freshness


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put(cache: ResponseCache, vm: str, target: bytes, body: bytes = b"{}", max_age: int = 60) -> None:
    cache.put(vm, target, 200, [(b"cache-control", b"max-age=%d" % max_age)], body, max_age)


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [(b"cache-control", b"max-age=30")], 30),
        (200, [(b"cache-control", b"private, max-age=30")], 30),
        (200, [(b"cache-control", b"Max-Age=30, PRIVATE")], 30),
        (200, [(b"cache-control", b"public"), (b"cache-control", b"max-age=5")], 5),
        (200, [(b"cache-control", b"max-age=30, no-store")], None),
        (200, [(b"cache-control", b"no-cache, max-age=30")], None),
        (200, [(b"cache-control", b'no-cache="set-cookie", max-age=30')], None),
        (200, [(b"cache-control", b"max-age=30"), (b"cache-control", b"no-store")], None),
        (200, [(b"cache-control", b"max-age=0")], None),
        (200, [(b"cache-control", b"max-age=-1")], None),
        (200, [(b"cache-control", b'max-age="30"')], None),
        (200, [(b"cache-control", b"public")], None),
        (200, [], None),
        (200, [(b"cache-control", b"max-age=30"), (b"vary", b"accept")], None),
        (404, [(b"cache-control", b"max-age=30")], None),
        (500, [(b"cache-control", b"max-age=30")], None),
    ],
)
def test_cacheable_max_age(status: int, headers: list[tuple[bytes, bytes]], expected: int | None) -> None:
    assert cacheable_max_age(status, headers) == expected


def test_entry_is_fresh_for_max_age_with_its_age() -> None:
    clock = Clock()
    cache = ResponseCache(8, 1 << 20, clock)
    put(cache, "a", b"/runtime/x", b"answer", max_age=3)
    clock.now += 2.9
    hit = cache.get("a", b"/runtime/x")
    assert hit is not None
    entry, age = hit
    assert (entry.body, entry.status, age) == (b"answer", 200, 2)
    clock.now += 0.1
    assert cache.get("a", b"/runtime/x") is None
    assert len(cache) == 0 and cache.bytes == 0  # a stale entry goes on the read that finds it


def test_entries_are_per_vm_and_dropped_per_vm() -> None:
    cache = ResponseCache(8, 1 << 20, Clock())
    put(cache, "a", b"/t", b"for a")
    put(cache, "b", b"/t", b"for b")
    hit_a, hit_b = cache.get("a", b"/t"), cache.get("b", b"/t")
    assert hit_a is not None and hit_a[0].body == b"for a"
    assert hit_b is not None and hit_b[0].body == b"for b"
    assert cache.get("c", b"/t") is None
    cache.drop_vm("a")
    assert cache.get("a", b"/t") is None
    assert cache.get("b", b"/t") is not None
    cache.drop_vm("nobody")  # nothing to drop is fine
    assert len(cache) == 1


def test_entries_per_vm_are_bounded_oldest_first() -> None:
    cache = ResponseCache(2, 1 << 20, Clock())
    for target in (b"/1", b"/2", b"/3"):
        put(cache, "a", target)
    put(cache, "b", b"/1")
    assert cache.get("a", b"/1") is None
    assert cache.get("a", b"/2") is not None and cache.get("a", b"/3") is not None
    assert cache.get("b", b"/1") is not None  # another VM's entries do not count against a's
    put(cache, "a", b"/2")  # stored again: now the newest of a's
    put(cache, "a", b"/4")
    assert cache.get("a", b"/3") is None and cache.get("a", b"/2") is not None


def test_bytes_are_bounded_across_vms_least_recently_used_first() -> None:
    body = b"x" * 1000
    cache = ResponseCache(100, 3 * 1000 + 3 * 700, Clock())  # room for three entries, not four
    put(cache, "a", b"/1", body)
    put(cache, "b", b"/1", body)
    put(cache, "c", b"/1", body)
    assert cache.get("a", b"/1") is not None  # a is now more recent than b
    put(cache, "d", b"/1", body)
    assert cache.get("b", b"/1") is None
    assert all(cache.get(vm, b"/1") is not None for vm in ("a", "c", "d"))
    assert cache.bytes <= cache.max_bytes
    cache.drop_vm("b")  # its bookkeeping went with the evicted entry
    assert len(cache) == 3


def test_an_entry_larger_than_the_whole_cache_is_not_stored() -> None:
    cache = ResponseCache(8, 4096, Clock())
    put(cache, "a", b"/small")
    put(cache, "a", b"/big", b"x" * 8192)
    assert cache.get("a", b"/big") is None
    assert cache.get("a", b"/small") is not None


def test_zero_bounds_disable_the_cache() -> None:
    for cache in (ResponseCache(0, 1 << 20, Clock()), ResponseCache(8, 0, Clock())):
        assert not cache.enabled
        put(cache, "a", b"/t")
        assert cache.get("a", b"/t") is None


def test_stale_if_error_is_parsed_with_max_age() -> None:
    headers = [(b"cache-control", b"max-age=30, stale-if-error=600")]
    assert freshness(200, headers) == (30, 600)
    assert freshness(200, [(b"cache-control", b"max-age=30, stale-if-error=x")]) == (30, 0)
    assert freshness(200, [(b"cache-control", b"stale-if-error=600")]) is None  # no freshness at all
    assert freshness(503, headers) is None


def test_an_entry_with_stale_if_error_is_kept_past_freshness_for_get_stale_only() -> None:
    clock = Clock()
    cache = ResponseCache(8, 1 << 20, clock)
    cache.put("a", b"/t", 200, [], b"old", 2, 5)
    put(cache, "a", b"/plain", max_age=2)
    clock.now += 3
    assert cache.get("a", b"/t") is None  # not fresh
    stale = cache.get_stale("a", b"/t")
    assert stale is not None and stale[0].body == b"old" and stale[1] == 3
    assert cache.get_stale("b", b"/t") is None  # never another VM's
    assert cache.get_stale("a", b"/plain") is None and len(cache) == 1  # no window: gone
    clock.now += 4  # 7 s old: past 2 + 5
    assert cache.get_stale("a", b"/t") is None
    assert len(cache) == 0


def test_stale_entries_count_against_the_per_vm_bound() -> None:
    clock = Clock()
    cache = ResponseCache(2, 1 << 20, clock)
    cache.put("a", b"/1", 200, [], b"", 1, 100)
    clock.now += 10
    cache.put("a", b"/2", 200, [], b"", 1, 100)
    cache.put("a", b"/3", 200, [], b"", 1, 100)
    assert cache.get_stale("a", b"/1") is None
    assert cache.get_stale("a", b"/2") is not None


def test_flights_land_once_for_every_waiter() -> None:
    asyncio.run(_flights_land_once())


async def _flights_land_once() -> None:
    flights = Flights()
    key = ("a", b"/t")
    flight = flights.take_off(key)
    assert flight is not None and flights.take_off(key) is None and flights.in_flight(key) is flight
    first, second = flight.outcome(), flight.outcome()
    assert first is second  # one future, however many wait
    flights.land(key, flight, None)
    assert first.result() is None and flights.in_flight(key) is None and len(flights) == 0


def test_an_uncacheable_path_is_not_coalesced_for_a_while() -> None:
    clock = Clock()
    flights = Flights(clock)
    assert flights.coalesces("a", b"/poll")
    flights.answered("a", b"/poll", cacheable=False)
    assert not flights.coalesces("a", b"/poll")
    assert flights.coalesces("b", b"/poll")  # per VM
    clock.now += UNCACHEABLE_SECONDS
    assert flights.coalesces("a", b"/poll")
    flights.answered("a", b"/poll", cacheable=False)
    flights.answered("a", b"/poll", cacheable=True)  # cacheable again: coalesced again
    assert flights.coalesces("a", b"/poll")
    # The app names a VM by name and id: a VM given a destroyed VM's name inherits no mark.
    flights.answered(("vm-a", "id-old"), b"/poll", cacheable=False)
    assert not flights.coalesces(("vm-a", "id-old"), b"/poll")
    assert flights.coalesces(("vm-a", "id-new"), b"/poll")
