"""The real `twistd -n transferd` on MariaDB and RabbitMQ, through the fake FTS: its [metrics] endpoint, scraped
before and after a run, moves by exactly the jobs that passed."""

import os

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from tests import mysql_support
from tests.amqp_support import TestBroker, with_options
from tests.daemon import Daemon, daemon_config, free_port
from tests.test_e2e_fts import TOKEN, FakeFTSProcess
from transferd import jobs, sample

JOBS = 6


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


class DaemonMetricsTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.deliveries = os.path.join(self.workdir, "deliveries")
        os.makedirs(self.deliveries)
        sample.create(os.path.join(self.workdir, "archive"))
        token_file = os.path.join(self.workdir, "fts-token")
        with open(token_file, "w") as handle:
            handle.write(TOKEN + "\n")
        broker = TestBroker(self)
        yield broker.check()
        self.fake = FakeFTSProcess(self.workdir, free_port(), "--copy", "--duration", "0.2")
        self.addCleanup(self.fake.stop)
        yield self.fake.start()
        port, self.metrics_port = free_port(), free_port()
        config = daemon_config(
            self.workdir, port,
            database={"url": mysql_support.fresh_database(self)},
            queue={"url": with_options(broker.url, prefix=broker.prefix, retry_delay="0.2")},
            transfer={"backend": "fts", "allowed_schemes": "gsiftp"},
            fts={"endpoint": self.fake.url, "auth": "token", "token_file": token_file, "poll_interval": "0.2",
                 "source_template": "gsiftp://{staged_to}{path}"},
            metrics={"endpoint": f"tcp:{self.metrics_port}:interface=127.0.0.1", "job_counts_max_age": "0.1"},
        )
        self.daemon = Daemon(self.workdir, config, port)
        self.addCleanup(self.daemon.stop)
        yield self.daemon.start()

    @defer.inlineCallbacks
    def scrape(self):
        response = yield treq.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10, persistent=False)
        text = yield response.text()
        self.assertEqual(response.code, 200, text)
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    @defer.inlineCallbacks
    def test_counters_follow_an_fts_run(self):
        """Transitions and submissions grow by the jobs that passed; FTS calls are counted by outcome, none failed;
        the broker, the pool and the job counts are shown."""
        before = yield self.scrape()
        job_ids = []
        for n in range(JOBS):
            destination = f"gsiftp://localhost{self.deliveries}/{n}"
            job_ids.append((yield self.daemon.submit(f"sample-00{1 + n % 2}", destination)))
        views = yield self.daemon.wait_terminal(job_ids, timeout=40)
        self.assertEqual({view["status"] for view in views.values()}, {jobs.SUCCESS})
        after = yield self.scrape()

        def grew(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        for old, new in ((jobs.SUBMITTED, jobs.STAGING), (jobs.STAGING, jobs.STAGED),
                         (jobs.STAGED, jobs.TRANSFERRING), (jobs.TRANSFERRING, jobs.SUCCESS)):
            self.assertEqual(grew("transferd_job_transitions_total", from_state=old, to_state=new), JOBS, (old, new))
        self.assertEqual(grew("transferd_job_submit_to_success_seconds_count"), JOBS)
        self.assertEqual(grew("transferd_submissions_total", api="legacy", outcome="accepted", reason=""), JOBS)
        fts_calls = {outcome: grew("transferd_service_calls_total", service="fts", outcome=outcome)
                     for outcome in ("2xx", "3xx", "4xx", "5xx", "timeout", "refused", "error", "cancelled")}
        state = yield self.fake.state()
        self.assertEqual(sum(state["submissions"][job_id] for job_id in job_ids), JOBS)
        self.assertGreaterEqual(fts_calls.pop("2xx"), JOBS)  # a POST per job, and the polls
        self.assertEqual(set(fts_calls.values()), {0}, fts_calls)
        self.assertEqual(grew("transferd_service_call_duration_seconds_count", service="fts"),
                         grew("transferd_service_calls_total", service="fts", outcome="2xx"))
        self.assertEqual(value(after, "transferd_jobs", state=jobs.SUCCESS), JOBS)
        self.assertEqual(value(after, "transferd_broker_connected"), 1)
        self.assertEqual(value(after, "transferd_database_pool_max"), 10)
        self.assertGreaterEqual(value(after, "transferd_database_pool_in_use"), 0)
