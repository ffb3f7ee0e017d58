"""The local PostgreSQL and Redis that the suite runs against (SPEC §8, ``shared/SERVICES.md``).

``make test`` needs both: the state store is tested on PostgreSQL as well as SQLite, and the
distributed run uses Redis as the Celery broker. When one does not answer, the session stops
at once with a message that names it and says how to start it (``conftest.pytest_sessionstart``),
so no test is ever skipped silently.

Each test gets its own database (``fresh_database``) and its own Redis key prefix, so parallel
or repeated runs never collide; both are removed afterwards.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

PG_HOST = os.environ.get("COSELL_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("COSELL_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("COSELL_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("COSELL_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("COSELL_TEST_REDIS_PORT", "6379"))

HOW_TO_START = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "Redis": (
        'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
        "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
    ),
}


def pg_url(database: str = "postgres") -> str:
    return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def redis_url(db: int = 0) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def _postgres_problem() -> str | None:
    try:
        engine = sa.create_engine(pg_url(), connect_args={"connect_timeout": 5})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # the message is shown to whoever runs the tests
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def _redis_problem() -> str | None:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if answer.startswith(b"+PONG") else f"answered {answer!r} to PING"


def missing_services() -> list[str]:
    """One line per service that does not answer, naming it, where, why and how to start it."""
    lines = []
    for name, where, problem in (
        ("PostgreSQL", f"{PG_HOST}:{PG_PORT} (user {PG_USER})", _postgres_problem()),
        ("Redis", f"{REDIS_HOST}:{REDIS_PORT}", _redis_problem()),
    ):
        if problem:
            lines.append(f"{name} does not answer at {where}: {problem}\n  start it (as root): {HOW_TO_START[name]}")
    return lines


def unique_name(prefix: str) -> str:
    """A database or key-prefix name no other run uses: the prefix, the pid and a random part."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


@contextmanager
def fresh_database(prefix: str = "cosell_test") -> Iterator[str]:
    """A new, empty PostgreSQL database (its SQLAlchemy URL), dropped afterwards with its sessions."""
    name = unique_name(prefix)
    admin = sa.create_engine(pg_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield pg_url(name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def delete_redis_keys(prefix: str, db: int = 0) -> int:
    """Delete every key under ``prefix`` in Redis database ``db`` (only those)."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        return client.delete(*keys) if keys else 0
    finally:
        client.close()
