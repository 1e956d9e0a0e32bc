"""The embedded JobStore: SQLite through adbapi, one connection (SQLite has one writer)."""

import os

from twisted.enterprise import adbapi

from transferd.store import schema
from transferd.store.sql import SQLJobStore


def _configure(connection):
    """Per-connection settings: WAL so readers never wait, full sync so a crash loses nothing."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=10000")


class SQLiteJobStore(SQLJobStore):
    placeholder = "?"
    migrations = schema.sqlite_migrations()

    @classmethod
    def from_url(cls, url, reactor, clock, metrics=None):
        """A store in the file of a parsed sqlite:// url (transferd.config.DatabaseURL)."""
        path = url.path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_configure,
            cp_reactor=reactor,
        )
        return cls(pool, clock, metrics)
