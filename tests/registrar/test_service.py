"""Service internals that need no cloud: single flight, owner names, image labels."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

from registrar.errors import FetchError
from registrar.flights import Flights as _Flights
from registrar.flights import one_then_other
from registrar.names import label_from_url
from registrar.owners import owner_alive, owner_process
from registrar.registry import process_start


def _run_concurrently(n: int, target: object) -> list[threading.Thread]:
    threads = [threading.Thread(target=target) for _ in range(n)]  # type: ignore[arg-type]
    for thread in threads:
        thread.start()
    return threads


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_concurrent_callers_share_one_run() -> None:
    flights = _Flights()
    release = threading.Event()
    entered = threading.Event()
    runs: list[int] = []
    results: list[str] = []

    def work() -> str:
        runs.append(1)
        entered.set()
        assert release.wait(30)
        return "answer"

    def call() -> None:
        results.append(flights.run("key", work))

    leader = _run_concurrently(1, call)
    assert entered.wait(30)
    followers = _run_concurrently(9, call)
    _wait_for(lambda: flights.followers("key") == 9)
    release.set()
    for thread in leader + followers:
        thread.join(30)
    assert runs == [1]
    assert results == ["answer"] * 10
    assert flights.followers("key") == 0


def test_followers_get_the_leaders_error_and_the_next_call_runs_again() -> None:
    flights = _Flights()
    release = threading.Event()
    entered = threading.Event()
    errors: list[BaseException] = []

    def failing() -> str:
        entered.set()
        assert release.wait(30)
        raise FetchError("origin down")

    def call() -> None:
        try:
            flights.run("k", failing)
        except FetchError as exc:
            errors.append(exc)

    threads = _run_concurrently(1, call)
    assert entered.wait(30)
    threads += _run_concurrently(3, call)
    _wait_for(lambda: flights.followers("k") == 3)
    release.set()
    for thread in threads:
        thread.join(30)
    assert [str(e) for e in errors] == ["origin down"] * 4
    assert flights.run("k", lambda: "fresh") == "fresh"


def test_different_keys_run_in_parallel() -> None:
    flights = _Flights()
    barrier = threading.Barrier(2, timeout=30)
    results: list[str] = []

    def call(key: str) -> None:
        results.append(flights.run(key, lambda: (barrier.wait(), key)[1]))

    threads = [threading.Thread(target=call, args=(k,)) for k in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == ["a", "b"]


def test_the_other_call_starts_when_the_first_says_go_or_ends() -> None:
    events: list[str] = []
    first_may_end = threading.Event()

    def first(go: Callable[[], None]) -> str:
        events.append("first started")
        go()
        assert first_may_end.wait(30)  # the other has run meanwhile
        events.append("first ends")
        return "a"

    def other() -> str:
        events.append("other started")
        first_may_end.set()
        return "b"

    assert one_then_other(first, other) == ("a", "b")
    assert events == ["first started", "other started", "first ends"]

    # A first call that fails before go() still lets the other run, then raises its error.
    def failing(go: Callable[[], None]) -> str:
        raise FetchError("no metadata")

    ran: list[str] = []
    with pytest.raises(FetchError, match="no metadata"):
        one_then_other(failing, lambda: ran.append("other") or "b")
    assert ran == ["other"]


def test_owner_names() -> None:
    me = f"registrar:{os.getpid()}:{process_start(os.getpid())}:7"
    assert owner_process(me) == f"registrar:{os.getpid()}:{process_start(os.getpid())}:"
    assert owner_alive(me)
    assert not owner_alive(f"registrar:{os.getpid()}:1:7")  # same pid, other start: reused
    assert owner_alive("someone-else")  # not a registrar owner: never judged dead


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("http://o/images/vmlinuz-2.6.32", "vmlinuz-2.6.32"),
        ("http://o/a%20b/initrd.img?x=1", "initrd.img"),
        ("http://o/", "kernel"),
        ("http://o/x/fs image (1).img", "fs-image-(1).img"),
    ],
)
def test_labels_come_from_the_url(url: str, label: str) -> None:
    assert label_from_url(url, "kernel") == label
