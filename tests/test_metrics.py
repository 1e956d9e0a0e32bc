"""/metrics, /livez and /readyz of a daemon built by transferd.wiring, scraped over real HTTP on loopback.

The metrics are parsed with prometheus_client's own parser, as Prometheus
would read them; counters are compared before and after the jobs ran.
"""

import json
import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.daemon import free_port
from tests.harness import Harness
from tests.test_callback_stager import Recorder, serve
from tests.test_http import stall
from tests.support import settled, wait_for
from transferd import jobs, leases
from transferd.http import HTTPClient
from transferd.metrics import Metrics
from transferd.testing.tokens import TokenIssuer

ISS = "https://iam.example.org/"
ADMIN = f"SUB=operator, ISS={ISS}"


def parse(text):
    """{(sample name, frozenset of label items): value} of a scrape."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


class MetricsTestCase(unittest.TestCase):
    timeout = 60
    settings = {("metrics", "job_counts_max_age"): "0.001"}
    consume = True  # False: no worker moves jobs on

    @defer.inlineCallbacks
    def setUp(self):
        self.h = Harness(self.mktemp(), self.settings)
        yield self.h.start(consume=self.consume)
        self.addCleanup(self.h.close)
        if not self.consume:
            self.addCleanup(self.h.pipeline.flush_holds)  # the pipeline is not running: its stop would do this

    @defer.inlineCallbacks
    def scrape(self, url=None, headers=None):
        response, body = yield self.h.request("GET", "/metrics", headers=headers) if url is None else \
            self.get(url + "/metrics")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["text/plain; version=0.0.4; charset=utf-8"])
        return parse(body.decode("utf-8"))

    @defer.inlineCallbacks
    def get(self, url):
        response = yield self.h.http.get(url)
        return response, (yield response.content())

    def destination(self):
        """A directory of its own for each job (a second delivery of a product to one place is refused)."""
        self.deliveries = getattr(self, "deliveries", 0) + 1
        return f"{self.h.destination}/{self.deliveries}"

    @defer.inlineCallbacks
    def legacy_submit(self, product_id="sample-001"):
        response, body = yield self.h.request(
            "POST", "/submitTransfer", data={"product_id": product_id, "destination_path": self.destination()})
        return response.code, json.loads(body)


class JobMetricsTests(MetricsTestCase):
    @defer.inlineCallbacks
    def test_counters_move_as_the_jobs_do(self):
        """Transitions, time in each state, submit-to-SUCCESS and submissions grow by exactly the jobs that passed."""
        before = yield self.scrape()
        accepted = []
        for _ in range(3):
            code, body = yield self.legacy_submit()
            self.assertEqual(code, 202, body)
            accepted.append(body["job_id"])
        code, body = yield self.legacy_submit("no-such-product")
        self.assertEqual(code, 404, body)
        response, body = yield self.h.request("POST", "/submitTransfer", data={"product_id": "sample-001"})
        self.assertEqual(response.code, 400, body)
        batch = {"jobs": [{"product_id": "sample-dir", "destination_path": self.destination()},
                          {"product_id": "sample-001", "destination_path": self.destination()},
                          {"product_id": "sample-001", "destination_path": "ftp://nowhere/x"}]}
        response, body = yield self.h.request("POST", "/api/v1/jobs", data=json.dumps(batch).encode(),
                                              headers={"Content-Type": "application/json"})
        self.assertEqual(response.code, 200, body)
        accepted += [item["job_id"] for item in json.loads(body)["results"] if "job_id" in item]
        response, body = yield self.h.request("POST", "/api/v1/jobs", data=b'{"jobs": []}',
                                              headers={"Content-Type": "application/json"})
        self.assertEqual(response.code, 422, body)
        yield settled(self.h.daemon)
        for job_id in accepted:
            job = yield self.h.store.get(job_id)
            self.assertEqual(job.status, jobs.SUCCESS, job.detailed_status)
        after = yield self.scrape()

        def grew(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        passed = len(accepted)
        self.assertEqual(passed, 5)
        for old, new in ((jobs.SUBMITTED, jobs.STAGING), (jobs.STAGING, jobs.STAGED),
                         (jobs.STAGED, jobs.TRANSFERRING), (jobs.TRANSFERRING, jobs.SUCCESS)):
            self.assertEqual(grew("transferd_job_transitions_total", from_state=old, to_state=new), passed)
            self.assertEqual(grew("transferd_job_state_duration_seconds_count", state=old), passed)
            self.assertEqual(grew("transferd_job_state_duration_seconds_bucket", state=old, le="+Inf"), passed)
        self.assertEqual(grew("transferd_job_transitions_total", from_state=jobs.STAGING, to_state=jobs.ERROR), 0)
        self.assertEqual(grew("transferd_job_submit_to_success_seconds_count"), passed)
        self.assertLessEqual(grew("transferd_job_submit_to_success_seconds_bucket", le="60.0"), passed)
        self.assertEqual(grew("transferd_submissions_total", api="legacy", outcome="accepted", reason=""), 3)
        self.assertEqual(grew("transferd_submissions_total", api="legacy", outcome="refused",
                              reason="unknown_product"), 1)
        self.assertEqual(grew("transferd_submissions_total", api="legacy", outcome="refused", reason="invalid"), 1)
        self.assertEqual(grew("transferd_submissions_total", api="v1", outcome="accepted", reason=""), 2)
        self.assertEqual(grew("transferd_submissions_total", api="v1", outcome="refused", reason="invalid"), 2)
        self.assertEqual(value(after, "transferd_jobs", state=jobs.SUCCESS), passed)
        self.assertEqual(value(after, "transferd_jobs", state=jobs.SUBMITTED), 0)
        self.assertEqual(value(after, "transferd_broker_connected"), 1)
        self.assertEqual(value(after, "transferd_database_pool_max"), 1)
        # Back to 0 once nothing runs (the scheduler's and the fleet's timers may be in a transaction at a scrape).
        yield wait_for(lambda: self.scrape().addCallback(lambda now: value(now, "transferd_database_pool_in_use") == 0),
                       timeout=5, interval=0.05)
        # No label names a job, a product or a submitter.
        for (_, labels) in after:
            for _, label_value in labels:
                self.assertNotIn(label_value, set(accepted) | {"sample-001", "sample-dir"})



class IdleMetricsTests(MetricsTestCase):
    consume = False

    @defer.inlineCallbacks
    def test_openmetrics_when_asked(self):
        """A scraper asking for OpenMetrics, as Prometheus does, gets it; a plain request gets the text format."""
        accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                  "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        response, body = yield self.h.request("GET", "/metrics", headers={"Accept": accept})
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith(
            "application/openmetrics-text; version=1.0.0"))
        self.assertTrue(body.endswith(b"# EOF\n"))
        self.assertIn(b"transferd_job_transitions_total{", body)
        response, body = yield self.h.request("GET", "/metrics")
        self.assertNotIn(b"# EOF", body)

    @defer.inlineCallbacks
    def test_dead_letters_and_cancels_counted(self):
        """A job cancelled while SUBMITTED counts SUBMITTED -> CANCELLED; a dead letter counts by queue."""
        before = yield self.scrape()
        code, body = yield self.legacy_submit()
        response, _ = yield self.h.request("POST", "/cancelTransfer", data={"job_id": body["job_id"]})
        self.assertEqual(response.code, 200)
        code, other = yield self.legacy_submit()
        yield self.h.pipeline.dead_letter("transfer", other["job_id"], "failed 3 times: for the test")
        after = yield self.scrape()
        self.assertEqual(value(after, "transferd_job_transitions_total", from_state="SUBMITTED",
                               to_state="CANCELLED")
                         - value(before, "transferd_job_transitions_total", from_state="SUBMITTED",
                                 to_state="CANCELLED"), 1)
        self.assertEqual(value(after, "transferd_dead_letters_total", queue="transfer")
                         - value(before, "transferd_dead_letters_total", queue="transfer"), 1)
        self.assertEqual(value(after, "transferd_jobs", state="ERROR"), 1)

    @defer.inlineCallbacks
    def test_reconciler_redrives_counted(self):
        """Jobs the reconciler re-drives (here: gives back to the scheduler) count in
        transferd_reconciler_redriven_jobs_total."""
        for _ in range(2):
            code, body = yield self.legacy_submit()
            yield self.h.store.hold_in_queue(jobs.SUBMITTED, [body["job_id"]], -1)  # a queue hold that has run out
        redriven = yield self.h.daemon.reconciler.run_once()
        self.assertEqual(redriven, 2)
        after = yield self.scrape()
        self.assertEqual(value(after, "transferd_reconciler_redriven_jobs_total"), 2)


class JobCountCacheTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_counts_read_at_most_once_per_max_age(self):
        """Within job_counts_max_age the counts of the last query are shown; after it, the store is asked again."""
        clock = task.Clock()
        h = Harness(self.mktemp(), {("metrics", "job_counts_max_age"): "5"}, clock=clock)
        yield h.start(consume=False)
        self.addCleanup(h.close)
        collector = h.daemon.status_collector
        yield h.pipeline.submit(jobs.Job(job_id=jobs.new_job_id(), product_id="sample-001",
                                         destination_path=h.destination))
        yield collector.refresh()
        self.assertEqual(collector.counts[jobs.SUBMITTED], 1)
        yield h.pipeline.submit(jobs.Job(job_id=jobs.new_job_id(), product_id="sample-001",
                                         destination_path=h.destination))
        clock.advance(4.9)
        yield collector.refresh()
        self.assertEqual(collector.counts[jobs.SUBMITTED], 1)
        clock.advance(0.2)
        yield collector.refresh()
        self.assertEqual(collector.counts[jobs.SUBMITTED], 2)
        yield h.pipeline.flush_holds()


class HealthTests(MetricsTestCase):
    @defer.inlineCallbacks
    def test_livez_and_readyz(self):
        """/livez and /readyz answer 200 ok; ?verbose lists each check; neither shows any configuration."""
        for path, code, text in (("/livez", 200, "ok\n"), ("/readyz", 200, "ok\n"),
                                 ("/readyz?verbose", 200, "[+]store ok\n[+]queue ok\nreadyz check passed\n")):
            response, body = yield self.h.request("GET", path)
            self.assertEqual((response.code, body.decode()), (code, text), path)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])
        response, body = yield self.h.request("POST", "/livez")
        self.assertEqual((response.code, response.headers.getRawHeaders("allow"), json.loads(body)["status"]),
                         (405, ["GET, HEAD"], 405))

    @defer.inlineCallbacks
    def test_readyz_fails_on_a_schema_it_does_not_know(self):
        """A database migrated past this transferd's schema makes /readyz answer 503 naming the store check."""
        known = len(self.h.store.migrations)
        yield self.h.store.pool.runOperation("UPDATE schema_version SET version = ?", (known + 1,))
        response, body = yield self.h.request("GET", "/readyz")
        self.assertEqual(response.code, 503)
        self.assertEqual(body.decode(), f"[-]store failed: schema version {known + 1}, this transferd needs {known}\n"
                                        "readyz check failed\n")
        response, body = yield self.h.request("GET", "/readyz?verbose")
        self.assertEqual((response.code, body.decode().splitlines()[1]), (503, "[+]queue ok"))
        yield self.h.store.pool.runOperation("UPDATE schema_version SET version = ?", (known,))
        response, body = yield self.h.request("GET", "/readyz")
        self.assertEqual((response.code, body), (200, b"ok\n"))


class MetricsEndpointTests(MetricsTestCase):
    port = free_port()
    settings = {("metrics", "endpoint"): f"tcp:{port}:interface=127.0.0.1"}

    @defer.inlineCallbacks
    def test_own_endpoint(self):
        """[metrics] endpoint serves /metrics, /livez and /readyz, and nothing of the API."""
        url = f"http://127.0.0.1:{self.port}"
        samples = yield self.scrape(url)
        self.assertIn(("transferd_broker_connected", frozenset()), samples)
        response, body = yield self.get(url + "/readyz?verbose")
        self.assertEqual((response.code, body.decode().splitlines()[0]), (200, "[+]store ok"))
        response, _ = yield self.get(url + "/transferStatus?job_id=" + jobs.new_job_id())
        self.assertEqual(response.code, 404)


class MetricsAuthTests(MetricsTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.issuer = TokenIssuer(ISS)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        jwks = os.path.join(base, "jwks.json")
        self.issuer.write_jwks(jwks)
        self.settings = {("auth", "token_issuers"): f"{ISS} {jwks}",
                         ("auth", "token_audiences"): "https://transferd.example.org",
                         ("auth", "admins"): ADMIN}
        self.mktemp = lambda: os.path.join(base, "h")
        yield super().setUp()

    @defer.inlineCallbacks
    def test_metrics_for_admins_on_the_api_listener(self):
        """With authentication on, /metrics on the API listener answers 401 without a token, 403 to a user,
        200 to an admin; /livez and /readyz stay open."""
        response, body = yield self.h.request("GET", "/metrics")
        self.assertEqual((response.code, response.headers.getRawHeaders("www-authenticate")),
                         (401, ['Bearer realm="transferd"']))
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/problem+json"])
        self.assertIn("bearer token", json.loads(body)["detail"])
        user = {"Authorization": f"Bearer {self.issuer.token(sub='alice')}"}
        response, body = yield self.h.request("GET", "/metrics", headers=user)
        self.assertEqual((response.code, json.loads(body)["status"]), (403, 403), body)
        self.assertIn("for admins", json.loads(body)["detail"])
        samples = yield self.scrape(headers={"Authorization": f"Bearer {self.issuer.token(sub='operator')}"})
        self.assertIn(("transferd_broker_connected", frozenset()), samples)
        for path in ("/livez", "/readyz"):
            response, body = yield self.h.request("GET", path)
            self.assertEqual((response.code, body), (200, b"ok\n"))


class HTTPClientMetricsTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_calls_counted_by_service_and_outcome(self):
        """Each call counts once under the client's service: its status class, timeout or error, with its duration."""
        fake = Recorder(default_code=201, default_body=b"{}")
        served = serve(self, fake)
        clock = task.Clock()
        metrics = Metrics()
        client = HTTPClient(reactor, clock, timeout=5, service="fts", metrics=metrics)
        self.addCleanup(client.stop)
        yield client.request("GET", served.url)
        fake.answers.append((503, b"busy"))
        yield client.request("GET", served.url)
        fake.answers.append(stall)
        call = client.request("GET", served.url)
        while len(fake.requests) < 3:
            yield task.deferLater(reactor, 0.01, lambda: None)
        clock.advance(5)
        yield self.assertFailure(call, Exception)
        yield self.assertFailure(client.request("GET", f"http://127.0.0.1:{free_port()}/"), Exception)
        samples = parse(metrics.exposition()[0].decode())
        for outcome, count in (("2xx", 1), ("5xx", 1), ("timeout", 1), ("error", 1), ("4xx", 0)):
            self.assertEqual(value(samples, "transferd_service_calls_total", service="fts", outcome=outcome), count,
                             outcome)
        self.assertEqual(value(samples, "transferd_service_call_duration_seconds_count", service="fts"), 4)
        self.assertEqual(value(samples, "transferd_service_call_duration_seconds_bucket", service="fts",
                               le="5.0"), 4)
