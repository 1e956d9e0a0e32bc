"""The v1 API of the real daemon (twistd) on MariaDB: a batch's answer lost to kill -9, paging while jobs
arrive, and streaming 100,000 jobs as NDJSON in bounded memory.
"""

import contextlib
import datetime
import json
import os
import sqlite3
import sys
import uuid

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from twisted.web.client import ResponseDone

from tests import mysql_support
from tests.daemon import Daemon, daemon_config, free_port
from tests.crashing_twistd import CRASH_SUBMISSION
from tests.support import wait_for
from transferd import sample

STREAMED_JOBS = 100_000
RSS_GROWTH_LIMIT = 20 * 1024 * 1024  # bytes
INSERT_BATCH = 5000


def vm_rss(pid):
    """The process's resident set size in bytes, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def insert_jobs(connection, count, label, start, placeholder="%s"):
    """count SUCCESS jobs straight into the jobs table, three per time_submitted, newest first; their ids.

    connection: a DB-API connection to the daemon's database (MariaDB: placeholder %s; SQLite: ?, and times
    as the store writes them).
    """
    job_ids = [str(uuid.uuid4()) for _ in range(count)]
    columns = ("job_id, product_id, status, detailed_status, destination_path, destination_host, label,"
               " stage_attempts, time_submitted, time_staging, time_staged, time_transferring, time_success,"
               " time_updated")
    marks = ", ".join([placeholder] * 14)
    cursor = connection.cursor()
    for first in range(0, count, INSERT_BATCH):
        rows = []
        for n, job_id in enumerate(job_ids[first:first + INSERT_BATCH], first):
            when = start - datetime.timedelta(seconds=n // 3)
            if placeholder == "?":
                when = when.strftime("%Y-%m-%d %H:%M:%S.%f")
            rows.append((job_id, f"product-{n}", "SUCCESS", "delivered", f"davs://se.example.org/data/{n}",
                         "se.example.org", label, 1, when, when, when, when, when, when))
        cursor.executemany(f"INSERT INTO jobs ({columns}) VALUES ({marks})", rows)
    connection.commit()
    return job_ids


class _SlowReader(Protocol):
    """Reads an NDJSON body, pausing for `pause` seconds once `after` bytes have come; fires finished with the ids."""

    def __init__(self, after, pause):
        self.after, self.pause = after, pause
        self.received = 0
        self.rest = b""
        self.job_ids = []
        self.finished = defer.Deferred()

    def dataReceived(self, data):
        before, self.received = self.received, self.received + len(data)
        if before < self.after <= self.received:
            self.transport.pauseProducing()
            reactor.callLater(self.pause, self.transport.resumeProducing)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        self.job_ids += [json.loads(line)["job_id"] for line in lines]

    def connectionLost(self, reason):
        if reason.check(ResponseDone) and not self.rest:
            self.finished.callback(self.job_ids)
        else:
            self.finished.errback(reason)


class V1DaemonTestCase(unittest.TestCase):
    timeout = 180

    mysql = True  # the daemon on a fresh MariaDB database (False: the embedded SQLite)

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.workdir, "deliveries"))
        sample.create(os.path.join(self.workdir, "archive"))
        self.destination = "file://" + os.path.join(self.workdir, "deliveries")
        if self.mysql:
            self.database_url = mysql_support.fresh_database(self)
            self.database = mysql_support.database_name(self.database_url)

    @defer.inlineCallbacks
    def start_daemon(self, **sections):
        port = free_port()
        if self.mysql:
            sections["database"] = {"url": self.database_url}
        sections.setdefault("stager", {})["delay"] = "3600"  # jobs wait in STAGING: only the API moves them
        # Every job is taken for staging at once: a daemon stopping with jobs still queued in memory would
        # start staging them anew, and wait an hour for them.
        sections.setdefault("queue", {}).setdefault("prefetch", "5000")
        self.daemon = Daemon(self.workdir, daemon_config(self.workdir, port, **sections), port)
        self.addCleanup(self.daemon.stop)
        yield self.daemon.start()

    @defer.inlineCallbacks
    def post(self, body):
        response = yield treq.post(self.daemon.url + "/api/v1/jobs", json=body, timeout=30, persistent=False)
        answer = yield response.json()
        self.assertEqual(response.code, 200, answer)
        return answer

    @defer.inlineCallbacks
    def get(self, path):
        response = yield treq.get(self.daemon.url + path, timeout=30, persistent=False)
        answer = yield response.json()
        self.assertEqual(response.code, 200, answer)
        return answer

    def sql(self, statement):
        return mysql_support.execute(statement, database=self.database)


class LostAnswerTests(V1DaemonTestCase):
    @defer.inlineCallbacks
    def test_submission_id_after_kill_between_commit_and_answer(self):
        """When the daemon dies after committing a batch but before answering, sending it again returns the same jobs, once."""
        yield self.start_daemon()
        self.daemon.command = [sys.executable, os.path.join(os.path.dirname(__file__), "crashing_twistd.py")]
        yield self.daemon.stop()
        yield self.daemon.start()  # now through crashing_twistd: it dies just after committing this batch
        first = yield self.post({"jobs": [{"product_id": "sample-001", "destination_path": self.destination}]})
        # Done with it: staging when the daemon dies, it would be staged alone after the restart (a job a worker
        # died on runs alone), for the stager's whole hour, and the batch's jobs would wait behind it.
        response = yield treq.delete(f"{self.daemon.url}/api/v1/jobs/{first['results'][0]['job_id']}",
                                     timeout=30, persistent=False)
        self.assertEqual(response.code, 200, (yield response.text()))
        body = {"jobs": [{"product_id": "sample-001", "destination_path": self.destination, "label": f"n{i}"}
                         for i in range(50)], "submission_id": CRASH_SUBMISSION + " nightly 2026-12-02"}
        outcome = []
        answer = treq.post(self.daemon.url + "/api/v1/jobs", json=body, timeout=60, persistent=False)
        answer.addCallbacks(outcome.append, lambda failure: outcome.append(failure.value))
        yield answer
        self.assertIsInstance(outcome[0], Exception, "the client got an answer from a daemon that died")
        self.assertEqual(self.sql("SELECT COUNT(*) FROM submissions")[0][0], 1)  # committed before it died
        yield self.daemon.start()
        again = yield self.post(body)
        self.assertEqual((again["accepted"], again["submission_id"]), (50, body["submission_id"]))
        ids = {result["job_id"] for result in again["results"]}
        stored = {row[0] for row in self.sql("SELECT job_id FROM jobs WHERE label IS NOT NULL")}
        self.assertEqual(stored, ids)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM jobs")[0][0], 51)
        # Released by the restarted daemon's scheduler: every job is taken for staging.
        staging = "SELECT COUNT(*) FROM jobs WHERE status = 'STAGING' AND label IS NOT NULL"
        yield wait_for(lambda: self.sql(staging)[0][0] == 50, 30, interval=0.2)


class PagingTests(V1DaemonTestCase):
    @defer.inlineCallbacks
    def test_pages_neither_skip_nor_repeat_while_jobs_arrive(self):
        """Paging through 2,000 jobs while 1,000 new ones are submitted sees each of the 2,000 once."""
        yield self.start_daemon()
        start = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(hours=1)
        connection = mysql_support.admin_connection(self.database)
        try:
            existing = set(insert_jobs(connection, 2000, "old", start))
        finally:
            connection.close()
        arriving = [{"jobs": [{"product_id": "sample-001", "destination_path": self.destination, "label": "new"}
                              for _ in range(50)]} for _ in range(20)]
        seen, new_ids, cursor = [], set(), None
        while True:
            query = "/api/v1/jobs?limit=100" + (f"&cursor={cursor}" if cursor else "")
            posts = [self.post(arriving.pop())] if arriving else []
            page, *answers = yield defer.gatherResults([self.get(query)] + posts)
            for answer in answers:
                new_ids |= {result["job_id"] for result in answer["results"]}
            seen += [view["job_id"] for view in page["jobs"]]
            cursor = page["next"]
            if cursor is None:
                break
        self.assertEqual(arriving, [])
        self.assertEqual(len(new_ids), 1000)
        self.assertEqual(len(seen), len(set(seen)), "a job was listed twice")
        self.assertEqual(existing - set(seen), set(), "a job was skipped")
        self.assertEqual(set(seen) - existing - new_ids, set())


class StreamTests(V1DaemonTestCase):
    mysql = False  # 100,000 rows go into SQLite in a second or two; the paging code is the same for both

    @defer.inlineCallbacks
    def test_ndjson_streams_100000_jobs_in_bounded_memory(self):
        """Streaming 100,000 jobs to a client that stops reading for a while grows the daemon's RSS by under 20 MB."""
        yield self.start_daemon(api={"access_log": "false"})
        start = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        with contextlib.closing(sqlite3.connect(os.path.join(self.workdir, "jobs.sqlite"), timeout=30)) as connection:
            inserted = insert_jobs(connection, STREAMED_JOBS, "bulk", start, placeholder="?")
        recent = _iso(start - datetime.timedelta(seconds=400))  # the newest 1,200: warms up every code path
        self.assertEqual(len((yield self.stream(f"?label=bulk&submitted_after={recent}", after=1, pause=0))), 1200)
        pid = self.daemon.process.pid
        baseline = vm_rss(pid)
        samples = []
        sampler = task.LoopingCall(lambda: samples.append(vm_rss(pid)))
        sampler.start(0.05)
        try:
            streamed = yield self.stream("", after=1_000_000, pause=6.0)
        finally:
            sampler.stop()
        self.assertEqual(len(streamed), STREAMED_JOBS)
        # Newest first: as inserted, three jobs to a time_submitted, and among those the greatest job_id first.
        self.assertEqual(streamed, [job_id for first in range(0, STREAMED_JOBS, 3)
                                    for job_id in sorted(inserted[first:first + 3], reverse=True)])
        growth = max(samples) - baseline
        self.assertLess(growth, RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB while streaming")

    @defer.inlineCallbacks
    def stream(self, query, after, pause):
        response = yield treq.get(self.daemon.url + "/api/v1/jobs" + query, headers={"Accept": "application/x-ndjson"},
                                  timeout=60, persistent=False, unbuffered=True)
        self.assertEqual(response.code, 200)
        reader = _SlowReader(after, pause)
        response.deliverBody(reader)
        return (yield reader.finished)


def _iso(moment):
    return moment.replace(tzinfo=datetime.timezone.utc).isoformat().replace("+00:00", "Z")
