"""The registry: answers, images, in-flight jobs across processes, file modes, no lock errors."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from registrar.registry import (
    FILENAME,
    Answer,
    Claimed,
    Image,
    Registry,
    image_key,
    process_start,
)

A = "a" * 40


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "state")
    yield reg
    reg.close()


def test_files_are_private_and_wal(tmp_path: Path, registry: Registry) -> None:
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / FILENAME).stat().st_mode) == 0o600
    with sqlite3.connect(tmp_path / "state" / FILENAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_answers_round_trip(registry: Registry) -> None:
    assert registry.answer(A) is None
    registry.save_answer(Answer(A, "http://o/m", "emi-1", "", "eri-1"))
    answer = registry.answer(A)
    assert answer is not None
    assert (answer.filesystem, answer.kernel, answer.ramdisk) == ("emi-1", "", "eri-1")
    assert answer.ids() == ["emi-1", "eri-1"]
    assert [a.metadata_sha1 for a in registry.answers()] == [A]
    registry.forget_answer(A)
    assert registry.answer(A) is None


def test_image_keys() -> None:
    assert image_key("kernel", A) == f"kernel:{A}"
    assert image_key("machine", A, "eki-1", "") == f"machine:{A}:eki-1:"


def test_job_becomes_image_atomically(registry: Registry) -> None:
    key = image_key("kernel", A)
    assert registry.claim(key, "registrar:1:1") is None
    registry.record_bundle(key, "bukkit", "kernel-aaaa")
    registry.record_image_id(key, "eki-1")
    job = registry.job(key)
    assert job is not None
    assert (job.bucket, job.prefix, job.image_id, job.pid) == (
        "bukkit",
        "kernel-aaaa",
        "eki-1",
        os.getpid(),
    )
    registry.finish(key, Image(key, "kernel", A, "eki-1", "bukkit", "kernel-aaaa"))
    assert registry.job(key) is None
    image = registry.image(key)
    assert image is not None and image.image_id == "eki-1"


def test_forgetting_an_image_drops_answers_naming_it(registry: Registry) -> None:
    key = image_key("kernel", A)
    registry.claim(key, "o")
    registry.finish(key, Image(key, "kernel", A, "eki-1", "b", "p"))
    registry.save_answer(Answer("1" * 40, "http://o/1", "emi-1", "eki-1", ""))
    registry.save_answer(Answer("2" * 40, "http://o/2", "emi-2", "", ""))
    registry.forget_image(key)
    assert registry.image(key) is None
    assert registry.answer("1" * 40) is None
    assert registry.answer("2" * 40) is not None


def test_live_claim_is_refused(registry: Registry) -> None:
    registry.claim("k", "registrar:me:1")
    with pytest.raises(Claimed, match="k is being registered by registrar:me:1"):
        registry.claim("k", "registrar:me:2")
    registry.release("k", "registrar:me:1")
    assert registry.claim("k", "registrar:me:2") is None


def _claim_in_child(state: Path, key: str) -> None:
    code = (
        "import sys; from registrar.registry import Registry;"
        "r = Registry(sys.argv[1]); r.claim(sys.argv[2], 'registrar:child:1');"
        "r.record_bundle(sys.argv[2], 'bukkit', 'pfx'); r.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(state), key], check=True)


def test_job_of_a_dead_process_is_abandoned_and_taken_over(
    tmp_path: Path, registry: Registry
) -> None:
    _claim_in_child(tmp_path / "state", "k")
    (stale,) = registry.abandoned_jobs()
    assert (stale.key, stale.owner, stale.bucket, stale.prefix) == (
        "k",
        "registrar:child:1",
        "bukkit",
        "pfx",
    )
    assert not stale.owner_alive()
    assert registry.claim("k", "registrar:me:1") == stale
    registry.take_over(stale, "registrar:me:1")
    assert registry.abandoned_jobs() == []
    job = registry.job("k")
    assert job is not None and job.owner == "registrar:me:1" and job.bucket is None
    # A second process cleaning up the same stale job loses the race cleanly.
    with pytest.raises(Claimed):
        registry.take_over(stale, "registrar:other:1")


def test_process_start_tells_reused_pids_apart() -> None:
    assert process_start(os.getpid()) != ""
    assert process_start(2**22 + 12345) == ""


def test_only_one_of_many_processes_claims_a_key(tmp_path: Path, registry: Registry) -> None:
    code = (
        "import sys; from registrar.registry import Registry, Claimed;"
        "r = Registry(sys.argv[1])\n"
        "try:\n    r.claim('shared', 'registrar:' + sys.argv[2]); print('claimed', flush=True)\n"
        "except Claimed:\n    print('refused', flush=True)\n"
        "sys.stdin.read()"  # hold the claim (stay alive) until the test lets go
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "state"), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    outcomes = [child.stdout.readline().strip() for child in children]  # type: ignore[union-attr]
    for child in children:
        child.communicate("", timeout=60)
    assert sorted(outcomes) == ["claimed", "refused", "refused", "refused"]


def test_concurrent_writers_never_see_database_locked(tmp_path: Path, registry: Registry) -> None:
    other = Registry(tmp_path / "state")
    errors: list[BaseException] = []

    def writer(reg: Registry, n: int) -> None:
        try:
            for i in range(50):
                key = f"k{n}-{i}"
                reg.claim(key, f"o{n}")
                reg.record_bundle(key, "b", key)
                reg.finish(key, Image(key, "kernel", A, f"eki-{n}-{i}", "b", key))
                reg.save_answer(Answer(f"{n:02d}{i:038d}", "u", f"emi-{n}-{i}", "", ""))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(reg, n))
        for n, reg in enumerate([registry, other] * 3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    other.close()
    assert errors == []
    assert len(registry.images()) == 300
    assert len(registry.answers()) == 300


def test_abandoned_job_is_cleaned_at_the_next_claim(registry: Registry) -> None:
    registry.claim("k", "registrar:me:1")
    registry.record_bundle("k", "b", "pfx")
    registry.abandon("k", "registrar:me:1")
    (job,) = registry.abandoned_jobs()
    assert (job.owner, job.prefix, job.owner_alive()) == ("registrar:me:1", "pfx", False)
    assert registry.claim("k", "registrar:me:2") == job


def test_a_registry_of_the_previous_release_gains_the_new_columns(tmp_path: Path) -> None:
    state = tmp_path / "old"
    state.mkdir()
    with sqlite3.connect(state / FILENAME) as db:
        db.executescript(
            "CREATE TABLE answers (metadata_sha1 TEXT PRIMARY KEY, url TEXT NOT NULL,"
            " filesystem TEXT NOT NULL, kernel TEXT NOT NULL, ramdisk TEXT NOT NULL,"
            " updated REAL NOT NULL);"
            "CREATE TABLE images (key TEXT PRIMARY KEY, kind TEXT NOT NULL, sha1 TEXT NOT NULL,"
            " image_id TEXT NOT NULL, bucket TEXT NOT NULL, prefix TEXT NOT NULL,"
            " created REAL NOT NULL);"
            f"INSERT INTO answers VALUES ('{A}', 'http://o/m', 'emi-1', 'eki-1', '', 1.0);"
            f"INSERT INTO images VALUES ('kernel:{A}', 'kernel', '{A}', 'eki-1', 'b', 'p', 1.0);"
        )
    db.close()
    reg = Registry(state)
    try:
        assert reg.answer(A) == Answer(A, "http://o/m", "emi-1", "eki-1", "", 1.0, "")
        assert reg.image(f"kernel:{A}").manifest == ""
        reg.save_answer(Answer("b" * 40, "http://o/n", "emi-2", "", "", qcow2="q-1"))
        assert reg.answer("b" * 40).qcow2 == "q-1"
    finally:
        reg.close()
