"""The outbox of a SQL JobStore: events written with each state change, fanned out and sent by transferd.events.

Each state change writes one outbox row in the transaction that makes it
(SQLJobStore._record_event).  The dispatcher then, in short transactions
of its own:

1. fans out the rows not yet fanned out: one event_deliveries row per
   target that wants the event (the job's notify_url, a subscriber, the
   AMQP exchange), and marks the outbox row done, all at once; on MySQL
   the outbox rows are taken FOR UPDATE SKIP LOCKED, so of several daemons
   only one fans out each event;
2. claims deliveries that are due, only the oldest pending one of each job
   and target (or, for the AMQP lane, the due ones of each job and target
   that no earlier pending one holds back, as a run), and only when no
   older event of the job still waits to be fanned out: so each target
   sees a job's events in order.  Claiming sets
   the row's owner and pushes next_attempt to the end of a lease; a daemon
   that dies while sending leaves the row to be claimed again when the
   lease ends (at least once);
3. records each outcome: delivered, tried again at a later time, or given up.
"""

import dataclasses
from datetime import datetime
from typing import Optional

from transferd import jobs

PENDING, DELIVERED, GIVEN_UP = "pending", "delivered", "given_up"

# The event and the job fields an event's messages carry, for the deliveries claimed.
EVENT_FIELDS = ("delivery_id", "target", "attempts", "event_id", "job_id", "time", "old_status", "new_status",
                "reason", "product_id", "destination_path", "submitter", "fts_jobid", "notify_url",
                "time_submitted", "time_staging", "time_staged", "metadata", "stager_hostname", "stager_path",
                "label")
SELECT_CLAIMED = (
    "SELECT d.delivery_id, d.target, d.attempts, e.event_id, e.job_id, e.time, e.old_status, e.new_status,"
    " e.reason, j.product_id, j.destination_path, j.submitter, j.fts_jobid, j.notify_url, j.time_submitted,"
    " j.time_staging, j.time_staged, j.metadata, j.stager_hostname, j.stager_path, j.label"
    " FROM event_deliveries d JOIN job_events e ON e.event_id = d.event_id JOIN jobs j ON j.job_id = d.job_id"
)
TIME_FIELDS = ("time", "time_submitted", "time_staging", "time_staged")


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One event on its way to one target, as claimed: the event, the job's fields, the attempts so far."""

    delivery_id: int
    target: str
    attempts: int
    event_id: int
    job_id: str
    time: Optional[datetime]
    old_status: Optional[str]
    new_status: str
    reason: Optional[str]
    product_id: Optional[str]
    destination_path: Optional[str]
    submitter: Optional[str]
    fts_jobid: Optional[str]
    notify_url: Optional[str]
    time_submitted: Optional[datetime]
    time_staging: Optional[datetime]
    time_staged: Optional[datetime]
    metadata: Optional[str]
    stager_hostname: Optional[str]
    stager_path: Optional[str]
    label: Optional[str]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of a claimed delivery: DELIVERED, GIVEN_UP, or PENDING again at next_attempt."""

    delivery_id: int
    status: str
    next_attempt: Optional[float] = None
    error: Optional[str] = None


class Outbox:
    """The outbox and delivery tables of store (a transferd.store.sql.SQLJobStore)."""

    def __init__(self, store):
        self.store = store

    def fan_out(self, targets_for, limit=500, notify_urls=True):
        """Make the deliveries of up to limit events not yet fanned out; fire with how many events.

        targets_for(state, notify_url) -> the target names that want an event
        entering state of a job with that notify_url (may be empty).
        notify_urls=False: the jobs' notify_urls are not read (targets_for is given None).
        """
        store = self.store
        select = store._sql("SELECT event_id, job_id, state FROM outbox WHERE fanned_out = 0 ORDER BY event_id"
                            " LIMIT ?" + store.skip_locked)
        now = store._now()

        def interaction(cursor):
            cursor.execute(select, (limit,))
            events = cursor.fetchall()
            if not events:
                return 0
            urls = {}
            if notify_urls:
                job_ids = sorted({job_id for _, job_id, _ in events})
                cursor.execute(store._sql(f"SELECT job_id, notify_url FROM jobs WHERE job_id IN"
                                          f" ({', '.join('?' for _ in job_ids)}) AND notify_url IS NOT NULL"), job_ids)
                urls = dict(cursor.fetchall())
            rows = [(int(event_id), job_id, target, PENDING, 0, now)
                    for event_id, job_id, state in events
                    for target in targets_for(state, urls.get(job_id))]
            if rows:
                cursor.executemany(store._sql(
                    "INSERT INTO event_deliveries (event_id, job_id, target, status, attempts, next_attempt)"
                    " VALUES (?, ?, ?, ?, ?, ?)"), rows)
            ids = [int(event_id) for event_id, _, _ in events]
            cursor.execute(store._sql(f"UPDATE outbox SET fanned_out = 1 WHERE event_id IN"
                                      f" ({', '.join('?' for _ in ids)})"), ids)
            return len(events)

        return store._run(interaction, idempotent=False)

    def claim(self, owner, lease, limit=200, targets=None, exclude=None, runs=False):
        """Claim up to limit due deliveries for lease seconds; fire with them, a job's in event order.

        targets: only deliveries to these targets; exclude: none to these.
        runs=False: only the next delivery of each job and target, for a
        sender that sends them all at once (webhooks).  runs=True: each job
        and target's due deliveries in a row, for a sender that keeps their
        order itself (one AMQP channel delivers in the order it publishes).
        """
        store = self.store
        now = store._now()
        until = now + lease
        which, chosen = "", []
        for names, operator in ((targets, "IN"), (exclude, "NOT IN")):
            if names:
                which += f" AND d.target {operator} ({', '.join('?' for _ in names)})"
                chosen += list(names)
        # An earlier pending delivery of the same job and target holds this one
        # back: any (runs=False), or one not due (runs=True: it is being sent
        # by someone, or waits for its retry).  Ordered by delivery_id, which
        # follows event_id within a job and target, so a limit never takes a
        # later delivery without the earlier ones.
        held = " AND p.next_attempt > ?" if runs else ""
        due = store._sql(
            "SELECT d.delivery_id FROM event_deliveries d WHERE d.status = ? AND d.next_attempt <= ?" + which +
            " AND NOT EXISTS (SELECT 1 FROM event_deliveries p WHERE p.job_id = d.job_id AND p.target = d.target"
            " AND p.status = ? AND p.event_id < d.event_id" + held + ")"
            " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = d.job_id AND o.fanned_out = 0"
            " AND o.event_id < d.event_id)"
            + (" ORDER BY d.delivery_id LIMIT ?" if runs else " ORDER BY d.next_attempt, d.delivery_id LIMIT ?")
        )
        # After claiming a run: another dispatcher that claimed an earlier
        # delivery of the same job and target since our SELECT (READ COMMITTED:
        # our UPDATE waited for its commit) keeps it; we let go of the rest.
        overtaken = (
            "SELECT d.delivery_id FROM event_deliveries d WHERE d.delivery_id IN ({marks}) AND d.owner = ?"
            " AND d.next_attempt = ? AND EXISTS (SELECT 1 FROM event_deliveries p WHERE p.job_id = d.job_id"
            " AND p.target = d.target AND p.status = ? AND p.event_id < d.event_id"
            " AND (p.owner IS NULL OR p.owner <> ? OR p.next_attempt <> ?))"
        )

        def interaction(cursor):
            cursor.execute(due, (PENDING, now, *chosen, PENDING, *((now,) if runs else ()), limit))
            ids = [int(row[0]) for row in cursor.fetchall()]
            if not ids:
                return []
            marks = ", ".join("?" for _ in ids)
            # next_attempt is tested again: of several dispatchers, one claims each delivery.
            cursor.execute(store._sql(f"UPDATE event_deliveries SET owner = ?, next_attempt = ? WHERE delivery_id IN"
                                      f" ({marks}) AND status = ? AND next_attempt <= ?"),
                           (owner, until, *ids, PENDING, now))
            if runs and cursor.rowcount != len(ids):  # someone else claimed some: check what we hold
                cursor.execute(store._sql(overtaken.format(marks=marks)), (*ids, owner, until, PENDING, owner, until))
                released = [int(row[0]) for row in cursor.fetchall()]
                if released:
                    cursor.execute(store._sql(
                        "UPDATE event_deliveries SET owner = NULL, next_attempt = ? WHERE delivery_id IN"
                        f" ({', '.join('?' for _ in released)}) AND owner = ?"), (now, *released, owner))
            cursor.execute(store._sql(SELECT_CLAIMED + f" WHERE d.delivery_id IN ({marks}) AND d.owner = ?"
                                      " AND d.next_attempt = ? ORDER BY d.event_id"), (*ids, owner, until))
            return [self._delivery(row) for row in cursor.fetchall()]

        return store._run(interaction, idempotent=False)

    def record(self, owner, outcomes):
        """Record the outcomes of deliveries this owner claimed, in one transaction; fire with how many matched."""
        store = self.store
        if not outcomes:
            return store._run(lambda cursor: 0)
        moment = store._time_to_db(jobs.utc_from_seconds(store._now()))
        done = store._sql("UPDATE event_deliveries SET status = ?, owner = NULL, attempts = attempts + 1,"
                          " last_error = ?, time_done = ? WHERE delivery_id = ? AND owner = ?")
        again = store._sql("UPDATE event_deliveries SET owner = NULL, attempts = attempts + 1, next_attempt = ?,"
                           " last_error = ? WHERE delivery_id = ? AND owner = ? AND status = ?")

        delivered = [outcome.delivery_id for outcome in outcomes if outcome.status == DELIVERED]

        def interaction(cursor):
            matched = 0
            for start in range(0, len(delivered), 500):  # the usual outcome: one statement per 500
                chunk = delivered[start:start + 500]
                cursor.execute(store._sql(
                    "UPDATE event_deliveries SET status = ?, owner = NULL, attempts = attempts + 1, last_error = NULL,"
                    f" time_done = ? WHERE delivery_id IN ({', '.join('?' for _ in chunk)}) AND owner = ?"),
                    (DELIVERED, moment, *chunk, owner))
                matched += max(cursor.rowcount, 0)
            for outcome in outcomes:
                if outcome.status == PENDING:
                    cursor.execute(again, (outcome.next_attempt, outcome.error, outcome.delivery_id, owner, PENDING))
                elif outcome.status == GIVEN_UP:
                    cursor.execute(done, (outcome.status, outcome.error, moment, outcome.delivery_id, owner))
                else:
                    continue
                matched += max(cursor.rowcount, 0)
            return matched

        return store._run(interaction, idempotent=True)

    def next_due(self):
        """Fire with the earliest next_attempt of a pending delivery (epoch seconds), or None."""
        store = self.store
        query = store._sql("SELECT MIN(next_attempt) FROM event_deliveries WHERE status = ?")

        def interaction(cursor):
            cursor.execute(query, (PENDING,))
            row = cursor.fetchone()
            return float(row[0]) if row and row[0] is not None else None

        return store._run(interaction)

    def deliveries(self, job_id):
        """The job's deliveries (dicts), oldest first: for tests and operators."""
        store = self.store
        columns = ("delivery_id", "event_id", "target", "status", "attempts", "next_attempt", "last_error")
        query = store._sql(f"SELECT {', '.join(columns)} FROM event_deliveries WHERE job_id = ?"
                           " ORDER BY event_id, delivery_id")

        def interaction(cursor):
            cursor.execute(query, (job_id,))
            return [dict(zip(columns, row)) for row in cursor.fetchall()]

        return store._run(interaction)

    def _delivery(self, row):
        values = dict(zip(EVENT_FIELDS, row))
        for name in TIME_FIELDS:
            values[name] = self.store._time_from_db(values[name])
        for name in ("delivery_id", "attempts", "event_id"):
            values[name] = int(values[name])
        return Delivery(**values)
