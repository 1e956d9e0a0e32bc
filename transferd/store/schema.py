"""The database schema, described once; the SQLite and MySQL statements are rendered from it.

Each column and index names the schema version that brought it, so the same
description yields the table a fresh database gets and the steps that bring
an older one up to date.  The column names of the prototype's jobs table are
kept (docs/architecture.md, "The jobs table"); legacy/README.md says how a
prototype database is upgraded.
"""

import dataclasses
import zlib

from transferd import jobs

# Column kinds and how each dialect spells them.  MySQL keeps text as
# utf8mb4_bin (the table's collation): ids, statuses and lease owners compare
# exactly.  Time columns hold UTC; MySQL's DATETIME(6) has no zone.
KINDS = {
    "id": {"sqlite": "VARCHAR(36)", "mysql": "VARCHAR(36)"},
    "status": {"sqlite": "VARCHAR(16)", "mysql": "VARCHAR(16)"},
    "short": {"sqlite": "VARCHAR(64)", "mysql": "VARCHAR(64)"},
    "name": {"sqlite": "VARCHAR(255)", "mysql": "VARCHAR(255)"},
    "identity": {"sqlite": "VARCHAR(512)", "mysql": "VARCHAR(512)"},  # a DN or SUB=..., ISS=...
    "text": {"sqlite": "TEXT", "mysql": "TEXT"},
    "long_text": {"sqlite": "TEXT", "mysql": "MEDIUMTEXT"},
    "count": {"sqlite": "INTEGER", "mysql": "INT"},
    "seconds": {"sqlite": "DOUBLE", "mysql": "DOUBLE"},
    "time": {"sqlite": "TIMESTAMP", "mysql": "DATETIME(6)"},
    "serial": {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "mysql": "BIGINT NOT NULL AUTO_INCREMENT"},
    "big": {"sqlite": "INTEGER", "mysql": "BIGINT"},  # refers to a serial
}


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str
    since: int = 1  # the schema version that added it
    required: bool = False  # NOT NULL
    default: str = None  # SQL literal
    retyped: tuple = None  # (version, kind before it): the version that gave the column its kind

    def kind_at(self, version):
        return self.retyped[1] if self.retyped and version < self.retyped[0] else self.kind

    def definition(self, dialect, version=None):
        sql = KINDS[self.kind_at(version) if version else self.kind][dialect]
        if self.required:
            sql += " NOT NULL"
        elif self.kind == "time":
            sql += " NULL"
        if self.default is not None:
            sql += f" DEFAULT {self.default}"
        return sql


@dataclasses.dataclass(frozen=True)
class Index:
    name: str
    columns: tuple
    since: int = 1
    redefined: int = None  # the version that gave the index its columns (it is dropped and made again)
    before: tuple = None  # its columns before `redefined`, when they differ from the columns other than ordering

    def columns_at(self, version):
        """The index's columns as of schema version."""
        if self.before is not None and version < self.redefined:
            return self.before
        return self.columns


@dataclasses.dataclass(frozen=True)
class RowKey:
    """A hidden serial column that orders a MySQL table's rows by insertion (InnoDB stores rows in primary key
    order); the table's key becomes a unique index.  SQLite keeps rows in rowid order already."""

    name: str
    since: int


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    columns: tuple
    key: tuple = ()
    indexes: tuple = ()
    since: int = 1
    row_key: RowKey = None

    def column(self, name):
        return next(column for column in self.columns if column.name == name)

    def columns_since(self, version):
        return [column for column in self.columns if column.since == version]

    def columns_retyped(self, version):
        return [column for column in self.columns if column.retyped and column.retyped[0] == version]

    def create(self, dialect, version, if_missing=False):
        """CREATE TABLE as of schema version (the columns it had then; indexes are separate statements)."""
        lines = [f"    {c.name} {c.definition(dialect, version)}" for c in self.columns if c.since <= version]
        if self.clustered(dialect, version):
            lines.insert(0, f"    {self.row_key.name} {KINDS['serial']['mysql']}")
            lines += [f"    PRIMARY KEY ({self.row_key.name})", f"    {self.unique_key()}"]
        elif self.key and not (dialect == "sqlite" and self.column(self.key[0]).kind == "serial"):
            lines.append(f"    PRIMARY KEY ({', '.join(self.key)})")
        sql = f"CREATE TABLE {'IF NOT EXISTS ' if if_missing else ''}{self.name} (\n" + ",\n".join(lines) + "\n)"
        if dialect == "mysql":
            sql += " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        return sql

    def clustered(self, dialect, version):
        """Whether the table, in dialect as of version, is ordered by its row_key rather than by its key."""
        return dialect == "mysql" and self.row_key is not None and version >= self.row_key.since

    def unique_key(self):
        return f"UNIQUE KEY {self.name}_key ({', '.join(self.key)})"

    def create_index(self, index, version=None):
        """CREATE INDEX with the index's columns as of version (None: the latest)."""
        columns = index.columns_at(version) if version is not None else index.columns
        return f"CREATE INDEX {index.name} ON {self.name} ({', '.join(columns)})"

    def after(self, name, version):
        """The column before name as of version (MySQL's ADD COLUMN ... AFTER keeps the described order)."""
        names = [column.name for column in self.columns if column.since <= version]
        return names[names.index(name) - 1]


TIME_COLUMNS = tuple(jobs.TIME_COLUMN[state] for state in jobs.STATES)

JOBS = Table(
    "jobs",
    columns=(
        Column("job_id", "id", required=True),
        Column("product_id", "name", retyped=(3, "text")),
        Column("status", "status", required=True),
        Column("detailed_status", "text"),
        Column("destination_path", "text"),
        Column("submitter", "identity", retyped=(3, "text")),
        Column("fts_jobid", "name"),
        Column("fts_details", "text"),
        Column("stager_callback", "short"),  # SHA-256 hex of the current authcode
        Column("stager_path", "text"),
        Column("stager_hostname", "text"),
        Column("stager_status", "text"),
        Column("staged_files", "long_text"),
        Column("stager_request", "name", since=2),
        Column("stage_attempts", "count", required=True, default="0"),
        Column("lease_owner", "short"),
        Column("lease_until", "seconds"),
        Column("poll_owner", "short", since=2),
        Column("poll_until", "seconds", since=2),
        # Version 3: what the v1 API lists, filters and explains; deliveries that survive a crash.
        Column("priority", "count", since=3, required=True, default="3"),  # 1 (low) to 5 (high), as FTS has
        Column("label", "name", since=3),
        Column("metadata", "long_text", since=3),  # the submitter's JSON object
        Column("destination_host", "name", since=3),
        Column("deliveries", "count", since=3, required=True, default="0"),  # workers' leases never given back
    ) + tuple(Column(name, "time") for name in TIME_COLUMNS) + (
        Column("time_updated", "time", since=3),  # the last change of any kind
        Column("time_away", "time", since=3),  # since when the service the job waits for is away; transitions clear it
        Column("time_copy_freed", "time", since=3),  # when the ended job's staged copy was freed (stager_path is then gone)
        Column("notify_url", "text", since=5),  # where the submitter wants its webhooks (transferd.events)
        # Version 7: scheduling (transferd.scheduler).  share: whose fair share the job counts against (its
        # submitter, or the group [scheduler] groups puts it in); poll_slot: which daemon's pollers ask about it.
        Column("share", "identity", since=7),
        Column("poll_slot", "count", since=7, required=True, default="0"),  # crc32(job_id) % POLL_SLOTS
    ),
    key=("job_id",),
    # Listing indexes end with the listing order (time_submitted, job_id), so a page comes off one of them in
    # order: since version 4 InnoDB no longer appends job_id to every index by itself (see row_key).
    # Version 4: on MySQL, rows in the order jobs arrive, so the page of a listing (jobs submitted one after
    # the other) lies on a few pages of the table instead of one page per job (job ids are random).
    row_key=RowKey("seq", since=4),
    indexes=(
        Index("jobs_status_lease", ("status", "lease_until")),
        Index("jobs_status_poll", ("status", "poll_until", "poll_slot"), since=2, redefined=7,
              before=("status", "poll_until")),
        Index("jobs_submitted", ("time_submitted", "job_id"), since=3),
        Index("jobs_status_submitted", ("status", "time_submitted", "job_id"), since=3, redefined=4),
        Index("jobs_submitter_submitted", ("submitter", "time_submitted", "job_id"), since=3, redefined=4),
        Index("jobs_submitter_status", ("submitter", "status", "time_submitted", "job_id"), since=3, redefined=4),  # "my jobs in state X"
        Index("jobs_product", ("product_id", "time_submitted", "job_id"), since=3, redefined=4),
        Index("jobs_label", ("label", "time_submitted", "job_id"), since=3, redefined=4),
        Index("jobs_destination_host", ("destination_host", "time_submitted", "job_id"), since=3, redefined=4),
        Index("jobs_status_updated", ("status", "time_updated"), since=3),
        Index("jobs_updated", ("time_updated",), since=3),
        # The scheduler's: the jobs free to release (lease_until IS NULL) per share, best first; and, on the
        # same index, the jobs each share has released or running.
        Index("jobs_scheduling", ("status", "lease_until", "share", "priority DESC", "time_submitted", "job_id"),
              since=7),
    ),
)

# Every state change and every attempt of every job, written in the
# transaction that makes it: the job's history (v1 API, events).
JOB_EVENTS = Table(
    "job_events",
    columns=(
        Column("event_id", "serial"),
        Column("job_id", "id", required=True),
        Column("time", "time"),
        Column("kind", "status", required=True),  # "state" (a transition) or "attempt"
        Column("old_status", "status"),
        Column("new_status", "status"),
        Column("actor", "text"),  # who made it: a user's identity, a worker, a poller, the reconciler
        Column("reason", "text"),
    ),
    key=("event_id",),
    indexes=(Index("job_events_job", ("job_id", "event_id"), since=3),),
    since=3,
)

# A batch submitted with a submission_id, so that sending it again returns its first answer.
SUBMISSIONS = Table(
    "submissions",
    columns=(
        Column("submission_key", "short", required=True),  # SHA-256 hex of (submitter, submission_id)
        Column("submitter", "identity"),
        Column("submission_id", "name"),
        Column("time_submitted", "time"),
        Column("results", "long_text"),  # the per-item answer, JSON
    ),
    key=("submission_key",),
    indexes=(Index("submissions_time", ("time_submitted",), since=3),),
    since=3,
)

# Version 5: events.  Each state change (a job_events row of kind "state") is also an outbox row, written in
# the same transaction; the dispatcher (transferd.events) fans each out into one delivery per target that
# wants it (the job's notify_url, a subscriber, the AMQP exchange) and sends those in order per job and target.
OUTBOX = Table(
    "outbox",
    columns=(
        Column("event_id", "big", required=True),  # the job_events row of the state change
        Column("job_id", "id", required=True),
        Column("state", "status", required=True),  # the state entered
        Column("fanned_out", "count", required=True, default="0"),  # 1 once its deliveries are made
        Column("time_created", "time"),
    ),
    key=("event_id",),
    indexes=(Index("outbox_fanned", ("fanned_out", "event_id"), since=5),
             Index("outbox_job", ("job_id", "event_id"), since=5)),
    since=5,
)

EVENT_DELIVERIES = Table(
    "event_deliveries",
    columns=(
        Column("delivery_id", "serial"),
        Column("event_id", "big", required=True),
        Column("job_id", "id", required=True),
        Column("target", "name", required=True),  # "notify", "amqp" or "subscriber:<name>"
        Column("status", "status", required=True),  # pending, delivered, given_up
        Column("attempts", "count", required=True, default="0"),
        Column("next_attempt", "seconds", required=True),  # epoch seconds; while one is being sent, its lease's end
        Column("owner", "short"),  # the dispatcher sending it now
        Column("last_error", "text"),
        Column("time_done", "time"),
    ),
    key=("delivery_id",),
    indexes=(Index("event_deliveries_due", ("status", "target", "next_attempt"), since=5),
             Index("event_deliveries_job", ("job_id", "target", "event_id"), since=5),
             Index("event_deliveries_event", ("event_id",), since=5),
             # Version 8: a lane's pending deliveries in delivery order, without walking the delivered ones.
             Index("event_deliveries_pending", ("status", "target", "delivery_id"), since=8)),
    since=5,
)

# Version 6: the fleet.  Each running daemon upserts its row every [fleet] heartbeat (transferd.fleet); the
# drain flag is how an operator, through any daemon's API, tells this one to take no new work.
DAEMONS = Table(
    "daemons",
    columns=(
        Column("daemon_id", "id", required=True),  # a UUID per process; its workers' lease owner is worker-<id>
        Column("host", "name", required=True),
        Column("pid", "count", required=True),
        Column("version", "short"),
        Column("time_started", "time"),
        Column("time_beat", "time"),  # the last heartbeat
        Column("drain", "count", required=True, default="0"),  # 1: take no new work
    ),
    key=("daemon_id",),
    indexes=(Index("daemons_host", ("host",), since=6),),
    since=6,
)

# Version 7: one row per scheduling step ("staging", "transfer").  A pass updates its step's row first, so
# the passes of every daemon sharing the database run one at a time (transferd.scheduler).
SCHEDULER = Table(
    "scheduler",
    columns=(
        Column("step", "short", required=True),
        Column("daemon_id", "id"),  # who ran the last pass
        Column("time_pass", "time"),
        Column("released", "count", required=True, default="0"),  # jobs the last pass released
    ),
    key=("step",),
    since=7,
)

# Version 9: the jobs counted by state, kept up to date by triggers on jobs, so the scheduler's passes and
# /metrics read a few rows per share or host instead of an index entry per job.  A trigger only appends a
# change (a job leaving one bucket, -1, and entering another, +1) to job_count_changes: appends from concurrent
# transactions never wait for each other.  The scheduler folds the changes into job_counts (fold_job_counts);
# a count is what job_counts holds plus the changes not folded yet, read in one statement.
JOB_COUNT_CHANGES = Table(
    "job_count_changes",
    columns=(
        Column("change_id", "serial"),
        Column("status", "status", required=True),
        Column("held", "count", required=True),  # 1 when the job has a lease (lease_until IS NOT NULL)
        Column("share", "identity", required=True),
        Column("destination_host", "name", required=True),
        Column("delta", "count", required=True),  # +1 or -1
    ),
    key=("change_id",),
    since=9,
)

JOB_COUNTS = Table(
    "job_counts",
    columns=(
        Column("counted_by", "status", required=True),  # COUNTED_BY: all jobs, per share, per destination host
        Column("status", "status", required=True),
        Column("held", "count", required=True),
        Column("name", "identity", required=True),  # the share or host ("" when counted_by is "all")
        Column("total", "big", required=True),
    ),
    key=("counted_by", "status", "held", "name"),
    since=9,
)

COUNTED_BY = ("all", "share", "host")

SCHEMA_VERSION = Table("schema_version", columns=(Column("version", "count", required=True),))

# Every table transferd keeps, in the order they are created.
TABLES = (JOBS, JOB_EVENTS, SUBMISSIONS, OUTBOX, EVENT_DELIVERIES, DAEMONS, SCHEDULER, JOB_COUNT_CHANGES,
          JOB_COUNTS)

# The prototype's columns (legacy/prototype_schema.sql): a jobs table without
# all of them is not one transferd may alter.
PROTOTYPE_COLUMNS = (
    "job_id", "product_id", "status", "detailed_status", "destination_path", "submitter",
    "fts_jobid", "fts_details", "stager_callback", "stager_path", "stager_hostname",
    "stager_status", "time_submitted", "time_staging", "time_transferring", "time_error",
    "time_success",
)  # fmt: skip

LATEST = max(item.since for table in TABLES
             for item in (table, *table.columns, *table.indexes, *filter(None, [table.row_key])))

assert {column.name for column in JOBS.columns} == set(jobs.COLUMNS), "the Job fields are the jobs columns"


def changes(version):
    """What schema version brings: (tables to create, (table, column) to add, (table, index) to create)."""
    created = [table for table in TABLES if table.since == version]
    added = [(table, column) for table in TABLES if table.since < version for column in table.columns_since(version)]
    indexed = [(table, index) for table in TABLES for index in table.indexes if index.since == version]
    return created, added, indexed


def redefined(version):
    """(table, index) pairs whose columns change in version."""
    return [(table, index) for table in TABLES for index in table.indexes if index.redefined == version]


def rekeyed(version):
    """Tables that get their row_key in version (MySQL only)."""
    return [table for table in TABLES if table.row_key is not None and table.row_key.since == version]


def retyped(version):
    """(table, column) pairs whose kind changes in version (MySQL MODIFYs them; SQLite types are advisory)."""
    return [(table, column) for table in TABLES if table.since < version for column in table.columns_retyped(version)]


def destination_host(url):
    """The host a destination URL names ("" when none), as the destination_host column keeps it."""
    from urllib.parse import urlsplit

    try:
        return (urlsplit(url).hostname or "")[:255]
    except ValueError:
        return ""


def backfill_version_3(cursor, placeholder):
    """Version 3: destination_host and time_updated for the rows that predate them."""
    cursor.execute("UPDATE jobs SET time_updated = COALESCE(time_error, time_cancelled, time_success,"
                   " time_transferring, time_staged, time_staging, time_submitted) WHERE time_updated IS NULL")
    while True:
        cursor.execute("SELECT job_id, destination_path FROM jobs WHERE destination_host IS NULL"
                       " AND destination_path IS NOT NULL LIMIT 1000")
        rows = cursor.fetchall()
        if not rows:
            return
        cursor.executemany(f"UPDATE jobs SET destination_host = {placeholder} WHERE job_id = {placeholder}",
                           [(destination_host(path), job_id) for job_id, path in rows])


POLL_SLOTS = 1024  # the polling work is cut into this many slots, shared out among live daemons (transferd.fleet)
SCHEDULING_STEPS = ("staging", "transfer")


def poll_slot(job_id):
    """The poll slot of a job: stable, and spread evenly over job ids."""
    return zlib.crc32(job_id.encode("utf-8")) % POLL_SLOTS


def backfill_version_7(cursor, placeholder):
    """Version 7: the scheduler's rows; each job's share (its submitter) and poll slot."""
    for step in SCHEDULING_STEPS:
        cursor.execute(f"SELECT COUNT(*) FROM scheduler WHERE step = {placeholder}", (step,))
        if not cursor.fetchone()[0]:
            cursor.execute(f"INSERT INTO scheduler (step, released) VALUES ({placeholder}, 0)", (step,))
    cursor.execute("UPDATE jobs SET share = COALESCE(submitter, 'anonymous') WHERE share IS NULL")
    last = ""
    while True:  # every row, in key order, a thousand at a time (poll_slot 0 is a real slot too)
        cursor.execute(f"SELECT job_id FROM jobs WHERE job_id > {placeholder} ORDER BY job_id LIMIT 1000", (last,))
        ids = [row[0] for row in cursor.fetchall()]
        if not ids:
            return
        cursor.executemany(f"UPDATE jobs SET poll_slot = {placeholder} WHERE job_id = {placeholder}",
                           [(poll_slot(job_id), job_id) for job_id in ids])
        last = ids[-1]


def _bucket(row):
    """The bucket a job (the trigger's OLD or NEW row) is counted in: job_count_changes' columns but delta."""
    return (f"{row}.status, {row}.lease_until IS NOT NULL, COALESCE({row}.share, ''),"
            f" COALESCE({row}.destination_host, '')")


def count_triggers(dialect):
    """(name, CREATE TRIGGER) of the three triggers that append each job's change of bucket (version 9)."""
    append = "INSERT INTO job_count_changes (status, held, share, destination_host, delta) VALUES"
    same = " AND ".join(f"OLD.{column} {'<=>' if dialect == 'mysql' else 'IS'} NEW.{column}"
                        for column in ("status", "share", "destination_host"))
    same += " AND (OLD.lease_until IS NULL) = (NEW.lease_until IS NULL)"
    moved = f"{append} ({_bucket('OLD')}, -1), ({_bucket('NEW')}, 1)"
    if dialect == "mysql":
        return [
            ("jobs_counted_insert", f"CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs FOR EACH ROW"
                                    f" {append} ({_bucket('NEW')}, 1)"),
            ("jobs_counted_update", f"CREATE TRIGGER jobs_counted_update AFTER UPDATE ON jobs FOR EACH ROW"
                                    f" BEGIN IF NOT ({same}) THEN {moved}; END IF; END"),
            ("jobs_counted_delete", f"CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs FOR EACH ROW"
                                    f" {append} ({_bucket('OLD')}, -1)"),
        ]
    return [
        ("jobs_counted_insert", f"CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs"
                                f" BEGIN {append} ({_bucket('NEW')}, 1); END"),
        ("jobs_counted_update", f"CREATE TRIGGER jobs_counted_update AFTER UPDATE OF status, lease_until, share,"
                                f" destination_host ON jobs WHEN NOT ({same}) BEGIN {moved}; END"),
        ("jobs_counted_delete", f"CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs"
                                f" BEGIN {append} ({_bucket('OLD')}, -1); END"),
    ]


COUNTS_SINCE = 9  # the schema version of job_counts and its triggers


def count_jobs(cursor, placeholder):
    """Version 9: job_counts from the jobs as they are, the changes appended before dropped.

    No job may change meanwhile: SQLite runs it in the migration's
    transaction, MySQL under LOCK TABLES (transferd.store.mysql.recount_jobs).
    """
    cursor.execute("DELETE FROM job_count_changes")
    cursor.execute("DELETE FROM job_counts")
    for counted_by, name in (("all", "''"), ("share", "COALESCE(share, '')"),
                             ("host", "COALESCE(destination_host, '')")):
        cursor.execute(f"INSERT INTO job_counts (counted_by, status, held, name, total)"
                       f" SELECT {placeholder}, status, lease_until IS NOT NULL, {name}, COUNT(*) FROM jobs"
                       f" GROUP BY status, lease_until IS NOT NULL, {name}", (counted_by,))


# Steps that move data, by schema version, run after the version's DDL: callable(cursor, placeholder).
BACKFILLS = {3: [backfill_version_3], 7: [backfill_version_7], COUNTS_SINCE: [count_jobs]}


def sqlite_migrations():
    """Per schema version, the SQLite statements that bring a database to it (run in one transaction)."""
    migrations = []
    for version in range(1, LATEST + 1):
        created, added, indexed = changes(version)
        steps = [SCHEMA_VERSION.create("sqlite", version, if_missing=True)] if version == 1 else []
        steps += [table.create("sqlite", version) for table in created]
        steps += [f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.definition('sqlite')}"
                  for table, column in added]
        steps += [table.create_index(index, version) for table, index in indexed]
        for table, index in redefined(version):
            steps += [f"DROP INDEX IF EXISTS {index.name}", table.create_index(index)]
        if version == COUNTS_SINCE:
            steps += [sql for _name, sql in count_triggers("sqlite")]
        steps += [lambda cursor, fill=fill: fill(cursor, "?") for fill in BACKFILLS.get(version, ())]
        migrations.append(steps)
    return migrations
