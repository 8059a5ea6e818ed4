"""The test session's own PostgreSQL server (tests/conftest.py): reachable, shared commits, a database per test."""

from __future__ import annotations

import psycopg


def test_the_session_server_answers(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_database()").fetchone() == ("lenet",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)  # its Unix socket only


def test_two_connections_see_each_others_committed_writes(postgres_db: str) -> None:
    with psycopg.connect(postgres_db) as writer, psycopg.connect(postgres_db) as reader:
        writer.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, state TEXT NOT NULL)")
        writer.commit()
        writer.execute("INSERT INTO runs VALUES ('a', 'running')")
        assert reader.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)  # not committed yet
        reader.rollback()
        writer.commit()
        assert reader.execute("SELECT id, state FROM runs").fetchall() == [("a", "running")]
        reader.execute("UPDATE runs SET state = 'finished' WHERE id = 'a'")
        reader.commit()
        assert writer.execute("SELECT state FROM runs WHERE id = 'a'").fetchone() == ("finished",)


def test_each_test_gets_a_new_empty_database(postgres_db: str, postgres_url: str) -> None:
    with psycopg.connect(postgres_db) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        tables = conn.execute("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
    assert name.startswith("test_") and name != "lenet" and tables == 0
