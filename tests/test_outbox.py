"""The outbox's claims on SQLite and MariaDB: a job's events in order, one at a time or as a run (AMQP)."""

from twisted.internet import reactor, task
from twisted.trial import unittest

from tests import mysql_support
from tests.contract_store import a_job
from tests.stores import OnMariaDB, OnSQLite
from transferd import jobs
from transferd.config import load_config
from transferd.events import AMQP, EventDispatcher
from transferd.queue.amqp import QueueUnavailable
from transferd.store.outbox import DELIVERED, PENDING, Outbox, Outcome

PATH = (jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING, jobs.SUCCESS)


class OutboxContract:
    """Run against each store: make_store(clock) returns a migrated store."""

    async def setup_store(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.store = await self.make_store(self.clock)
        self.addCleanup(self.store.stopService)
        self.outbox = Outbox(self.store)

    async def succeeded_job(self):
        """A job through every state to SUCCESS: 5 events in the outbox."""
        job = a_job()
        await self.store.create(job)
        old = jobs.SUBMITTED
        for new in PATH:
            await self.store.transition(job.job_id, old, new, {})
            old = new
        return job.job_id

    async def delivered_job(self):
        """A job through every state to SUCCESS, its 5 events fanned out to the AMQP target."""
        job_id = await self.succeeded_job()
        await self.outbox.fan_out(lambda state, notify_url: [AMQP])
        return job_id

    async def test_one_at_a_time_or_as_a_run(self):
        """Without runs a claim takes the next event of each job only; with runs, every due one, in order."""
        await self.setup_store()
        first, second = await self.delivered_job(), await self.delivered_job()
        claimed = await self.outbox.claim("one", 60)
        self.assertEqual(sorted((d.job_id, d.new_status) for d in claimed),
                         sorted([(first, jobs.SUBMITTED), (second, jobs.SUBMITTED)]))
        await self.outbox.record("one", [Outcome(d.delivery_id, DELIVERED) for d in claimed])
        run = await self.outbox.claim("run", 60, runs=True)
        for job_id in (first, second):
            self.assertEqual([d.new_status for d in run if d.job_id == job_id], list(PATH))
        self.assertEqual([d.event_id for d in run], sorted(d.event_id for d in run))

    async def test_run_stops_at_an_event_held_back(self):
        """An event waiting for its retry, or claimed by another dispatcher, holds back the later ones of its job."""
        await self.setup_store()
        job_id = await self.delivered_job()
        head = await self.outbox.claim("other", 60)
        self.assertEqual([d.new_status for d in head], [jobs.SUBMITTED])
        self.assertEqual(await self.outbox.claim("run", 60, runs=True), [])  # the head is being sent by "other"
        later = self.clock.seconds() + 30
        await self.outbox.record("other", [Outcome(head[0].delivery_id, PENDING, next_attempt=later, error="x")])
        self.assertEqual(await self.outbox.claim("run", 60, runs=True), [])  # the head waits for its retry
        self.clock.advance(31)
        run = await self.outbox.claim("run", 60, runs=True)
        self.assertEqual([(d.job_id, d.new_status) for d in run], [(job_id, jobs.SUBMITTED)] + [(job_id, s) for s in PATH])

    async def test_failed_event_sends_the_later_ones_again_after_it(self):
        """One publish of a job's run fails: the later ones, though published, are sent again after it."""
        await self.setup_store()
        job_id = await self.succeeded_job()
        publisher = _Publisher(refuse={"job.staged"})
        config = load_config(None, {("events", "retry_delay"): "1"}, check_files=False)
        dispatcher = EventDispatcher(self.store, config, reactor, self.clock, publisher=publisher)
        lane = next(lane for lane in dispatcher._lanes() if lane.name == AMQP)
        await dispatcher.run_once(lane)
        self.assertEqual(publisher.published, ["job.submitted", "job.staging", "job.transferring", "job.success"])
        statuses = [(d["status"], d["attempts"]) for d in await self.outbox.deliveries(job_id)]
        self.assertEqual(statuses, [(DELIVERED, 1), (DELIVERED, 1), (PENDING, 1), (PENDING, 1), (PENDING, 1)])
        self.clock.advance(2)
        await dispatcher.run_once(lane)
        self.assertEqual(publisher.published[4:], ["job.staged", "job.transferring", "job.success"])
        self.assertEqual({d["status"] for d in await self.outbox.deliveries(job_id)}, {DELIVERED})


class SQLiteOutboxTests(OnSQLite, OutboxContract, unittest.TestCase):
    pass


class MySQLOutboxTests(OnMariaDB, OutboxContract, unittest.TestCase):
    async def test_run_overtaken_by_another_dispatcher(self):
        """Another dispatcher claims a job's first event between our SELECT and our UPDATE: we let go of the rest."""
        await self.setup_store()
        await self.delivered_job()
        database = mysql_support.database_name(self.url)
        future = self.clock.seconds() + 600
        original = self.store._run

        def racing(interaction, *args, **kwargs):
            def with_race(cursor, *inner):
                return interaction(_RaceAfterFirstSelect(cursor, database, future), *inner)
            return original(with_race, *args, **kwargs)

        self.store._run = racing
        self.assertEqual(await self.outbox.claim("run", 60, runs=True), [])
        self.store._run = original
        rows = mysql_support.execute("SELECT owner, COUNT(*) FROM event_deliveries GROUP BY owner ORDER BY owner",
                                     database=database)
        self.assertEqual(rows, ((None, 4), ("other", 1)))
        self.clock.advance(601)  # the other dispatcher's lease is over: the whole run is due again
        self.assertEqual(len(await self.outbox.claim("run", 60, runs=True)), 5)


class _RaceAfterFirstSelect:
    """A cursor that, right after the claim's first SELECT, lets "other" claim the oldest delivery and commit."""

    def __init__(self, cursor, database, until):
        self.cursor, self.database, self.until, self.raced = cursor, database, until, False

    def execute(self, statement, args=None):
        result = self.cursor.execute(statement, args)
        if not self.raced and statement.startswith("SELECT d.delivery_id"):
            self.raced = True
            mysql_support.execute("UPDATE event_deliveries SET owner = 'other', next_attempt = %s"
                                  " ORDER BY delivery_id LIMIT 1", (self.until,), database=self.database)
        return result

    def __getattr__(self, name):
        return getattr(self.cursor, name)


class _Publisher:
    """An AMQP publisher that refuses the event named in refuse once, and keeps what it published, in order."""

    prefix = "test"

    def __init__(self, refuse):
        self.refuse = set(refuse)
        self.published = []

    async def publish_event(self, exchange, routing_key, body, message_id):
        if routing_key in self.refuse:
            self.refuse.discard(routing_key)
            raise QueueUnavailable("RabbitMQ is not connected")
        self.published.append(routing_key)
