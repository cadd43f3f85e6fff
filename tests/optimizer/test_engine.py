"""SQLite engines: writers of one process queue on a lock that every way out gives back."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from optimizer.store import make_engine


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE k (x INTEGER)"))
    return engine


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM k")).scalar_one())


def _write_in_thread(engine: sa.Engine, value: int) -> bool:
    """Write from another thread; False if it could not within 5 s (the lock was kept)."""
    done = threading.Event()

    def write() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO k VALUES (:v)"), {"v": value})
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return done.wait(5)


def test_writers_of_many_threads_all_commit(engine: sa.Engine) -> None:
    def write(n: int) -> None:
        for i in range(25):
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO k VALUES (:v)"), {"v": n * 100 + i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert _count(engine) == 200


def test_a_failed_transaction_gives_the_write_lock_back(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.OperationalError), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO k VALUES (1)"))
        conn.execute(sa.text("INSERT INTO missing VALUES (1)"))
    assert _write_in_thread(engine, 2)
    assert _count(engine) == 1  # the failed transaction wrote nothing


def test_a_connection_closed_without_commit_gives_the_write_lock_back(
    engine: sa.Engine,
) -> None:
    conn = engine.connect()
    conn.execute(sa.text("INSERT INTO k VALUES (1)"))
    assert not _write_in_thread(engine, 2)  # held: the other writer waits its turn
    conn.close()  # rolled back
    with engine.connect() as check:  # the waiting writer got its turn
        for _ in range(100):
            if check.execute(sa.text("SELECT count(*) FROM k")).scalar_one() == 1:
                break
            threading.Event().wait(0.05)
    assert _count(engine) == 1


def test_reads_do_not_wait_for_a_writer(engine: sa.Engine) -> None:
    writer = engine.connect()
    writer.execute(sa.text("INSERT INTO k VALUES (1)"))
    result: list[int] = []
    reader = threading.Thread(target=lambda: result.append(_count(engine)))
    reader.start()
    reader.join(5)
    assert result == [0]  # WAL: the reader saw the last commit at once
    writer.commit()
    writer.close()
    assert _count(engine) == 1
