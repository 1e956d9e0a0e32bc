"""The production JobStore: MySQL or MariaDB through mysqlclient and adbapi.

Several daemons share one database, so everything here assumes company:
compare-and-set updates under READ COMMITTED, a named lock around schema
migrations, and connections that may be KILLed or lost to a server restart
at any moment.  A lost connection is discarded and the operation retried on a
fresh one when that is safe; otherwise it fails with DatabaseUnavailable and
the caller (or the reconciler) re-drives the job.
"""

import contextlib
import random
import time
from collections import namedtuple
from datetime import timezone

import MySQLdb
from MySQLdb.constants import CLIENT
from twisted.enterprise import adbapi
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from transferd.store import schema
from transferd.store.sql import DatabaseUnavailable, SQLJobStore

__all__ = ["DatabaseUnavailable", "MySQLJobStore"]

# Client and server errors that mean "this connection is gone": can't connect
# (2002, 2003), server gone away (2006), lost during a query (2013, 2055),
# killed (MariaDB 1927), server shutting down (1053), idle timeout (MySQL 8: 4031).
LOST_CONNECTION = frozenset({2002, 2003, 2006, 2013, 2055, 1927, 1053, 4031})
# Deadlock found (1213) and lock wait timeout exceeded (1205).  A lock wait
# timeout rolls back only the statement, but the failed interaction then rolls
# back the whole transaction (adbapi), so in both cases nothing took effect.
ROLLED_BACK = frozenset({1213, 1205})

Column = namedtuple("Column", "data_type column_type length precision")


def _is_lost(error):
    return bool(error.args) and error.args[0] in LOST_CONNECTION


def _rolled_back(error):
    """The server rolled the transaction back (deadlock, lock wait timeout): nothing it did took effect."""
    return bool(error.args) and error.args[0] in ROLLED_BACK


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


def _execute(conn, statement):
    with contextlib.closing(conn.cursor()) as cursor:
        cursor.execute(statement)


class _GroupCommit:
    """Runs the store operations asked for while the database is busy together, in one transaction.

    An operation runs at once when fewer than in_flight transactions of ours
    are running; otherwise it waits, and the operations that gathered
    meanwhile (at most `most`) go in the next transaction: one pool-thread
    hop and one commit for all of them, so each costs less as the load grows.
    Each runs under a savepoint of its own, so one that fails (a duplicate
    submission, a bad value) is undone alone and only its caller sees the
    error.  A failure of the transaction itself (a lost connection, a
    deadlock, the commit) reaches every caller in it, and each retries (or
    not) by its own rule in MySQLJobStore._attempts: nothing of it took
    effect, or, when the connection was lost, nobody knows whether it did.
    """

    def __init__(self, pool, interact, in_flight=4, most=100):
        self.pool = pool
        self.interact = interact  # MySQLJobStore._interact: one operation on a connection
        self.in_flight = in_flight
        self.most = most
        self._running = 0
        self._waiting = []  # (interaction, args, ping_after, Deferred, job_id)
        self.transactions = 0  # committed or not, for tests and benchmarks
        self.operations = 0

    def run(self, interaction, args, ping_after, job_id):
        """Fires with interaction(cursor, *args), run in a transaction shared with the others waiting.

        job_id: the one job whose row it changes ("" for none).  A transaction
        runs its operations in the order of their jobs' ids (those of one job
        in the order asked): like every UPDATE of many jobs (by IN, in key
        order), it locks job rows in ascending order, so two of them never
        wait for each other in a circle (a deadlock).
        """
        done = defer.Deferred()
        self._waiting.append((interaction, args, ping_after, done, job_id))
        self._start()
        return done

    def _start(self):
        while self._waiting and self._running < self.in_flight:
            batch, self._waiting = self._waiting[:self.most], self._waiting[self.most:]
            batch.sort(key=lambda operation: operation[4])  # stable: one job's operations keep their order
            batch = [operation[:4] for operation in batch]
            self._running += 1
            self.transactions += 1
            self.operations += len(batch)
            if len(batch) == 1:
                interaction, args, ping_after, _ = batch[0]
                ran = self.pool.runWithConnection(self.interact, interaction, args, ping_after)
                ran.addCallback(lambda result: [(True, result)])
            else:
                ran = self.pool.runWithConnection(self._together, batch)
            ran.addBoth(self._ended, batch)

    def _together(self, conn, batch):
        """In a pool thread: each operation under its savepoint; [(True, result) or (False, Failure)]."""
        pings = [ping_after for _, _, ping_after, _ in batch if ping_after is not None]
        if pings:
            conn.verify(min(pings))
        outcomes = []
        for interaction, args, _, _ in batch:
            _execute(conn, "SAVEPOINT operation")
            try:
                outcomes.append((True, self.interact(conn, interaction, args, None)))
            except MySQLdb.Error as error:
                if _is_lost(error) or _rolled_back(error):
                    raise  # the whole transaction is gone: every operation in it fails
                outcomes.append((False, Failure()))
                _execute(conn, "ROLLBACK TO SAVEPOINT operation")
            except Exception:
                outcomes.append((False, Failure()))
                _execute(conn, "ROLLBACK TO SAVEPOINT operation")
        return outcomes

    def _ended(self, outcomes, batch):
        self._running -= 1
        for index, (*_, done) in enumerate(batch):
            if isinstance(outcomes, Failure):
                done.errback(outcomes)
            else:
                succeeded, value = outcomes[index]
                done.callback(value) if succeeded else done.errback(value)
        self._start()


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


def _index_columns(cursor, table, index):
    cursor.execute(
        "SELECT COLUMN_NAME FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s AND INDEX_NAME = %s ORDER BY SEQ_IN_INDEX",
        (table, index),
    )
    return [row[0].lower() for row in cursor.fetchall()]


def _ensure_jobs_table(cursor):
    """Migration 1: create the jobs table, or bring the prototype's (or a half-migrated one) into shape.

    MySQL commits every ALTER at once, so each change is made only when the
    information_schema says it is still missing: re-running after an
    interruption finishes the work.  Runs in a UTC session, so TIMESTAMP
    values become the same instants as UTC DATETIMEs.
    """
    table = _table(cursor, "jobs")
    if table is None:
        cursor.execute(schema.JOBS.create("mysql", 1))
        _create_indexes(cursor, schema.JOBS, 1)
        return
    columns = _columns(cursor, "jobs")
    missing = [name for name in schema.PROTOTYPE_COLUMNS if name not in columns]
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
    for column in schema.JOBS.columns_since(1):
        if column.name not in columns:
            changes.append(_add_column(schema.JOBS, column, 1))
    for name in schema.TIME_COLUMNS:
        column = columns.get(name)
        if column is not None and (column.data_type != "datetime" or column.precision != 6):
            # Strict mode refuses to convert the zero dates a lax prototype may have stored.
            cursor.execute(f"UPDATE jobs SET {name} = NULL WHERE {name} = 0")
            changes.append(f"MODIFY {name} DATETIME(6) NULL")
    if changes:
        cursor.execute("ALTER TABLE jobs " + ", ".join(changes))
    _create_indexes(cursor, schema.JOBS, 1)
    # The prototype kept raw callback codes (at most 32 characters); transferd
    # keeps SHA-256 hex digests (64).  A raw code must never pass for a digest.
    cursor.execute("UPDATE jobs SET stager_callback = NULL WHERE CHAR_LENGTH(stager_callback) <> 64")


def _create_indexes(cursor, table, version):
    for index in table.indexes:
        if index.since == version and not _has_index(cursor, table.name, index.name):
            cursor.execute(table.create_index(index, version))


def _retype(cursor, table, column):
    """MODIFY a column to its described kind, unless it has it already; values that would not fit stop it."""
    wanted = schema.KINDS[column.kind]["mysql"].lower()
    if _columns(cursor, table.name)[column.name].column_type == wanted:
        return
    length = int(wanted[wanted.index("(") + 1:-1]) if "(" in wanted else None
    if length is not None:
        cursor.execute(f"SELECT COUNT(*) FROM {table.name} WHERE CHAR_LENGTH({column.name}) > %s", (length,))
        if cursor.fetchone()[0]:
            raise RuntimeError(f"{table.name}.{column.name} holds values longer than {length} characters;"
                               f" shorten them before upgrading (transferd keeps it as {wanted})")
    cursor.execute(f"ALTER TABLE {table.name} MODIFY {column.name} {column.definition('mysql')}")


def _add_column(table, column, version):
    return f"ADD COLUMN {column.name} {column.definition('mysql')} AFTER {table.after(column.name, version)}"


def _migration(version):
    """Schema version's changes (transferd.store.schema), each made only where information_schema lacks it.

    MySQL commits every DDL statement at once, so a migration cut short is
    finished by running it again.
    """

    def migrate(cursor):
        created, added, indexed = schema.changes(version)
        for table in created:
            if _table(cursor, table.name) is None:
                cursor.execute(table.create("mysql", version))
        by_table = {}
        for table, column in added:
            by_table.setdefault(table, []).append(column)
        for table, columns in by_table.items():
            present = _columns(cursor, table.name)
            missing = [_add_column(table, column, version) for column in columns if column.name not in present]
            if missing:
                cursor.execute(f"ALTER TABLE {table.name} " + ", ".join(missing))
        for table, column in schema.retyped(version):
            _retype(cursor, table, column)
        for table, index in schema.redefined(version):
            if _index_columns(cursor, table.name, index.name) != list(index.columns):
                cursor.execute(f"ALTER TABLE {table.name} DROP INDEX {index.name},"
                               f" ADD INDEX {index.name} ({', '.join(index.columns)})")
        for table in schema.rekeyed(version):
            if table.row_key.name not in _columns(cursor, table.name):
                # One statement: it rebuilds the table once, numbering the existing rows in key order.
                cursor.execute(f"ALTER TABLE {table.name} ADD COLUMN {table.row_key.name}"
                               f" {schema.KINDS['serial']['mysql']} FIRST, DROP PRIMARY KEY,"
                               f" ADD PRIMARY KEY ({table.row_key.name}), ADD {table.unique_key()}")
        for table in {table for table, _index in indexed}:
            _create_indexes(cursor, table, version)
        if version == schema.COUNTS_SINCE:
            cursor.execute("SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()")
            present = {row[0] for row in cursor.fetchall()}
            for name, sql in schema.count_triggers("mysql"):
                if name not in present:
                    cursor.execute(sql)
        for fill in schema.BACKFILLS.get(version, ()):
            if fill is schema.count_jobs:
                recount_jobs(cursor)
            else:
                fill(cursor, "%s")

    return migrate


def recount_jobs(cursor):
    """job_counts counted afresh from the jobs table (schema.count_jobs), no job changing meanwhile.

    The counting triggers must exist already: from the lock on, every change
    of a job is in the jobs table the count reads, and from the unlock on it is
    appended as a change.  LOCK TABLES commits what the session had begun.
    """
    cursor.execute("LOCK TABLES jobs READ, job_counts WRITE, job_count_changes WRITE")
    try:
        schema.count_jobs(cursor, "%s")
    finally:
        cursor.execute("UNLOCK TABLES")


class MySQLJobStore(SQLJobStore):
    """The JobStore on MySQL/MariaDB, shared by every transferd instance."""

    log = Logger()
    placeholder = "%s"
    row_locator = schema.JOBS.row_key.name  # the primary key since version 4: rows in the order they came
    skip_locked = " FOR UPDATE SKIP LOCKED"  # MariaDB 10.6+, MySQL 8.0+
    lock_rows = " FOR UPDATE"
    add_to_count = ("INSERT INTO job_counts (counted_by, status, held, name, total) VALUES (?, ?, ?, ?, ?)"
                    " ON DUPLICATE KEY UPDATE total = total + VALUES(total)")
    # Version 1 creates the jobs table or upgrades the prototype's in place.
    migrations = [
        [schema.SCHEMA_VERSION.create("mysql", 1, if_missing=True), _ensure_jobs_table],
        *([_migration(version)] for version in range(2, schema.LATEST + 1)),
    ]
    # Seconds to wait before each retry of an operation whose connection was
    # lost, while the database was up.  When they are used up the database
    # counts as down: from then on each operation makes one try (failing at
    # once with DatabaseUnavailable) until one succeeds, so nobody waits long
    # for a database that is away: the API answers 503, the queue redelivers
    # later, the reconciler tries on its next pass.
    retry_delays = (0.0, 0.25, 0.75)
    # A deadlock (1213) or lock wait timeout (1205) rolls the transaction back:
    # nothing happened, so the operation runs again, at most this many times,
    # after a short random wait.
    deadlock_retries = 5
    # A non-idempotent operation pings its connection first when it has been
    # idle this long.  A connection lost while in steady use fails such an
    # operation with DatabaseUnavailable instead (the reconciler re-drives).
    ping_idle_after = 1.0
    # Seconds a daemon waits for another one's schema migration to finish.
    migration_lock_timeout = 600
    # Start-up waits for a server that is not up yet: first wait, doubling up to the cap.
    start_backoff = (0.5, 10.0)

    def __init__(self, pool, reactor, clock, where="the database", start_wait=0.0, random=random.random, metrics=None):
        super().__init__(pool, clock, metrics)
        self.reactor = reactor  # waits between retries: a real server takes real time to come back
        self.where = where  # how messages name the server: "the database at host:port/db"
        self.start_wait = start_wait
        self.random = random
        self._down_since = None  # clock time the database was found unreachable; None while it is up
        self.group = _GroupCommit(pool, self._interact)

    @classmethod
    def from_url(cls, url, reactor, clock, start_wait=0.0, metrics=None):
        """A store for a parsed mysql:// url (transferd.config.DatabaseURL)."""
        pool = _Pool(
            "MySQLdb",
            cp_reactor=reactor,
            cp_reconnect=True,
            cp_openfun=_configure,
            cp_name="transferd-mysql",
            charset="utf8mb4",
            client_flag=CLIENT.FOUND_ROWS,  # rowcount = rows matched, as the contract expects
            autocommit=False,
            cp_min=url.pool_min,
            cp_max=url.pool_max,
            **url.connect_keywords(),
        )
        server = url.unix_socket or f"{url.host}:{url.port}"
        return cls(pool, reactor, clock, where=f"the database at {server}/{url.database}", start_wait=start_wait,
                   metrics=metrics)

    # -- plumbing ---------------------------------------------------------

    def _time_to_db(self, moment):
        """DATETIME(6) text of a UTC time ('2026-12-03 15:45:00.123456'): the column has no zone and every
        session runs in UTC.  Text, because MySQLdb formats a datetime parameter in Python, a few times
        slower than isoformat (2.4% of the daemon's CPU end to end)."""
        if moment.tzinfo is not None:
            moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
        return moment.isoformat(" ", "microseconds")

    def _run(self, interaction, *args, idempotent=True, together=None):
        """Run interaction(cursor, *args) in one transaction, surviving lost connections and deadlocks.

        When the connection is lost before anything was sent (connecting, or
        the ping that precedes a non-idempotent operation on a connection
        idle for more than ping_idle_after seconds), or while an
        idempotent operation ran, the operation is retried on a fresh
        connection.  A non-idempotent one that lost its connection mid-way
        fails with DatabaseUnavailable: it may or may not have committed.
        A transaction the server rolled back (deadlock, lock wait timeout)
        is run again, whatever the operation: it had no effect.  The short
        operations of a job's way (together: the job's id) share transactions (_GroupCommit);
        the others (passes, listings, migrations) each have one of their own,
        so a long one holds up no job.
        """
        return defer.Deferred.fromCoroutine(self._attempts(interaction, args, idempotent, together))

    async def _attempts(self, interaction, args, idempotent, together):
        delays = [] if self._down_since is not None else list(self.retry_delays)
        rollbacks = 0
        # Seconds of idleness after which the connection is pinged first (None: never).
        ping_after = None if idempotent else self.ping_idle_after
        while True:
            try:
                if together is not None:
                    result = await self.group.run(interaction, args, ping_after, together)
                else:
                    result = await self.pool.runWithConnection(self._interact, interaction, args, ping_after)
            except _Unsent as unsent:
                error = unsent.error
                if not _is_lost(error):
                    raise error from None
            except MySQLdb.Error as caught:
                error = caught
                if _rolled_back(error) and rollbacks < self.deadlock_retries:
                    rollbacks += 1
                    delay = 0.02 * 2 ** rollbacks * self.random()
                    self.log.info("the database rolled the transaction back ({error}); running it again",
                                  error=_describe(error))
                    await task.deferLater(self.reactor, delay, lambda: None)
                    continue
                if not _is_lost(error):
                    raise
                if not idempotent:
                    raise DatabaseUnavailable(
                        "the database connection was lost during an operation that is not safe"
                        f" to repeat ({_describe(error)}); it may or may not have taken effect",
                        reason=_describe(error),
                    ) from error
            else:
                self._up()
                return result
            if not delays:
                self._down(error)
                raise DatabaseUnavailable(f"{self.where} is unreachable ({_describe(error)})",
                                          reason=_describe(error)) from error
            delay = delays.pop(0)
            self.log.info(
                "database connection failed ({error}); retrying in {delay}s", error=_describe(error), delay=delay
            )
            ping_after = 0.0  # after a failure, always
            await task.deferLater(self.reactor, delay, lambda: None)

    def _down(self, error):
        if self._down_since is None:
            self._down_since = self.clock.seconds()
            self.log.warn("{where} is unreachable ({error}); operations fail at once until it is back",
                          where=self.where, error=_describe(error))

    def _up(self):
        if self._down_since is not None:
            self.log.info("{where} is back after {down:.1f}s", where=self.where,
                          down=self.clock.seconds() - self._down_since)
            self._down_since = None

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
        """Bring the schema up to date, waiting (start_wait seconds at most) for a server that is not up yet.

        Retried after a lost connection, as every step is safe to re-run.
        """
        return defer.Deferred.fromCoroutine(self._migrate_once_up())

    async def _migrate_once_up(self):
        deadline = self.reactor.seconds() + self.start_wait
        wait, cap = self.start_backoff
        while True:
            try:
                return await self._run(self._migrate, idempotent=True)
            except DatabaseUnavailable as error:
                left = deadline - self.reactor.seconds()
                if left <= 0 or not self.running:
                    raise DatabaseUnavailable(
                        f"{self.where} did not come up within {self.start_wait:g}s ([startup] wait_for_backends):"
                        f" {error.reason}") from None
                wait = min(wait, left)
                self.log.warn("waiting for {where}: {error}; trying again in {wait:.1f}s (for {left:.0f}s more)",
                              where=self.where, error=error.reason, wait=wait, left=left)
                await task.deferLater(self.reactor, wait, lambda: None)
                wait = min(wait * 2, cap)

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
