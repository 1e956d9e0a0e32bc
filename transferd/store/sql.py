"""The SQL JobStore shared by SQLite and MySQL, over twisted.enterprise.adbapi.

Queries are written once with '?' placeholders; a dialect supplies the
placeholder style, the schema migrations and the time column conversions.
"""

import hashlib
import json
from datetime import datetime

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from transferd import jobs, leases
from transferd.interfaces import IJobStore, StoreUnavailable
from transferd.scheduler import ANONYMOUS, Counts, TooManyWaiting
from transferd.store import schema

SELECT_JOB = "SELECT " + ", ".join(jobs.COLUMNS) + " FROM jobs"
SELECT_PAGE = "SELECT " + ", ".join("jobs." + column for column in jobs.COLUMNS) + " FROM jobs"
TIME_COLUMNS = frozenset(column.name for column in schema.JOBS.columns if column.kind == "time")
EVENT_COLUMNS = tuple(column.name for column in schema.JOB_EVENTS.columns)
# Where the columns converted from the database's types stand in a row of SELECT_JOB (which is jobs.COLUMNS,
# in the Job's field order).
TIME_AT = tuple(at for at, name in enumerate(jobs.COLUMNS) if name in TIME_COLUMNS)
COUNT_AT = tuple((jobs.COLUMNS.index(name), default) for name, default in
                 (("stage_attempts", 0), ("deliveries", 0), ("priority", jobs.DEFAULT_PRIORITY), ("poll_slot", 0)))
SECONDS_AT = tuple(jobs.COLUMNS.index(name) for name in ("lease_until", "poll_until"))
# What create_many inserts for each new job, in this order.
NEW_JOB_COLUMNS = ("job_id", "product_id", "destination_path", "destination_host", "submitter", "priority", "label",
                   "metadata", "status", "stage_attempts", "time_submitted", "time_updated", "lease_owner",
                   "lease_until", "notify_url", "share", "poll_slot")
INSERT_EVENT = ("INSERT INTO job_events (job_id, time, kind, old_status, new_status, actor, reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)")
# A state change is also an event to send (transferd.events): its outbox row, in the same transaction.
INSERT_OUTBOX = "INSERT INTO outbox (event_id, job_id, state, fanned_out, time_created) VALUES (?, ?, ?, 0, ?)"
# A lease that anyone may take (parameters: now, the queue-hold owner); see transferd.leases.
FREE_OR_IN_QUEUE = "(lease_until IS NULL OR lease_until < ? OR lease_owner = ?)"


def _known(columns):
    """columns, when every one is a jobs column; ValueError naming the others."""
    unknown = set(columns) - set(jobs.COLUMNS)
    if unknown:
        raise ValueError(f"unknown job fields: {sorted(unknown)}")
    return columns


def _chunks(values, size=500):
    """values in lists of at most size: the parameters of one statement stay well under SQLite's 999."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer transferd than this one."""


class SubmissionExists(Exception):
    """A batch with this submitter and submission_id is stored already (IJobStore.create_many)."""


def submission_key(submitter, submission_id):
    """The submissions table's key: SHA-256 hex of the submitter and their submission_id."""
    return hashlib.sha256(f"{submitter or ''}\n{submission_id}".encode("utf-8")).hexdigest()


class DatabaseUnavailable(StoreUnavailable):
    """The database could not be reached, or dropped the connection mid-operation.

    Raised by stores that retry lost connections (MySQL) once retrying is
    pointless or unsafe.  The operation may or may not have taken effect: the
    caller re-reads the job, or leaves it to the reconciler to re-drive.
    reason: the server's or client library's own words.
    """

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


@implementer(IJobStore)
class SQLJobStore(Service):
    """A JobStore over an adbapi ConnectionPool.

    Subclasses set `placeholder`, `row_locator` (the column that says where a row is stored), `migrations` (a list of lists of statements,
    migration N bringing the schema to version N; a statement may also be a
    callable(cursor), for steps that must inspect the schema first) and may override
    `_time_to_db`, `_time_from_db` and `_run` (to retry lost connections).
    metrics (transferd.metrics.Metrics) counts the transitions and the time
    jobs spent in the states they leave.
    """

    log = Logger()
    placeholder = "?"
    row_locator = "rowid"  # SQLite keeps a table's rows in rowid order: the order they were inserted
    migrations: list = []
    # Appended to take_for_polling's SELECT where the database can skip rows that
    # another poller's transaction has locked, so concurrent pollers pick
    # different candidates.
    skip_locked = ""
    lock_rows = ""  # MySQL: " FOR UPDATE", so a read of rows to change locks them (SQLite locks the database)
    # Adds to a job_counts row, making it when missing (fold_job_counts).
    add_to_count = ("INSERT INTO job_counts (counted_by, status, held, name, total) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (counted_by, status, held, name) DO UPDATE SET total = total + excluded.total")
    fold_batch = 10000  # changes a fold takes at most

    def __init__(self, pool, clock, metrics=None):
        self.pool = pool
        self.clock = clock
        self.metrics = metrics

    # -- service ------------------------------------------------------------

    def startService(self):
        """Migrate the schema: the daemon starts nothing that uses the store before this fires."""
        super().startService()
        return self.migrate()

    def stopService(self):
        super().stopService()
        self.pool.close()

    # -- plumbing ---------------------------------------------------------

    def _sql(self, query):
        return query.replace("?", self.placeholder) if self.placeholder != "?" else query

    def _run(self, interaction, *args, idempotent=True, together=None):
        """Run interaction(cursor, *args) in one transaction.

        together: for a short operation on a job's way, the id of the one job
        whose row it changes ("" when it changes none, or only rows it
        creates): a store may run it in a transaction shared with others
        (transferd.store.mysql._GroupCommit), in the order of those ids.
        None: a transaction of its own (it changes many rows, or takes long).
        """
        return self.pool.runInteraction(interaction, *args)

    def _now(self):
        return self.clock.seconds()

    def _time_to_db(self, moment: datetime):
        return moment.strftime("%Y-%m-%d %H:%M:%S.%f")

    def _time_from_db(self, value):
        if value is None or isinstance(value, datetime):
            return value.replace(tzinfo=jobs.timezone.utc) if value else None
        return datetime.fromisoformat(str(value)).replace(tzinfo=jobs.timezone.utc)

    def _job_from_row(self, row):
        """A Job from a row of SELECT_JOB (by position: listings turn thousands of rows into jobs)."""
        values = list(row)
        for at in TIME_AT:
            if values[at] is not None:
                values[at] = self._time_from_db(values[at])
        for at, default in COUNT_AT:
            values[at] = int(values[at] or default)
        for at in SECONDS_AT:
            if values[at] is not None:
                values[at] = float(values[at])
        return jobs.Job(*values)

    def _assignments(self, fields):
        """SET clause pieces and parameters for a dict of job fields."""
        _known(fields)
        return [f"{column} = ?" for column in fields], [self._to_db(column, value) for column, value in fields.items()]

    # -- schema -----------------------------------------------------------

    def schema_version(self):
        return self._run(self._read_version)

    def _read_version(self, cursor):
        try:
            cursor.execute("SELECT version FROM schema_version")
        except Exception:
            return 0
        row = cursor.fetchone()
        return int(row[0]) if row else 0

    def migrate(self):
        """Bring the schema to the newest version this code knows."""
        return self._run(self._migrate, idempotent=False)

    def _migrate(self, cursor):
        current = self._current_version(cursor)
        known = len(self.migrations)
        if current > known:
            raise SchemaTooNew(
                f"the database schema is version {current} but this transferd only knows "
                f"versions up to {known}: upgrade transferd before starting it on this database"
            )
        for version in range(current + 1, known + 1):
            for statement in self.migrations[version - 1]:
                if callable(statement):
                    statement(cursor)
                else:
                    cursor.execute(statement)
            self._write_version(cursor, version)
            self.log.info("database schema migrated to version {version}", version=version)
        return known

    def _current_version(self, cursor):
        return self._read_version(cursor)

    def _write_version(self, cursor, version):
        cursor.execute("DELETE FROM schema_version")
        cursor.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (version,))

    # -- IJobStore --------------------------------------------------------

    def create(self, job, hold=None, actor=None):
        return self.create_many([job], hold, actor)

    def create_many(self, new_jobs, hold=None, actor=None, submission=None, max_waiting=None):
        """max_waiting: (limit, retry_after): refuse (TooManyWaiting) jobs that would leave a share with more
        than limit jobs in SUBMITTED.  Counted in the insert's transaction; submissions of one share running
        at the same moment on several connections may each pass it."""
        now = self._now()
        moment = self._time_to_db(jobs.utc_from_seconds(now))
        lease = self._lease_fields(hold, now)
        rows = [
            (job.job_id, job.product_id, job.destination_path, schema.destination_host(job.destination_path),
             job.submitter, job.priority, job.label, job.metadata, jobs.SUBMITTED, 0, moment, moment,
             lease["lease_owner"], lease["lease_until"], job.notify_url, job.share or job.submitter or ANONYMOUS,
             schema.poll_slot(job.job_id))
            for job in new_jobs
        ]
        insert_jobs = self._sql(
            f"INSERT INTO jobs ({', '.join(NEW_JOB_COLUMNS)}) VALUES ({', '.join('?' for _ in NEW_JOB_COLUMNS)})"
        )
        events = [(job.job_id, moment, "state", None, jobs.SUBMITTED, actor, None) for job in new_jobs]

        def interaction(cursor):
            if max_waiting is not None:
                self._check_waiting(cursor, rows, *max_waiting)
            if submission is not None:
                self._insert_submission(cursor, submission, moment)
            if rows:
                cursor.executemany(insert_jobs, rows)
                cursor.executemany(self._sql(INSERT_EVENT), events)
                # the outbox rows of the SUBMITTED events just written
                for chunk in _chunks([job.job_id for job in new_jobs]):
                    cursor.execute(self._sql(
                        "INSERT INTO outbox (event_id, job_id, state, fanned_out, time_created)"
                        " SELECT event_id, job_id, new_status, 0, time FROM job_events"
                        f" WHERE job_id IN ({self._marks(chunk)})"), chunk)

        return self._run(interaction, idempotent=False, together="").addCallback(self._events_committed, bool(rows), False)

    def _check_waiting(self, cursor, rows, limit, retry_after):
        adding = {}
        for row in rows:
            share = row[NEW_JOB_COLUMNS.index("share")]
            adding[share] = adding.get(share, 0) + 1
        for share, count in sorted(adding.items()):
            cursor.execute(self._sql("SELECT COUNT(*) FROM jobs WHERE status = ? AND lease_until IS NULL AND share = ?"),
                           (jobs.SUBMITTED, share))
            waiting = int(cursor.fetchone()[0])
            if waiting + count > limit:
                raise TooManyWaiting(share, waiting, limit, retry_after)

    def _insert_submission(self, cursor, submission, moment):
        """The submission's row goes first: a second one with its key waits for the first's commit, then fails."""
        try:
            cursor.execute(
                self._sql("INSERT INTO submissions (submission_key, submitter, submission_id, time_submitted, results)"
                          " VALUES (?, ?, ?, ?, ?)"),
                (submission_key(submission.submitter, submission.submission_id), submission.submitter,
                 submission.submission_id, moment, json.dumps(submission.answer)),
            )
        except self.pool.dbapi.IntegrityError:
            raise SubmissionExists(submission.submission_id) from None

    def submission(self, submitter, submission_id):
        query = self._sql("SELECT results FROM submissions WHERE submission_key = ?")

        def interaction(cursor):
            cursor.execute(query, (submission_key(submitter, submission_id),))
            row = cursor.fetchone()
            return json.loads(row[0]) if row else None

        return self._run(interaction, together="")

    def get(self, job_id):
        def interaction(cursor):
            return self._select_job(cursor, job_id)

        return self._run(interaction, together=job_id)

    def list_jobs(self, job_filter, limit, after=None):
        query, params = self.list_query(job_filter, limit, after)

        def interaction(cursor):
            cursor.execute(query, params)
            return [self._job_from_row(row) for row in cursor.fetchall()]

        return self._run(interaction)

    def list_query(self, job_filter, limit, after=None):
        """The SELECT of list_jobs and its parameters (scripts/benchmark.py shows its EXPLAIN)."""
        clauses, params = self._filter(job_filter)
        if after is not None:
            moment, job_id = after
            if moment is None:  # rows from before time_submitted was always set sort last
                clauses.append("(time_submitted IS NULL AND job_id < ?)")
                params.append(job_id)
            else:
                moment = self._time_to_db(moment)
                clauses.append("(time_submitted < ? OR (time_submitted = ? AND job_id < ?) OR time_submitted IS NULL)")
                params += [moment, moment, job_id]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        # A deferred join: the page's rows are picked from an index alone, then read by where they are stored
        # (row_locator: jobs submitted together lie together).  Asked for whole rows at once, MariaDB walks the
        # status index from the newest job and reads every row it passes.
        return self._sql(
            SELECT_PAGE + f" JOIN (SELECT {self.row_locator} AS locator FROM jobs{where}"
            f" ORDER BY time_submitted DESC, job_id DESC LIMIT ?) page ON page.locator = jobs.{self.row_locator}"
            " ORDER BY jobs.time_submitted DESC, jobs.job_id DESC"
        ), (*params, limit)

    def _filter(self, job_filter):
        """WHERE clauses and their parameters for a jobs.JobFilter."""
        clauses, params = [], []
        for column, values in (("status", job_filter.statuses), ("job_id", job_filter.job_ids)):
            if values:
                clauses.append(f"{column} IN ({', '.join('?' for _ in values)})")
                params += list(values)
        for column in ("product_id", "label", "destination_host", "submitter"):
            value = getattr(job_filter, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        for clause, moment in (("time_submitted > ?", job_filter.submitted_after),
                               ("time_submitted < ?", job_filter.submitted_before),
                               ("time_updated > ?", job_filter.updated_after)):
            if moment is not None:
                clauses.append(clause)
                params.append(self._time_to_db(moment))
        return clauses, params

    def count_by_status(self, submitter=None):
        """Jobs by state, from job_counts (a row per state); submitter: only that submitter's jobs, counted on
        the index jobs_submitter_status."""
        if submitter is None:
            def interaction(cursor):
                by_status = {}
                for (status, _held, _name), total in self._counts(cursor, "all", jobs.STATES).items():
                    by_status[status] = by_status.get(status, 0) + total
                return {status: total for status, total in by_status.items() if total > 0}

            return self._run(interaction)
        query = self._sql("SELECT status, COUNT(*) FROM jobs WHERE submitter = ? GROUP BY status")

        def interaction(cursor):
            cursor.execute(query, (submitter,))
            return {status: int(count) for status, count in cursor.fetchall()}

        return self._run(interaction)

    # -- job counts (schema version 9: job_counts, job_count_changes and the triggers that append to it) ------

    def _counts(self, cursor, counted_by, statuses):
        """{(status, held, name): jobs} for statuses: what job_counts holds plus the changes not folded yet.

        One statement, so a fold committing meanwhile is seen either wholly or not at all; summed here, so
        the server streams the rows without a temporary table.
        """
        marks = ", ".join("?" for _ in statuses)
        name = {"all": "''", "share": "share", "host": "destination_host"}[counted_by]
        cursor.execute(self._sql(
            f"SELECT status, held, name, total FROM job_counts WHERE counted_by = ? AND status IN ({marks})"
            f" UNION ALL SELECT status, held, {name}, delta FROM job_count_changes WHERE status IN ({marks})"),
            (counted_by, *statuses, *statuses))
        counts = {}
        for status, held, name, total in cursor.fetchall():
            key = (status, int(held), name)
            counts[key] = counts.get(key, 0) + int(total)
        return counts

    def fold_job_counts(self):
        """Fold up to fold_batch appended changes into job_counts, in a transaction of its own (_fold)."""
        return self._run(self._fold)

    def _fold(self, cursor):
        """Fold up to fold_batch appended changes into job_counts; return how many were folded.

        On MySQL the changes are taken FOR UPDATE SKIP LOCKED and removed by
        id: a daemon folding at the same moment takes others, and a change
        whose transaction has not committed yet waits for a later fold.  Rows
        that fall to zero go, so a share or host without jobs in a bucket
        costs no read.  Safe to run again after a lost connection.
        """
        cursor.execute(self._sql("SELECT change_id, status, held, share, destination_host, delta FROM job_count_changes"
                                 " ORDER BY change_id LIMIT ?" + self.skip_locked), (self.fold_batch,))
        rows = cursor.fetchall()
        totals = {}
        for _change, status, held, share, host, delta in rows:
            for key in (("all", status, int(held), ""), ("share", status, int(held), share),
                        ("host", status, int(held), host)):
                totals[key] = totals.get(key, 0) + int(delta)
        changed = sorted(key for key, delta in totals.items() if delta)  # in key order: no deadlock
        if changed:
            cursor.executemany(self._sql(self.add_to_count), [(*key, totals[key]) for key in changed])
        fallen = [key for key in changed if totals[key] < 0]
        for chunk in _chunks(fallen, 200):
            cursor.execute(self._sql("DELETE FROM job_counts WHERE total = 0 AND (counted_by, status, held, name)"
                                     f" IN ({', '.join('(?, ?, ?, ?)' for _ in chunk)})"),
                           [value for key in chunk for value in key])
        for chunk in _chunks([row[0] for row in rows], 1000):
            cursor.execute(self._sql(f"DELETE FROM job_count_changes WHERE change_id IN ({self._marks(chunk)})"),
                           chunk)
        return len(rows)

    # -- what the dashboard sums up (transferd.dashboard) ---------------------------
    # Each reads one index range: submitted since (jobs_submitted, or jobs_submitter_submitted for one
    # submitter), ended since (jobs_status_updated, or jobs_submitter_status), active now (the status indexes).

    BREAKDOWN_COLUMNS = frozenset({"destination_host", "stager_hostname"})

    @staticmethod
    def _marks(values):
        return ", ".join("?" for _ in values)

    def _mine(self, submitter):
        return (" AND submitter = ?", (submitter,)) if submitter is not None else ("", ())

    def activity(self, since, submitter=None):
        ended = sorted(jobs.TERMINAL)
        mine, who = self._mine(submitter)
        submitted = self._sql("SELECT COUNT(*) FROM jobs WHERE time_submitted > ?" + mine)
        finished = self._sql(f"SELECT status, COUNT(*) FROM jobs WHERE status IN ({self._marks(ended)})"
                             f" AND time_updated > ?{mine} GROUP BY status")
        moment = self._time_to_db(since)

        def interaction(cursor):
            cursor.execute(submitted, (moment, *who))
            counts = {"submitted": int(cursor.fetchone()[0]), **{status: 0 for status in ended}}
            cursor.execute(finished, (*ended, moment, *who))
            counts.update({status: int(count) for status, count in cursor.fetchall()})
            return counts

        return self._run(interaction)

    def counts_by(self, column, since, submitter=None):
        if column not in self.BREAKDOWN_COLUMNS:
            raise ValueError(f"cannot count jobs by {column!r}")
        mine, who = self._mine(submitter)
        outcomes = (jobs.SUCCESS, jobs.ERROR)
        active = self._sql(f"SELECT {column}, status, COUNT(*) FROM jobs WHERE status IN ({self._marks(jobs.ACTIVE)})"
                           f"{mine} GROUP BY {column}, status")
        ended = self._sql(f"SELECT {column}, status, COUNT(*) FROM jobs WHERE status IN ({self._marks(outcomes)})"
                          f" AND time_updated > ?{mine} GROUP BY {column}, status")

        def interaction(cursor):
            counts = {}
            cursor.execute(active, (*jobs.ACTIVE, *who))
            rows = cursor.fetchall()
            cursor.execute(ended, (*outcomes, self._time_to_db(since), *who))
            for key, status, count in [*rows, *cursor.fetchall()]:
                counts.setdefault(key or None, {})[status] = int(count)
            return counts

        return self._run(interaction)

    def failure_reasons(self, since, submitter=None, limit=1000):
        mine, who = self._mine(submitter)
        query = self._sql("SELECT detailed_status, COUNT(*), MAX(time_updated) FROM jobs WHERE status = ?"
                          f" AND time_updated > ?{mine} GROUP BY detailed_status ORDER BY COUNT(*) DESC LIMIT ?")

        def interaction(cursor):
            cursor.execute(query, (jobs.ERROR, self._time_to_db(since), *who, limit))
            return [(reason or "", int(count), self._time_from_db(latest))
                    for reason, count, latest in cursor.fetchall()]

        return self._run(interaction)

    def recent_failures(self, since, limit, submitter=None):
        mine, who = self._mine(submitter)
        query = self._sql(SELECT_JOB + f" WHERE status = ? AND time_updated > ?{mine}"
                                       " ORDER BY time_updated DESC LIMIT ?")

        def interaction(cursor):
            cursor.execute(query, (jobs.ERROR, self._time_to_db(since), *who, limit))
            return [self._job_from_row(row) for row in cursor.fetchall()]

        return self._run(interaction)

    def count_before(self, status, column, moment):
        if column not in ("time_submitted", "time_updated"):
            raise ValueError(f"count_before counts by time_submitted or time_updated, not {column!r}")
        query = self._sql(f"SELECT COUNT(*) FROM jobs WHERE status = ? AND {column} < ?")

        def interaction(cursor):
            cursor.execute(query, (status, self._time_to_db(moment)))
            return int(cursor.fetchone()[0])

        return self._run(interaction)

    def recent_successes(self, destination_host, since, limit):
        query = self._sql(SELECT_JOB + " WHERE destination_host = ? AND time_submitted >= ? AND status = ?"
                          " ORDER BY time_submitted DESC LIMIT ?")

        def interaction(cursor):
            cursor.execute(query, (destination_host, self._time_to_db(since), jobs.SUCCESS, limit))
            return [self._job_from_row(row) for row in cursor.fetchall()]

        return self._run(interaction)

    def purge_ended(self, before, limit, archive=None):
        """Remove up to limit ended jobs last changed before `before` (a datetime), with their history.

        One short transaction (index jobs_status_updated).  archive(jobs,
        events), if given, runs in it after the deletes, before the commit:
        if it raises, nothing is removed.  A job with an event delivery still
        pending stays; the outbox and delivery rows of those removed go with them.  On MySQL the rows are taken FOR UPDATE SKIP
        LOCKED, so daemons purging at once take different rows.  Fires with
        the number of jobs removed.
        """
        ended = sorted(jobs.TERMINAL)
        select = self._sql(SELECT_JOB + f" WHERE status IN ({', '.join('?' for _ in ended)}) AND time_updated < ?"
                           " AND NOT EXISTS (SELECT 1 FROM event_deliveries WHERE event_deliveries.job_id = jobs.job_id"
                           " AND event_deliveries.status = 'pending')"
                           " LIMIT ?" + self.skip_locked)

        def interaction(cursor):
            cursor.execute(select, (*ended, self._time_to_db(before), limit))
            found = [self._job_from_row(row) for row in cursor.fetchall()]
            if not found:
                return 0
            ids = [job.job_id for job in found]
            marks = ", ".join("?" for _ in ids)
            if archive is not None:
                cursor.execute(self._sql(f"SELECT {', '.join(EVENT_COLUMNS)} FROM job_events WHERE job_id IN"
                                         f" ({marks}) ORDER BY event_id"), ids)
                events = [dict(zip(EVENT_COLUMNS, row)) for row in cursor.fetchall()]
                for row in events:
                    row["time"] = self._time_from_db(row["time"])
            cursor.execute(self._sql(f"DELETE FROM event_deliveries WHERE job_id IN ({marks})"), ids)
            cursor.execute(self._sql(f"DELETE FROM outbox WHERE job_id IN ({marks})"), ids)
            cursor.execute(self._sql(f"DELETE FROM job_events WHERE job_id IN ({marks})"), ids)
            cursor.execute(self._sql(f"DELETE FROM jobs WHERE job_id IN ({marks})"), ids)
            removed = cursor.rowcount
            if archive is not None:  # last before the commit: a deadlock in the deletes archives nothing
                archive(found, events)
            return removed

        return self._run(interaction)

    def purge_submissions(self, before, limit):
        """Remove up to limit submissions rows older than `before`; fire with how many (index submissions_time)."""
        select = self._sql("SELECT submission_key FROM submissions WHERE time_submitted < ? LIMIT ?" + self.skip_locked)

        def interaction(cursor):
            cursor.execute(select, (self._time_to_db(before), limit))
            keys = [row[0] for row in cursor.fetchall()]
            if not keys:
                return 0
            cursor.execute(self._sql(f"DELETE FROM submissions WHERE submission_key IN ({', '.join('?' for _ in keys)})"),
                           keys)
            return cursor.rowcount

        return self._run(interaction)

    def copies_freed(self, job_ids):
        """The ended jobs' staged copies are gone: set time_copy_freed (nothing else changes); fire with how many.

        stager_path stays in the row (a repeated staging report is still
        recognised) but is no longer shown (jobs.Job.public_view).
        """
        job_ids = sorted(set(job_ids))
        if not job_ids:
            return defer.succeed(0)
        ended = sorted(jobs.TERMINAL)
        moment = self._time_to_db(jobs.utc_from_seconds(self._now()))

        def interaction(cursor):
            changed = 0
            for chunk in _chunks(job_ids):
                cursor.execute(self._sql(f"UPDATE jobs SET time_copy_freed = ? WHERE job_id IN ({self._marks(chunk)})"
                                         f" AND time_copy_freed IS NULL AND status IN ({self._marks(ended)})"),
                               (moment, *chunk, *ended))
                changed += max(0, cursor.rowcount)
            return changed

        # One job's: it may share a transaction (_GroupCommit); several: a transaction of their own.
        return self._run(interaction, together=job_ids[0] if len(job_ids) == 1 else None)

    def _transition_fields(self, old, new, fields, hold, now):
        """Every column a transition old -> new sets: fields, the new state and its time, the lease under hold."""
        fields = dict(fields or {})
        jobs.check_transition(old, new, fields)
        moment = jobs.utc_from_seconds(now)
        # A new state: deliveries start afresh (a worker's lease the job stays under counts); any outage is over.
        fields.update(status=new, deliveries=int(hold is not None and leases.is_worker(hold.owner)), time_away=None,
                      time_updated=moment, **{jobs.TIME_COLUMN[new]: moment}, **self._lease_fields(hold, now))
        return fields

    def _transitioned(self, job_id, old, new, reason, now, times):
        """After the commit of a transition: its metrics (times: when the job entered old, and was submitted), its
        log line."""
        if self.metrics is not None and times:
            since = [now - self._time_from_db(t).timestamp() if t is not None else None for t in times[:2]]
            self.metrics.transitioned(old, new, *since)
        self.log.info("job {job_id} {old} -> {new}{why}", job_id=job_id, old=old, new=new,
                      why=f": {reason}" if reason else "")

    def transition(self, job_id, old, new, fields=None, hold=None, actor=None):
        now = self._now()
        fields = self._transition_fields(old, new, fields, hold, now)
        sets, params = self._assignments(fields)
        query = self._sql(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ? AND status = ?")
        reason = fields.get("detailed_status")
        # When the job entered old (or began its latest attempt there) and was submitted, for metrics.
        entered = self._sql(f"SELECT {jobs.TIME_COLUMN[old]}, time_submitted FROM jobs WHERE job_id = ?")
        times = []

        def interaction(cursor):
            cursor.execute(query, (*params, job_id, old))
            if cursor.rowcount <= 0:
                return False
            self._record_event(cursor, job_id, now, "state", old, new, actor, reason)
            if self.metrics is not None:
                cursor.execute(entered, (job_id,))
                times[:] = cursor.fetchone() or ()  # [:]: a transaction run again replaces them
            return True

        def logged(changed):
            if changed:
                self._transitioned(job_id, old, new, reason, now, times)
                self._events_committed(None)
            return changed

        return self._run(interaction, idempotent=False, together=job_id).addCallback(logged)

    def transition_many(self, old, new, changes, actor=None):
        """transition() of many jobs old -> new in one transaction, free afterwards; fire with the ids that moved.

        changes: {job_id: fields}, each job's own (an FTS poll's finished
        jobs each have their fts_details).  One SELECT locks the jobs' rows
        (in the order of their ids, as every transaction here does) and
        reads who is still in old; one UPDATE moves them all, a column that
        differs between the jobs set by CASE job_id.  A job no longer in
        old (cancelled meanwhile) is left as it is, and not in the answer.
        """
        now = self._now()
        wanted = {job_id: self._transition_fields(old, new, fields, None, now) for job_id, fields in changes.items()}
        if not wanted:
            return defer.succeed(set())
        columns = _known(sorted({column for fields in wanted.values() for column in fields}))
        found = {}  # job_id -> (time it entered old, time_submitted)

        def interaction(cursor):
            found.clear()  # a transaction run again starts afresh
            for chunk in _chunks(sorted(wanted), 100):  # (a CASE takes two parameters a job)
                cursor.execute(self._sql(f"SELECT job_id, status, {jobs.TIME_COLUMN[old]}, time_submitted FROM jobs"
                                         f" WHERE job_id IN ({self._marks(chunk)}) ORDER BY job_id" + self.lock_rows),
                               chunk)
                found.update({job_id: times for job_id, status, *times in cursor.fetchall() if status == old})
            for chunk in _chunks(sorted(found), 100):
                sets, params = self._assignments_of_many(columns, chunk, wanted)
                cursor.execute(self._sql(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id IN ({self._marks(chunk)})"
                                         f" AND status = ?"), (*params, *chunk, old))
                for job_id in chunk:
                    self._record_event(cursor, job_id, now, "state", old, new, actor,
                                       wanted[job_id].get("detailed_status"))
            return set(found)

        def logged(moved):
            for job_id in sorted(moved):
                self._transitioned(job_id, old, new, wanted[job_id].get("detailed_status"), now, found[job_id])
            if moved:
                self._events_committed(None)
            return moved

        # One job's (a synchronous mover's outcome): it may share a transaction (_GroupCommit).
        together = next(iter(wanted)) if len(wanted) == 1 else None
        return self._run(interaction, idempotent=False, together=together).addCallback(logged)

    def _assignments_of_many(self, columns, job_ids, wanted):
        """SET clause pieces and parameters giving each of job_ids its own wanted[job_id] values of columns."""
        sets, params = [], []
        for column in columns:
            values = [self._to_db(column, wanted[job_id].get(column)) for job_id in job_ids]
            if all(value == values[0] for value in values):
                sets.append(f"{column} = ?")
                params.append(values[0])
            else:
                sets.append(f"{column} = CASE job_id {' '.join('WHEN ? THEN ?' for _ in job_ids)} END")
                params.extend(item for pair in zip(job_ids, values) for item in pair)
        return sets, params

    def _to_db(self, column, value):
        return self._time_to_db(value) if column in TIME_COLUMNS and value is not None else value

    def update(self, job_id, status, fields, note=None):
        """note: (actor, reason) of an attempt, recorded in the job's history with the change."""
        now = self._now()
        fields = dict(fields, time_updated=jobs.utc_from_seconds(now))
        sets, params = self._assignments(fields)
        query = self._sql(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ? AND status = ?")

        def interaction(cursor):
            cursor.execute(query, (*params, job_id, status))
            if cursor.rowcount <= 0:
                return False
            if note is not None:
                self._record_event(cursor, job_id, now, "attempt", status, status, *note)
            return True

        return self._run(interaction, idempotent=note is None, together=job_id)

    def note(self, job_id, status, actor, reason):
        """Record an attempt in the history of a job still in status (nothing else changes); fire True/False."""
        return self.update(job_id, status, {}, note=(actor, reason))

    def events(self, job_id):
        """The job's history, oldest first: dicts of EVENT_COLUMNS (time as a datetime)."""
        query = self._sql(f"SELECT {', '.join(EVENT_COLUMNS)} FROM job_events WHERE job_id = ? ORDER BY event_id")

        def interaction(cursor):
            cursor.execute(query, (job_id,))
            rows = [dict(zip(EVENT_COLUMNS, row)) for row in cursor.fetchall()]
            for row in rows:
                row["time"] = self._time_from_db(row["time"])
            return rows

        return self._run(interaction)

    def record_stager_request(self, job_id, request_id):
        # The jobs of one staging request share its poll slot: one daemon polls the request (transferd.fleet).
        return self.update(job_id, jobs.STAGING, {"stager_request": request_id,
                                                  "poll_slot": schema.poll_slot(request_id)})

    def record_transfer_id(self, job_id, status, fts_jobid):
        return self.update(job_id, status, {"fts_jobid": fts_jobid})

    def _take_query(self, statuses):
        return self._sql(
            f"UPDATE jobs SET lease_owner = ?, lease_until = ?, deliveries = deliveries + ? WHERE job_id = ?"
            f" AND status IN ({self._marks(statuses)}) AND {FREE_OR_IN_QUEUE}"
        )

    def take_lease(self, job_id, statuses, owner, seconds):
        statuses = list(statuses)
        now = self._now()
        query = self._take_query(statuses)
        counted = int(leases.is_worker(owner))

        def interaction(cursor):
            cursor.execute(query, (owner, now + seconds, counted, job_id, *statuses, now, leases.IN_QUEUE))
            return self._select_job(cursor, job_id) if cursor.rowcount > 0 else None

        return self._run(interaction, idempotent=False, together=job_id)

    def claim(self, job_id, statuses, owner, seconds, start, fresh=("deliveries",)):
        """take_lease for a worker, and for a job in start's old state whose fresh columns are all 0 (no worker
        took it before) start's transition in the same UPDATE; fire with (the Job as leased, or None; whether it
        moved).  start: (old, new, fields, actor), as transition() takes them.

        The first step of a job's way then costs one UPDATE, where a lease
        and a transition cost two and a read of the old state's time.
        """
        old, new, fields, actor = start
        statuses = list(statuses)
        now = self._now()
        moved = self._transition_fields(old, new, fields, leases.worker(owner, seconds), now)
        sets, params = self._assignments(moved)
        move = self._sql(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ? AND status = ?"
                         + "".join(f" AND {column} = 0" for column in fresh) + f" AND {FREE_OR_IN_QUEUE}")
        take = self._take_query(statuses)
        reason = moved.get("detailed_status")

        def interaction(cursor):
            cursor.execute(move, (*params, job_id, old, now, leases.IN_QUEUE))
            if cursor.rowcount > 0:
                self._record_event(cursor, job_id, now, "state", old, new, actor, reason)
                return self._select_job(cursor, job_id), True
            cursor.execute(take, (owner, now + seconds, 1, job_id, *statuses, now, leases.IN_QUEUE))
            return (self._select_job(cursor, job_id) if cursor.rowcount > 0 else None), False

        def logged(taken):
            job, started = taken
            if started:  # the row read back still has the old state's time (time_<new> is new)
                self._transitioned(job_id, old, new, reason, now,
                                   (getattr(job, jobs.TIME_COLUMN[old]), job.time_submitted))
                self._events_committed(None)
            return taken

        return self._run(interaction, idempotent=False, together=job_id).addCallback(logged)

    def hold_in_queue(self, status, job_ids, seconds):
        now = self._now()
        query = self._sql(f"UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE status = ? AND job_id = ?"
                          f" AND {FREE_OR_IN_QUEUE}")
        return self._each_job(query, sorted(set(job_ids)),
                              lambda job_id: (leases.IN_QUEUE, now + seconds, status, job_id, now, leases.IN_QUEUE))

    def renew_leases(self, owner, job_ids, seconds):
        until = self._now() + seconds
        query = self._sql("UPDATE jobs SET lease_until = ? WHERE lease_owner = ? AND job_id = ?")
        return self._each_job(query, sorted(set(job_ids)), lambda job_id: (until, owner, job_id))

    def _each_job(self, query, job_ids, params):
        """query (an UPDATE of one job) for each of job_ids, in the order given, in one transaction; fire with
        the rows changed.  One job at a time, in the order of their ids, as _GroupCommit's transactions lock job
        rows (an UPDATE of many by IN locks them in the order of whatever index it reads): no deadlock."""
        if not job_ids:
            return defer.succeed(0)

        def interaction(cursor):
            changed = 0
            for job_id in job_ids:
                cursor.execute(query, params(job_id))
                changed += max(0, cursor.rowcount)
            return changed

        return self._run(interaction, idempotent=True)

    def end_lease(self, job_id, owner, then=None):
        fields = self._lease_fields(then, self._now())
        query = self._sql(
            "UPDATE jobs SET lease_owner = ?, lease_until = ?,"
            " deliveries = CASE WHEN deliveries > ? THEN deliveries - ? ELSE 0 END"
            " WHERE job_id = ? AND lease_owner = ?"
        )
        given_back = int(leases.is_worker(owner))  # a worker giving back: the delivery it counted is taken back
        params = [fields["lease_owner"], fields["lease_until"], given_back, given_back, job_id, owner]
        return self._rowcount(query, params, together=job_id)

    def jobs_to_redrive(self, statuses, limit, include_queue_holds=False):
        statuses = list(statuses)
        marks = ", ".join("?" for _ in statuses)
        # A range of the index (status, lease_until): only the free and the expired rows are read.
        due, queue_holds = "(lease_until IS NULL OR lease_until < ?)", []
        if include_queue_holds:  # once, at the start of a daemon whose queue died with it: read them all
            due, queue_holds = FREE_OR_IN_QUEUE, [leases.IN_QUEUE]
        query = self._sql(SELECT_JOB + f" WHERE status IN ({marks}) AND {due} ORDER BY time_submitted LIMIT ?")

        def interaction(cursor):
            cursor.execute(query, statuses + [self._now()] + queue_holds + [limit])
            return [self._job_from_row(row) for row in cursor.fetchall()]

        return self._run(interaction)

    def take_for_polling(self, status, owner, hold, limit, having=None, slots=None):
        """hold(age) -> seconds: how long a job held in status for `age` seconds is taken (transferd.polling).
        slots: (first, end): only jobs whose poll_slot is in [first, end) (this daemon's share, transferd.fleet)."""
        now = self._now()
        since = f"time_{status.lower()}"  # when the job entered status: its age there
        condition = f" AND {having} IS NOT NULL" if having else ""
        if slots is not None:
            condition += f" AND poll_slot >= {int(slots[0])} AND poll_slot < {int(slots[1])}"
        if having is not None and having not in jobs.COLUMNS:
            raise ValueError(f"unknown job field {having!r}")
        if since not in TIME_COLUMNS:
            raise ValueError(f"jobs in {status} are not polled: no {since}")
        select = self._sql(
            f"SELECT job_id, {since} FROM jobs WHERE status = ? AND (poll_until IS NULL OR poll_until < ?)"
            + condition + " ORDER BY poll_until LIMIT ?" + self.skip_locked
        )

        def interaction(cursor):
            cursor.execute(select, (status, now, limit))
            candidates = cursor.fetchall()
            if not candidates:
                return []
            by_until = {}  # the holds come in a few steps (transferd.polling.hold): one UPDATE each
            for job_id, entered in candidates:
                entered = self._time_from_db(entered)
                age = now - entered.timestamp() if entered is not None else 0.0
                by_until.setdefault(now + hold(max(0.0, age)), []).append(job_id)
            for until, ids in sorted(by_until.items()):
                marks = ", ".join("?" for _ in ids)
                # The poll_until test again: of several pollers, only one takes each job.
                cursor.execute(
                    self._sql(
                        f"UPDATE jobs SET poll_owner = ?, poll_until = ? WHERE job_id IN ({marks})"
                        " AND status = ? AND (poll_until IS NULL OR poll_until < ?)"
                    ),
                    (owner, until, *ids, status, now),
                )
            marks = ", ".join("?" for _ in candidates)
            cursor.execute(
                self._sql(SELECT_JOB + f" WHERE job_id IN ({marks}) AND poll_owner = ? AND poll_until > ?"),
                (*(job_id for job_id, _ in candidates), owner, now),
            )
            return [self._job_from_row(row) for row in cursor.fetchall()]

        return self._run(interaction, idempotent=False)

    # -- scheduling (transferd.scheduler) ---------------------------------------

    def schedule(self, step, plan, fits, hold, daemon_id=None, hosts=False):
        """One scheduling pass of step in one transaction; fire with the ids of the jobs it released.

        The scheduler row of the step is updated first: passes on every
        connection (every daemon) run one at a time.  plan(Counts) says how
        many jobs each share gets and the room per destination host (or
        None); fits(room, host) whether one more to host fits (taking its
        room).  hosts: count per destination host too (a host limit is set).
        The jobs released are put under hold (a queue hold).
        """
        now = self._now()
        moment = self._time_to_db(jobs.utc_from_seconds(now))
        lease = self._lease_fields(hold, now)
        best = self._sql("SELECT job_id, destination_host FROM jobs WHERE status = ? AND lease_until IS NULL AND"
                         " share = ? ORDER BY priority DESC, time_submitted, job_id LIMIT ?")
        release = ("UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE status = ? AND lease_until IS NULL"
                   " AND job_id IN ({marks})")
        anything = self._sql("SELECT 1 FROM jobs WHERE status = ? AND lease_until IS NULL LIMIT 1")

        def interaction(cursor):
            # Nothing waiting (most passes of a quiet step): one read, no lock taken.
            cursor.execute(anything, (step.waiting,))
            if cursor.fetchone() is None:
                return []
            cursor.execute(self._sql("UPDATE scheduler SET daemon_id = ?, time_pass = ?, released = 0 WHERE step = ?"),
                           (daemon_id, moment, step.name))
            self._fold(cursor)  # in the pass's transaction: no commit of its own (SQLite syncs each one)
            counts = self._scheduling_counts(cursor, step, hosts)
            if not counts.waiting:
                return []
            slots, room = plan(counts)
            chosen = []
            for share, wanted in sorted(slots.items()):
                # A few more than wanted where hosts are limited: some may go to a host with no room.
                cursor.execute(best, (step.waiting, share, wanted if room is None else wanted * 4 + 16))
                taken = 0
                for job_id, host in cursor.fetchall():
                    if taken == wanted:
                        break
                    if room is not None and not fits(room, host):
                        continue
                    chosen.append(job_id)
                    taken += 1
            for chunk in _chunks(chosen):
                cursor.execute(self._sql(release.format(marks=", ".join("?" for _ in chunk))),
                               (lease["lease_owner"], lease["lease_until"], step.waiting, *chunk))
            if chosen:
                cursor.execute(self._sql("UPDATE scheduler SET released = ? WHERE step = ?"), (len(chosen), step.name))
            return chosen

        return self._run(interaction, idempotent=False)

    def scheduling_counts(self, step, hosts=False):
        """The Counts a pass of step would see now (hosts: per destination host too)."""
        return self._run(self._scheduling_counts, step, hosts)

    def _scheduling_counts(self, cursor, step, hosts=False):
        # From job_counts: a few rows per share (and per host), however many jobs there are.
        statuses = (step.waiting, *step.running)
        waiting, released, running = {}, {}, {}
        for (status, held, share), total in self._counts(cursor, "share", statuses).items():
            if total <= 0:
                continue
            into = running if status != step.waiting else released if held else waiting
            into[share] = into.get(share, 0) + total
        per_host = {}
        if hosts:
            for (status, held, host), total in self._counts(cursor, "host", statuses).items():
                if total > 0 and (status != step.waiting or held):
                    per_host[host] = per_host.get(host, 0) + total
        return Counts(waiting, released, running, per_host)

    def ahead_in_share(self, job):
        """How many jobs free to release in job's state and share come before it (priority, then age)."""
        query = self._sql("SELECT COUNT(*) FROM jobs WHERE status = ? AND lease_until IS NULL AND share = ?"
                          " AND (priority > ? OR (priority = ? AND (time_submitted < ? OR (time_submitted = ?"
                          " AND job_id < ?))))")
        moment = self._time_to_db(job.time_submitted) if job.time_submitted else ""

        def interaction(cursor):
            cursor.execute(query, (job.status, job.share or ANONYMOUS, job.priority, job.priority, moment, moment,
                                   job.job_id))
            return int(cursor.fetchone()[0])

        return self._run(interaction)

    def release_to_scheduler(self, statuses, limit, include_queue_holds=False):
        """Free the jobs in statuses whose lease ran out (a lost message, a dead worker, a wait that is over),
        and with include_queue_holds those under a queue hold too (a queue that died with the daemon):
        the scheduler releases them again.  Fire with how many."""
        statuses = list(statuses)
        marks = ", ".join("?" for _ in statuses)
        # A range of the index (status, lease_until): only the expired rows are read (and locked).
        expired = "lease_until < ?"
        if include_queue_holds:  # once, at the start of a daemon whose queue died with it: read them all
            expired = "(lease_until < ? OR lease_owner = ?)"
        select = self._sql(f"SELECT job_id FROM jobs WHERE status IN ({marks}) AND {expired} LIMIT ?"
                           + self.skip_locked)

        def interaction(cursor):
            now = self._now()
            condition = (now, leases.IN_QUEUE) if include_queue_holds else (now,)
            cursor.execute(select, (*statuses, *condition, limit))
            ids = [row[0] for row in cursor.fetchall()]
            if not ids:
                return 0
            cursor.execute(self._sql(f"UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE job_id IN"
                                     f" ({', '.join('?' for _ in ids)}) AND status IN ({marks}) AND {expired}"),
                           (*ids, *statuses, *condition))
            return cursor.rowcount

        return self._run(interaction, idempotent=True)

    # -- the fleet (transferd.fleet) ------------------------------------------

    def beat(self, daemon):
        now = self._time_to_db(jobs.utc_from_seconds(self._now()))
        started = self._time_to_db(daemon.time_started)

        def interaction(cursor):
            cursor.execute(self._sql("SELECT drain FROM daemons WHERE daemon_id = ?"), (daemon.daemon_id,))
            row = cursor.fetchone()
            if row is None:  # a first beat, or a row forgotten while this daemon was stopped in a debugger
                cursor.execute(self._sql("INSERT INTO daemons (daemon_id, host, pid, version, time_started, time_beat,"
                                         " drain) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                               (daemon.daemon_id, daemon.host, daemon.pid, daemon.version, started, now,
                                int(daemon.drain)))
                return daemon.drain
            cursor.execute(self._sql("UPDATE daemons SET time_beat = ? WHERE daemon_id = ?"), (now, daemon.daemon_id))
            return bool(row[0])

        return self._run(interaction, idempotent=True)

    def set_drain(self, daemon_ids, drain):
        daemon_ids = list(daemon_ids)
        if not daemon_ids:
            return defer.succeed(0)
        marks = ", ".join("?" for _ in daemon_ids)

        def interaction(cursor):
            cursor.execute(self._sql(f"UPDATE daemons SET drain = ? WHERE daemon_id IN ({marks})"),
                           (int(drain), *daemon_ids))
            cursor.execute(self._sql(f"SELECT COUNT(*) FROM daemons WHERE daemon_id IN ({marks})"), daemon_ids)
            return int(cursor.fetchone()[0])

        return self._run(interaction, idempotent=True)

    def fleet(self, forget_before):
        from transferd.fleet import DaemonInfo

        def interaction(cursor):
            cursor.execute(self._sql("DELETE FROM daemons WHERE time_beat < ?"),
                           (self._time_to_db(jobs.utc_from_seconds(forget_before)),))
            cursor.execute("SELECT daemon_id, host, pid, version, time_started, time_beat, drain FROM daemons"
                           " ORDER BY host, time_started, daemon_id")
            return [DaemonInfo(daemon_id, host, int(pid), version, self._time_from_db(started),
                               bool(drain), self._time_from_db(beat))
                    for daemon_id, host, pid, version, started, beat, drain in cursor.fetchall()]

        return self._run(interaction, idempotent=True)

    def leases_by_owner(self, statuses):
        statuses = list(statuses)
        marks = ", ".join("?" for _ in statuses)
        query = self._sql(f"SELECT lease_owner, COUNT(*) FROM jobs WHERE status IN ({marks}) AND lease_until >= ?"
                          " AND lease_owner IS NOT NULL AND lease_owner <> ? GROUP BY lease_owner")

        def interaction(cursor):
            cursor.execute(query, (*statuses, self._now(), leases.IN_QUEUE))
            return {owner: int(count) for owner, count in cursor.fetchall()}

        return self._run(interaction)

    def forget_daemon(self, daemon_id):
        return self._rowcount(self._sql("DELETE FROM daemons WHERE daemon_id = ?"), [daemon_id], idempotent=True)

    # -- helpers ------------------------------------------------------------

    def _select_job(self, cursor, job_id):
        cursor.execute(self._sql(SELECT_JOB + " WHERE job_id = ?"), (job_id,))
        row = cursor.fetchone()
        return self._job_from_row(row) if row else None

    def _record_event(self, cursor, job_id, now, kind, old, new, actor, reason):
        moment = self._time_to_db(jobs.utc_from_seconds(now))
        cursor.execute(self._sql(INSERT_EVENT), (job_id, moment, kind, old, new, actor, reason))
        if kind == "state":
            cursor.execute(self._sql(INSERT_OUTBOX), (cursor.lastrowid, job_id, new, moment))

    # Called after each commit that wrote outbox rows (transferd.events wakes its dispatcher, the scheduler a pass).
    _event_listeners = ()

    def listen_for_events(self, listener):
        """Call listener(moved) after every commit that wrote events to the outbox: moved is True when a job
        changed state, False when the commit only brought new jobs."""
        self._event_listeners = (*self._event_listeners, listener)

    def _events_committed(self, result, wrote=True, moved=True):
        if wrote:
            for listener in self._event_listeners:
                try:
                    listener(moved)
                except Exception:
                    self.log.failure("an event listener failed")
        return result

    @staticmethod
    def _lease_fields(hold, now):
        """The lease columns for a leases.Hold (None: free)."""
        if hold is None:
            return {"lease_owner": None, "lease_until": None}
        return {"lease_owner": hold.owner, "lease_until": now + hold.seconds}

    def _rowcount(self, query, params, idempotent=False, together=None):
        """Run one UPDATE or DELETE; fire with whether it matched."""

        def interaction(cursor):
            cursor.execute(query, tuple(params))
            return cursor.rowcount > 0

        return self._run(interaction, idempotent=idempotent, together=together)
