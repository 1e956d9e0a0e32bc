"""The production JobStore: MySQL or MariaDB through mysqlclient and adbapi.

Several daemons share one database, so everything here assumes company:
compare-and-set updates under READ COMMITTED, a named lock around schema
migrations, and connections that may be KILLed or lost to a server restart
at any moment.  A lost connection is discarded and the operation retried on a
fresh one when that is safe; otherwise it fails with DatabaseUnavailable and
the caller (or the reconciler) re-drives the job.
"""

import contextlib
import time
from collections import namedtuple
from datetime import timezone
from urllib.parse import parse_qsl, unquote, urlsplit

import MySQLdb
from MySQLdb.constants import CLIENT
from twisted.enterprise import adbapi
from twisted.internet import defer, task
from twisted.logger import Logger

from transferd.store.sql import DatabaseUnavailable, SQLJobStore

__all__ = ["DatabaseUnavailable", "MySQLJobStore", "connection_options"]

# Client and server errors that mean "this connection is gone": can't connect
# (2002, 2003), server gone away (2006), lost during a query (2013, 2055),
# killed (MariaDB 1927), server shutting down (1053), idle timeout (MySQL 8: 4031).
LOST_CONNECTION = frozenset({2002, 2003, 2006, 2013, 2055, 1927, 1053, 4031})

SCHEMA_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL)"
    " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
)

# utf8mb4_bin: job ids, statuses and lease owners compare exactly (the
# default collations ignore case and trailing spaces).
JOBS_TABLE = """
CREATE TABLE jobs (
    job_id VARCHAR(36) NOT NULL,
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
    staged_files MEDIUMTEXT,
    stage_attempts INT NOT NULL DEFAULT 0,
    lease_owner VARCHAR(64),
    lease_until DOUBLE,
    time_submitted DATETIME(6) NULL,
    time_staging DATETIME(6) NULL,
    time_staged DATETIME(6) NULL,
    time_transferring DATETIME(6) NULL,
    time_success DATETIME(6) NULL,
    time_error DATETIME(6) NULL,
    time_cancelled DATETIME(6) NULL,
    PRIMARY KEY (job_id),
    INDEX jobs_status_lease (status, lease_until)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin
"""

# The prototype's columns (legacy/prototype_schema.sql): a jobs table without
# all of them is not one transferd may alter.
PROTOTYPE_COLUMNS = (
    "job_id", "product_id", "status", "detailed_status", "destination_path", "submitter",
    "fts_jobid", "fts_details", "stager_callback", "stager_path", "stager_hostname",
    "stager_status", "time_submitted", "time_staging", "time_transferring", "time_error",
    "time_success",
)  # fmt: skip

# Columns transferd added to the prototype's table: (name, definition, after).
ADDED_COLUMNS = (
    ("staged_files", "MEDIUMTEXT", "stager_status"),
    ("stage_attempts", "INT NOT NULL DEFAULT 0", "staged_files"),
    ("lease_owner", "VARCHAR(64)", "stage_attempts"),
    ("lease_until", "DOUBLE", "lease_owner"),
    ("time_staged", "DATETIME(6) NULL", "time_staging"),
    ("time_cancelled", "DATETIME(6) NULL", "time_success"),
)

TIME_COLUMNS = (
    "time_submitted", "time_staging", "time_staged", "time_transferring",
    "time_success", "time_error", "time_cancelled",
)  # fmt: skip

Column = namedtuple("Column", "data_type column_type length precision")

URL_OPTIONS = {
    # name: (type, where it goes: the pool or MySQLdb.connect)
    "pool_min": (int, "cp_min"),
    "pool_max": (int, "cp_max"),
    "connect_timeout": (int, "connect_timeout"),
    "read_timeout": (int, "read_timeout"),
    "write_timeout": (int, "write_timeout"),
    "unix_socket": (str, "unix_socket"),
}


def connection_options(url):
    """The keyword arguments for the adbapi pool (and MySQLdb.connect) a mysql:// URL asks for.

    mysql://user:password@host:port/dbname?pool_max=10 -- user and password
    are percent-decoded; the port defaults to 3306.
    """
    parts = urlsplit(url)
    if parts.scheme != "mysql":
        raise ValueError(f"not a mysql:// url: {parts.scheme}://...")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError("mysql url needs a database name: mysql://user:password@host:3306/transferd")
    if not parts.username:
        raise ValueError("mysql url needs a user: mysql://user:password@host:3306/transferd")
    try:
        port = parts.port or 3306
    except ValueError as error:
        raise ValueError(f"mysql url has a bad port: {error}") from None
    options = dict(
        host=parts.hostname or "localhost",
        port=port,
        user=unquote(parts.username),
        password=unquote(parts.password or ""),
        database=database,
        connect_timeout=10,
        cp_min=2,
        cp_max=10,
    )
    for name, text in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        if name not in URL_OPTIONS:
            raise ValueError(f"unknown mysql url option {name!r} (known: {', '.join(sorted(URL_OPTIONS))})")
        kind, key = URL_OPTIONS[name]
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"mysql url option {name} must be an integer, not {text!r}") from None
        if kind is int and value < 1:
            raise ValueError(f"mysql url option {name} must be at least 1")
        options[key] = value
    if options["cp_min"] > options["cp_max"]:
        raise ValueError("mysql url option pool_min must not exceed pool_max")
    return options


def _is_lost(error):
    return bool(error.args) and error.args[0] in LOST_CONNECTION


def _describe(error):
    """The server's or client library's own words for a MySQLdb error."""
    return error.args[1] if len(error.args) > 1 else str(error)


def _configure(connection):
    """Per-connection settings (cp_openfun); a connection that fails them is closed, not leaked.

    UTC so DATETIME values and TIMESTAMP conversions mean UTC; READ COMMITTED
    so compare-and-set updates and lease claims from several daemons take no
    gap locks and always see the latest committed row; strict mode so a bad
    value is an error, never silently truncated.
    """
    try:
        with contextlib.closing(connection.cursor()) as cursor:
            cursor.execute("SET time_zone = '+00:00'")
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            cursor.execute("SET SESSION sql_mode = 'TRADITIONAL'")
    except Exception:
        with contextlib.suppress(Exception):
            connection.close()
        raise


class _Unsent(Exception):
    """No statement reached the server (connecting or a ping failed): any operation may be retried."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class _Connection(adbapi.Connection):
    """A pooled connection that is discarded at once, quietly, when MySQL has dropped it.

    adbapi's own recovery logs two tracebacks per lost connection and may try
    to close the wrong connection after a failed reconnect.
    """

    def reconnect(self):
        self.discard()
        try:
            self._connection = self._pool.connect()
        except MySQLdb.Error as error:
            raise _Unsent(error) from error

    def discard(self):
        raw, self._connection = self._connection, None
        if raw is not None and self._pool.connections.get(self._pool.threadID()) is raw:
            self._pool.disconnect(raw)

    last_used = 0.0  # time.monotonic() when this connection last ran an interaction

    def verify(self, idle_after):
        """Ping when idle longer than idle_after seconds, and reconnect when the server has dropped us.

        Nothing has been sent yet, so reconnecting is always safe.  Connections
        in steady use are not pinged: a ping is a round trip per statement,
        and the server drops connections mostly while they sit idle
        (wait_timeout, a restart between bursts).
        """
        if time.monotonic() - self.last_used <= idle_after:
            return
        try:
            self._connection.ping()
        except MySQLdb.Error:
            self.reconnect()

    def commit(self):
        try:
            self._connection.commit()
        except MySQLdb.Error as error:
            if _is_lost(error):
                self.discard()
            raise

    def rollback(self):
        if self._connection is None:
            return
        try:
            self._connection.rollback()
        except MySQLdb.Error:
            self.discard()


class _Pool(adbapi.ConnectionPool):
    connectionFactory = _Connection


def _table(cursor, name):
    """(engine, collation) of a table in the current database, or None."""
    cursor.execute(
        "SELECT ENGINE, TABLE_COLLATION FROM information_schema.TABLES"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
        (name,),
    )
    return cursor.fetchone()


def _columns(cursor, table):
    cursor.execute(
        "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_MAXIMUM_LENGTH, DATETIME_PRECISION"
        " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
        (table,),
    )
    return {
        name.lower(): Column(data_type.lower(), column_type.lower(), length, precision)
        for name, data_type, column_type, length, precision in cursor.fetchall()
    }


def _has_index(cursor, table, index):
    cursor.execute(
        "SELECT COUNT(*) FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s AND INDEX_NAME = %s",
        (table, index),
    )
    return cursor.fetchone()[0] > 0


def _ensure_jobs_table(cursor):
    """Migration 1: create the jobs table, or bring the prototype's (or a half-migrated one) into shape.

    MySQL commits every ALTER at once, so each change is made only when the
    information_schema says it is still missing: re-running after an
    interruption finishes the work.  Runs in a UTC session, so TIMESTAMP
    values become the same instants as UTC DATETIMEs.
    """
    table = _table(cursor, "jobs")
    if table is None:
        cursor.execute(JOBS_TABLE)
        return
    columns = _columns(cursor, "jobs")
    missing = [name for name in PROTOTYPE_COLUMNS if name not in columns]
    if missing:
        raise RuntimeError(
            f"the database has a jobs table without the columns {', '.join(missing)}: it is not"
            " a transferd (or prototype) table, and transferd will not alter it"
        )
    engine, collation = table
    if (engine or "").lower() != "innodb":
        cursor.execute("ALTER TABLE jobs ENGINE=InnoDB")
    if collation != "utf8mb4_bin":
        cursor.execute("ALTER TABLE jobs CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    columns = _columns(cursor, "jobs")

    changes = []
    if columns["status"].column_type != "varchar(16)":
        changes.append("MODIFY status VARCHAR(16) NOT NULL")
    if (columns["stager_callback"].length or 0) < 64:
        changes.append("MODIFY stager_callback VARCHAR(64)")
    for name, definition, after in ADDED_COLUMNS:
        if name not in columns:
            changes.append(f"ADD COLUMN {name} {definition} AFTER {after}")
    for name in TIME_COLUMNS:
        column = columns.get(name)
        if column is not None and (column.data_type != "datetime" or column.precision != 6):
            # Strict mode refuses to convert the zero dates a lax prototype may have stored.
            cursor.execute(f"UPDATE jobs SET {name} = NULL WHERE {name} = 0")
            changes.append(f"MODIFY {name} DATETIME(6) NULL")
    if changes:
        cursor.execute("ALTER TABLE jobs " + ", ".join(changes))
    if not _has_index(cursor, "jobs", "jobs_status_lease"):
        cursor.execute("CREATE INDEX jobs_status_lease ON jobs (status, lease_until)")
    # The prototype kept raw callback codes (at most 32 characters); transferd
    # keeps SHA-256 hex digests (64).  A raw code must never pass for a digest.
    cursor.execute("UPDATE jobs SET stager_callback = NULL WHERE CHAR_LENGTH(stager_callback) <> 64")


def _add_polling_columns(cursor):
    """Migration 2: the stager's own request id (Tape REST) and the pollers' lease (Tape REST, FTS3)."""
    columns = _columns(cursor, "jobs")
    changes = [
        f"ADD COLUMN {name} {definition} AFTER {after}"
        for name, definition, after in (
            ("stager_request", "VARCHAR(255)", "staged_files"),
            ("poll_owner", "VARCHAR(64)", "lease_until"),
            ("poll_until", "DOUBLE", "poll_owner"),
        )
        if name not in columns
    ]
    if changes:
        cursor.execute("ALTER TABLE jobs " + ", ".join(changes))
    if not _has_index(cursor, "jobs", "jobs_status_poll"):
        cursor.execute("CREATE INDEX jobs_status_poll ON jobs (status, poll_until)")


class MySQLJobStore(SQLJobStore):
    """The JobStore on MySQL/MariaDB, shared by every transferd instance."""

    log = Logger()
    placeholder = "%s"
    skip_locked = " FOR UPDATE SKIP LOCKED"  # MariaDB 10.6+, MySQL 8.0+
    migrations = [
        [SCHEMA_VERSION_TABLE, _ensure_jobs_table],
        [_add_polling_columns],
    ]
    # Seconds to wait before each retry of an operation whose connection was
    # lost; when they are used up the operation fails with DatabaseUnavailable.
    retry_delays = (0.0, 0.25, 1.0, 3.0)
    # A non-idempotent operation pings its connection first when it has been
    # idle this long.  A connection lost while in steady use fails such an
    # operation with DatabaseUnavailable instead (the reconciler re-drives).
    ping_idle_after = 1.0
    # Seconds a daemon waits for another one's schema migration to finish.
    migration_lock_timeout = 600

    def __init__(self, pool, clock, reactor=None):
        super().__init__(pool, clock)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor

    @classmethod
    def from_url(cls, url, clock, reactor=None):
        """A store for mysql://user:password@host:port/dbname?pool_min=2&pool_max=10."""
        if reactor is None:
            from twisted.internet import reactor
        pool = _Pool(
            "MySQLdb",
            cp_reactor=reactor,
            cp_reconnect=True,
            cp_openfun=_configure,
            cp_name="transferd-mysql",
            charset="utf8mb4",
            client_flag=CLIENT.FOUND_ROWS,  # rowcount = rows matched, as the contract expects
            autocommit=False,
            **connection_options(url),
        )
        return cls(pool, clock, reactor)

    # -- plumbing ---------------------------------------------------------

    def _time_to_db(self, moment):
        """A naive UTC datetime: DATETIME(6) has no zone and every session runs in UTC."""
        if moment.tzinfo is not None:
            moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
        return moment

    def _run(self, interaction, *args, idempotent=True):
        """Run interaction(cursor, *args) in one transaction, surviving lost connections.

        When the connection is lost before anything was sent (connecting, or
        the ping that precedes a non-idempotent operation on a connection
        idle for more than ping_idle_after seconds), or while an
        idempotent operation ran, the operation is retried on a fresh
        connection.  A non-idempotent one that lost its connection mid-way
        fails with DatabaseUnavailable: it may or may not have committed.
        """
        return defer.Deferred.fromCoroutine(self._attempts(interaction, args, idempotent))

    async def _attempts(self, interaction, args, idempotent):
        delays = list(self.retry_delays)
        # Seconds of idleness after which the connection is pinged first (None: never).
        ping_after = None if idempotent else self.ping_idle_after
        while True:
            try:
                return await self.pool.runWithConnection(self._interact, interaction, args, ping_after)
            except _Unsent as unsent:
                error = unsent.error
                if not _is_lost(error):
                    raise error from None
            except MySQLdb.Error as caught:
                error = caught
                if not _is_lost(error):
                    raise
                if not idempotent:
                    raise DatabaseUnavailable(
                        "the database connection was lost during an operation that is not safe"
                        f" to repeat ({_describe(error)}); it may or may not have taken effect"
                    ) from error
            if not delays:
                raise DatabaseUnavailable(
                    f"the database is unreachable ({_describe(error)})"
                    f" after {len(self.retry_delays) + 1} attempts"
                ) from error
            delay = delays.pop(0)
            self.log.warn(
                "database connection failed ({error}); retrying in {delay}s", error=error, delay=delay
            )
            ping_after = 0.0  # after a failure, always
            await task.deferLater(self.reactor, delay, lambda: None)

    def _interact(self, conn, interaction, args, ping_after):
        """In a pool thread: run one interaction on conn (pinged first if idle past ping_after); the pool commits."""
        if ping_after is not None:
            conn.verify(ping_after)
        cursor = conn.cursor()
        try:
            return interaction(cursor, *args)
        except MySQLdb.Error as error:
            if _is_lost(error):
                conn.discard()
            raise
        finally:
            conn.last_used = time.monotonic()
            with contextlib.suppress(MySQLdb.Error):
                cursor.close()

    # -- schema -----------------------------------------------------------

    def migrate(self):
        """Bring the schema up to date; retried after a lost connection, as every step is safe to re-run."""
        return self._run(self._migrate, idempotent=True)

    def _read_version(self, cursor):
        """The schema version; 0 without a schema_version table (a fresh or prototype database)."""
        if _table(cursor, "schema_version") is None:
            return 0
        cursor.execute("SELECT MAX(version) FROM schema_version")
        row = cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _migrate(self, cursor):
        """Migrate under a named lock, so daemons starting together migrate one at a time."""
        lock = "LEFT(CONCAT('transferd migrate ', DATABASE()), 64)"
        cursor.execute(f"SELECT GET_LOCK({lock}, %s)", (self.migration_lock_timeout,))
        if cursor.fetchone()[0] != 1:
            raise RuntimeError(
                f"another transferd has been migrating this database for over"
                f" {self.migration_lock_timeout}s; try again once it has finished"
            )
        try:
            version = super()._migrate(cursor)
            cursor.execute("COMMIT")  # before the next daemon may look at schema_version
            return version
        finally:
            with contextlib.suppress(MySQLdb.Error):
                cursor.execute(f"SELECT RELEASE_LOCK({lock})")
                cursor.fetchall()
