"""In-process single flight, and running a few calls side by side on threads of their own.

    flights = Flights()
    result = flights.run(key, work)     # one caller per key runs `work`; the others share it
    a, b = in_parallel(f, g)            # both run to the end; the first error is raised
    a, b = one_then_other(f, g)         # the same, but g starts when f calls go() (or ends)

Used by the service: one thread does the work for a metadata SHA-1 or a part key, and
concurrent callers wait for it and share its result or its error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.followers = 0  # callers waiting for this flight (guarded by Flights._lock)


class Flights:
    """In-process single flight: one caller per key does the work, the others share its outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _flights only; never held while working
        self._flights: dict[object, _Flight] = {}

    def followers(self, key: object) -> int:
        """How many callers wait for the flight of `key` (0 if none is in flight)."""
        with self._lock:
            flight = self._flights.get(key)
            return flight.followers if flight is not None else 0

    def run(self, key: object, work: Callable[[], T]) -> T:
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                flight.followers += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result  # type: ignore[no-any-return]
        try:
            flight.result = work()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return flight.result  # type: ignore[no-any-return]


def in_parallel(*calls: Callable[[], T]) -> list[T]:
    """Run `calls` in threads of their own; return their results, or raise the first error.

    Daemon threads, not an executor: on shutdown an abandoned request must not keep the process
    alive (concurrent.futures joins its workers at exit).
    """
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:
            errors[index] = exc

    threads = [
        threading.Thread(target=run, args=(i,), name=f"part-{i}", daemon=True)
        for i in range(len(calls))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results


def one_then_other(first: Callable[[Callable[[], None]], T], other: Callable[[], U]) -> tuple[T, U]:
    """Like `in_parallel(first, other)`, but `other` starts only once `first` calls the `go`
    function it is given, or ends."""
    started = threading.Event()

    def run_first() -> T:
        try:
            return first(started.set)
        finally:
            started.set()

    def run_other() -> U:
        started.wait()
        return other()

    a, b = in_parallel(run_first, run_other)  # type: ignore[arg-type]
    return a, b  # type: ignore[return-value]
