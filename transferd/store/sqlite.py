"""The embedded JobStore: SQLite through adbapi, one connection (SQLite has one writer)."""

import os
from urllib.parse import urlsplit

from twisted.enterprise import adbapi

from transferd.store.sql import SQLJobStore

JOBS_TABLE = """
CREATE TABLE jobs (
    job_id VARCHAR(36) NOT NULL PRIMARY KEY,
    product_id TEXT,
    status VARCHAR(16) NOT NULL,
    detailed_status TEXT,
    destination_path TEXT,
    submitter TEXT,
    fts_jobid VARCHAR(255),
    fts_details TEXT,
    stager_callback VARCHAR(64),
    stager_path TEXT,
    stager_hostname TEXT,
    stager_status TEXT,
    staged_files TEXT,
    stage_attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner VARCHAR(64),
    lease_until DOUBLE,
    time_submitted TIMESTAMP NULL,
    time_staging TIMESTAMP NULL,
    time_staged TIMESTAMP NULL,
    time_transferring TIMESTAMP NULL,
    time_success TIMESTAMP NULL,
    time_error TIMESTAMP NULL,
    time_cancelled TIMESTAMP NULL
)
"""


def _configure(connection):
    """Per-connection settings: WAL so readers never wait, full sync so a crash loses nothing."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=10000")


class SQLiteJobStore(SQLJobStore):
    placeholder = "?"
    migrations = [
        [
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
            JOBS_TABLE,
            "CREATE INDEX jobs_status_lease ON jobs (status, lease_until)",
        ],
        [
            "ALTER TABLE jobs ADD COLUMN stager_request VARCHAR(255)",
            "ALTER TABLE jobs ADD COLUMN poll_owner VARCHAR(64)",
            "ALTER TABLE jobs ADD COLUMN poll_until DOUBLE",
            "CREATE INDEX jobs_status_poll ON jobs (status, poll_until)",
        ],
    ]

    @classmethod
    def from_url(cls, url, clock):
        path = urlsplit(url).path
        if url.startswith("sqlite:////"):
            path = "/" + path.lstrip("/")
        elif url.startswith("sqlite:///"):
            path = path[1:]  # sqlite:///relative/path
        if not path:
            raise ValueError("sqlite url needs a path, e.g. sqlite:///var/transferd.sqlite")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_configure,
        )
        return cls(pool, clock)
