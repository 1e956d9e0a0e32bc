"""CERN FTS3: a REST client (transferd.fts.client), X.509 proxy delegation (transferd.fts.delegation)
and the poller that follows FTS jobs (transferd.fts.poller).

The mover that uses them is transferd.movers.fts; a fake FTS3 server for
tests and demos is transferd.testing.fakefts.
"""

from transferd.fts.client import (
    ACTIVE_STATES,
    BASE_ID,
    TERMINAL_STATES,
    FTSClient,
    FTSConflict,
    FTSCredentialsError,
    FTSError,
    FTSRefused,
    FTSUnavailable,
    deterministic_job_id,
)

__all__ = [
    "ACTIVE_STATES", "BASE_ID", "TERMINAL_STATES", "FTSClient", "FTSConflict", "FTSCredentialsError",
    "FTSError", "FTSRefused", "FTSUnavailable", "deterministic_job_id",
]
