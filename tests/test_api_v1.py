"""The v1 API's handlers over real HTTP on loopback (tests/harness.py): batches, listings, cancels, errors.

The workers are not started, so jobs stay where the tests put them.
"""

import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.harness import Harness
from tests.support import wait_for
from transferd import jobs, leases
from transferd.api_v1 import MAX_METADATA_BYTES, STREAM_PAGE

JSON = {"Content-Type": "application/json"}


class V1TestCase(unittest.TestCase):
    """A harness on the embedded set-up (workers idle), with JSON helpers."""

    settings = {}
    consume = False

    @defer.inlineCallbacks
    def setUp(self):
        self.h = Harness(self.mktemp(), self.settings)
        yield self.h.start(consume=self.consume)
        self.addCleanup(self.h.close)
        self.addCleanup(self.h.pipeline.flush_holds)  # the pipeline is not running: its stop would do this

    @defer.inlineCallbacks
    def call(self, method, path, body=None, headers=None, raw=None):
        """(status, parsed JSON body, Content-Type) of one request; body is sent as JSON, raw as is."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        sent = dict(JSON if body is not None else {}, **(headers or {}))
        response, content = yield self.h.request(method, path, data=data, headers=sent)
        content_type = (response.headers.getRawHeaders("content-type") or [None])[0]
        return response.code, json.loads(content) if content.strip() else None, content_type

    def item(self, **overrides):
        return dict({"product_id": "sample-001", "destination_path": self.h.destination}, **overrides)

    @defer.inlineCallbacks
    def submit(self, items, **extra):
        code, answer, _ = yield self.call("POST", "/api/v1/jobs", dict({"jobs": items}, **extra))
        self.assertEqual(code, 200, answer)
        return answer

    @defer.inlineCallbacks
    def all_jobs(self):
        return (yield self.h.store.list_jobs(jobs.JobFilter(), 100_000))

    def assertProblem(self, outcome, status, words):
        code, body, content_type = outcome
        self.assertEqual((code, content_type), (status, "application/problem+json"), body)
        self.assertEqual((body["status"], body["type"]), (status, "about:blank"))
        self.assertTrue(body["title"])
        self.assertIn(words, body["detail"])


class SubmitTests(V1TestCase):
    settings = {("api", "max_batch"): "50", ("api", "max_batch_bytes"): "200000"}

    @defer.inlineCallbacks
    def test_each_item_accepted_or_refused_on_its_own(self):
        """When a batch mixes good and bad items, each bad one gets its own error in place and the rest are created."""
        items = [
            self.item(priority=5, label="run-7", metadata={"obs": [1, 2]}),
            self.item(product_id="not-archived"),
            self.item(destination_path="file:///etc"),
            self.item(priority=9),
            self.item(priority=True),
            self.item(label=""),
            self.item(metadata=[1]),
            self.item(metadata={"x": "y" * MAX_METADATA_BYTES}),
            self.item(colour="blue"),
            "sample-001",
            {"destination_path": self.h.destination},
            self.item(product_id="sample-dir"),
        ]
        answer = yield self.submit(items)
        self.assertEqual((answer["accepted"], answer["refused"], answer["submission_id"]), (2, 10, None))
        results = answer["results"]
        self.assertEqual([r["index"] for r in results], list(range(len(items))))
        statuses = [r["error"]["status"] if "error" in r else 200 for r in results]
        self.assertEqual(statuses, [200, 404, 400, 400, 400, 400, 400, 400, 400, 400, 400, 200])
        for result, words in zip(results[1:11], ["not in the archive", "must lie under", "priority", "priority",
                                                 "label", "metadata must be a JSON object", "at most 16384 bytes",
                                                 "colour", "must be an object", "product_id is required"]):
            self.assertIn(words, result["error"]["detail"])
            self.assertTrue(result["error"]["title"])
        stored = {job.job_id: job for job in (yield self.all_jobs())}
        self.assertEqual(set(stored), {results[0]["job_id"], results[11]["job_id"]})
        first = stored[results[0]["job_id"]]
        self.assertEqual((first.priority, first.label, json.loads(first.metadata), first.status),
                         (5, "run-7", {"obs": [1, 2]}, jobs.SUBMITTED))
        self.assertEqual(stored[results[11]["job_id"]].priority, jobs.DEFAULT_PRIORITY)

    @defer.inlineCallbacks
    def test_accepted_jobs_committed_and_published(self):
        """When a batch is accepted, every job has its history row; once the scheduler released it and the queue
        confirmed it, a long queue hold."""
        answer = yield self.submit([self.item() for _ in range(20)])
        self.assertEqual((yield defer.Deferred.fromCoroutine(self.h.daemon.scheduler.settle())), 20)
        yield self.h.pipeline.flush_holds()
        for result in answer["results"]:
            job = yield self.h.store.get(result["job_id"])
            self.assertEqual(job.lease_owner, leases.IN_QUEUE)
            self.assertGreater(job.lease_until, reactor.seconds() + self.h.config.reconciler.lease)
            history = yield self.h.store.events(job.job_id)
            self.assertEqual([(e["new_status"], e["actor"]) for e in history], [(jobs.SUBMITTED, "anonymous user")])

    @defer.inlineCallbacks
    def test_submission_id_returns_the_first_answer(self):
        """When a batch comes again with the same submission_id, the first answer comes back and nothing is created."""
        first = yield self.submit([self.item(), self.item(product_id="not-archived")], submission_id="run-7 day 1")
        again = yield self.submit([self.item(), self.item(), self.item()], submission_id="run-7 day 1")
        self.assertEqual(again, first)
        self.assertEqual(first["submission_id"], "run-7 day 1")
        self.assertEqual(len((yield self.all_jobs())), 1)
        other = yield self.submit([self.item()], submission_id="run-7 day 2")
        self.assertNotEqual(other["results"][0]["job_id"], first["results"][0]["job_id"])
        self.assertEqual(len((yield self.all_jobs())), 2)

    @defer.inlineCallbacks
    def test_concurrent_repeats_create_once(self):
        """When the same submission arrives several times at once, one batch is created and all get its answer."""
        body = {"jobs": [self.item() for _ in range(5)], "submission_id": "burst"}
        outcomes = yield defer.gatherResults([self.call("POST", "/api/v1/jobs", body) for _ in range(4)])
        answers = [answer for _, answer, _ in outcomes]
        self.assertEqual([code for code, _, _ in outcomes], [200] * 4)
        self.assertTrue(all(answer == answers[0] for answer in answers), answers)
        self.assertEqual(len((yield self.all_jobs())), 5)

    @defer.inlineCallbacks
    def test_refused_bodies_change_nothing(self):
        """Bodies of the wrong type, size or shape get 415, 413, 400 or 422 problems and create no job."""
        cases = [
            ((yield self.call("POST", "/api/v1/jobs", raw=b"jobs=1",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})), 415, "application/json"),
            ((yield self.call("POST", "/api/v1/jobs", raw=b'{"jobs": [}', headers=JSON)), 400, "not valid JSON"),
            ((yield self.call("POST", "/api/v1/jobs", raw=b"\xff\xfe", headers=JSON)), 400, "not valid JSON"),
            ((yield self.call("POST", "/api/v1/jobs", raw=b"[" * 5000 + b"]" * 5000, headers=JSON)), 400,
             "nested too deeply"),
            ((yield self.call("POST", "/api/v1/jobs", [self.item()])), 422, "JSON object"),
            ((yield self.call("POST", "/api/v1/jobs", {})), 422, "jobs must be a list"),
            ((yield self.call("POST", "/api/v1/jobs", {"jobs": []})), 422, "at least one"),
            ((yield self.call("POST", "/api/v1/jobs", {"jobs": [self.item()], "extra": 1})), 422, "extra"),
            ((yield self.call("POST", "/api/v1/jobs", {"jobs": [self.item()], "submission_id": 7})), 422,
             "submission_id"),
            ((yield self.call("POST", "/api/v1/jobs", {"jobs": [self.item()], "submission_id": "x" * 256})), 400,
             "submission_id"),
            ((yield self.call("POST", "/api/v1/jobs", {"jobs": [self.item()] * 51})), 413, "at most 50 jobs"),
            ((yield self.call("POST", "/api/v1/jobs", {"jobs": [self.item(label="x" * 250)] * 50,
                                                        "pad": "x" * 200_000})), 413, "larger than 200000 bytes"),
        ]
        for outcome, status, words in cases:
            self.assertProblem(outcome, status, words)
        self.assertEqual((yield self.all_jobs()), [])


class ListTests(V1TestCase):
    @defer.inlineCallbacks
    def test_pages_filters_and_cursor(self):
        """Pages follow next, newest first, without gaps or repeats; filters narrow the listing."""
        labelled = yield self.submit([self.item(label="a") for _ in range(3)])
        others = yield self.submit([self.item(label="b", destination_path="davs://se.example.org/d")
                                    for _ in range(4)])
        ids = [r["job_id"] for r in labelled["results"] + others["results"]]
        seen, path = [], "/api/v1/jobs?limit=3"
        while path:
            code, page, content_type = yield self.call("GET", path)
            self.assertEqual((code, content_type), (200, "application/json"))
            self.assertLessEqual(len(page["jobs"]), 3)
            seen += page["jobs"]
            path = f"/api/v1/jobs?limit=3&cursor={page['next']}" if page["next"] else None
        self.assertEqual(sorted(view["job_id"] for view in seen), sorted(ids))
        order = [(view["time_submitted"], view["job_id"]) for view in seen]
        self.assertEqual(order, sorted(order, reverse=True))
        for query, expected in [("label=a", labelled), ("destination_host=SE.example.org", others),
                                ("status=submitted,STAGING&label=b", others), ("status=STAGING", None),
                                ("product_id=sample-001&label=a", labelled),
                                ("submitted_after=2999-01-01T00:00:00Z", None),
                                ("submitted_before=2999-01-01T00:00:00%2B02:00&label=b", others),
                                ("updated_after=1999-01-01T00:00:00Z&label=a", labelled),
                                ("submitted_after=0001-01-01T00:00:00%2B05:00&label=a", labelled),
                                ("submitted_before=0001-01-01T00:00:00Z", None)]:
            code, page, _ = yield self.call("GET", "/api/v1/jobs?" + query)
            wanted = sorted(r["job_id"] for r in expected["results"]) if expected else []
            self.assertEqual((code, sorted(view["job_id"] for view in page["jobs"])), (200, wanted), query)
        code, page, _ = yield self.call("GET", "/api/v1/jobs?label=a")
        self.assertEqual(page["next"], None)
        self.assertEqual(page["jobs"][0]["label"], "a")
        self.assertNotIn("lease_owner", page["jobs"][0])

    @defer.inlineCallbacks
    def test_bad_parameters(self):
        """Unknown, repeated or malformed parameters get a 400 problem saying which."""
        for query, words in [("colour=red", "unknown parameter 'colour'"), ("label=a&label=b", "more than once"),
                             ("status=DONE", "DONE is not a job state"), ("status=", "status must be text"),
                             ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"),
                             ("submitted_after=yesterday", "ISO 8601"),
                             ("submitted_after=2026-01-01T00:00:00", "time zone"),
                             ("cursor=bm9wZQ", "cursor"), ("cursor=!!", "cursor"),
                             ("label=%ff", "UTF-8")]:
            self.assertProblem((yield self.call("GET", "/api/v1/jobs?" + query)), 400, words)
        self.assertProblem((yield self.call("GET", "/api/v1/jobs?limit=5", headers={"Accept": "application/x-ndjson"})),
                           400, "leave out limit and cursor")

    @defer.inlineCallbacks
    def test_ndjson_streams_every_matching_job(self):
        """With Accept: application/x-ndjson every matching job comes as one JSON line, newest first, across pages."""
        count = STREAM_PAGE * 2 + 7
        answer = yield self.submit([self.item(label="many") for _ in range(count)])
        yield self.submit([self.item(label="other")])
        response, content = yield self.h.request("GET", "/api/v1/jobs?label=many",
                                                 headers={"Accept": "application/json;q=0.5, application/x-ndjson"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/x-ndjson"])
        lines = content.decode().splitlines()
        views = [json.loads(line) for line in lines]
        self.assertEqual(sorted(v["job_id"] for v in views), sorted(r["job_id"] for r in answer["results"]))
        order = [(v["time_submitted"], v["job_id"]) for v in views]
        self.assertEqual(order, sorted(order, reverse=True))
        response, content = yield self.h.request("GET", "/api/v1/jobs?label=none",
                                                 headers={"Accept": "application/x-ndjson"})
        self.assertEqual((response.code, content), (200, b""))


class CancelTests(V1TestCase):
    @defer.inlineCallbacks
    def test_delete_cancels_once(self):
        """DELETE cancels an active job (200, the CANCELLED view), then answers 409; unknown ids 404, bad ids 400."""
        job_id = (yield self.submit([self.item()]))["results"][0]["job_id"]
        code, view, _ = yield self.call("DELETE", f"/api/v1/jobs/{job_id}")
        self.assertEqual((code, view["status"], view["job_id"]), (200, jobs.CANCELLED, job_id))
        self.assertProblem((yield self.call("DELETE", f"/api/v1/jobs/{job_id}")), 409, "already ended (CANCELLED)")
        self.assertProblem((yield self.call("DELETE", f"/api/v1/jobs/{jobs.new_job_id()}")), 404, "no job")
        self.assertProblem((yield self.call("DELETE", "/api/v1/jobs/nope")), 400, "UUID")
        history = yield self.h.store.events(job_id)
        self.assertEqual(history[-1]["new_status"], jobs.CANCELLED)

    @defer.inlineCallbacks
    def test_cancel_by_filter(self):
        """POST /jobs/cancel cancels the active jobs the filter matches and names them; ended ones stay as they are."""
        doomed = yield self.submit([self.item(label="doomed") for _ in range(3)])
        kept = yield self.submit([self.item(label="kept")])
        doomed_ids = [r["job_id"] for r in doomed["results"]]
        yield self.call("DELETE", f"/api/v1/jobs/{doomed_ids[0]}")
        code, answer, _ = yield self.call("POST", "/api/v1/jobs/cancel", {"label": "doomed"})
        self.assertEqual((code, answer["cancelled"], sorted(answer["job_ids"])), (200, 2, sorted(doomed_ids[1:])))
        code, answer, _ = yield self.call("POST", "/api/v1/jobs/cancel", {"status": "SUCCESS,CANCELLED"})
        self.assertEqual((code, answer), (200, {"cancelled": 0, "job_ids": []}))
        code, answer, _ = yield self.call("POST", "/api/v1/jobs/cancel", {"job_ids": [doomed_ids[1]]})
        self.assertEqual(answer["cancelled"], 0)
        self.assertEqual((yield self.h.store.get(kept["results"][0]["job_id"])).status, jobs.SUBMITTED)

    @defer.inlineCallbacks
    def test_refused_filters_cancel_nothing(self):
        """An empty, unknown, badly typed or malformed filter gets a problem and cancels nothing."""
        yield self.submit([self.item() for _ in range(3)])
        for body, status, words in [({}, 422, "at least one"), ({"colour": "red"}, 422, "colour"),
                                    ({"status": ["STAGING"]}, 422, "status must be text"),
                                    ({"job_ids": "x"}, 422, "job_ids"), ({"job_ids": []}, 422, "job_ids"),
                                    ({"job_ids": ["nope"]}, 422, "job_ids"),
                                    ({"status": "NOPE"}, 400, "not a job state"),
                                    ({"submitted_before": "soon"}, 400, "ISO 8601")]:
            self.assertProblem((yield self.call("POST", "/api/v1/jobs/cancel", body)), status, words)
        self.assertProblem((yield self.call("POST", "/api/v1/jobs/cancel", raw=b"status=SUBMITTED")), 415, "JSON")
        self.assertEqual({job.status for job in (yield self.all_jobs())}, {jobs.SUBMITTED})


class RoutingTests(V1TestCase):
    @defer.inlineCallbacks
    def test_whoami_without_authentication(self):
        """Without [auth] the caller is an anonymous admin."""
        code, body, _ = yield self.call("GET", "/api/v1/whoami")
        self.assertEqual((code, body), (200, {"identity": None, "method": None, "admin": True}))

    @defer.inlineCallbacks
    def test_unknown_paths_and_methods(self):
        """Unknown v1 paths get a 404 problem, other methods a 405 problem with Allow; the prototype's paths are untouched."""
        self.assertProblem((yield self.call("GET", "/api/v1/nothing")), 404, "openapi.json")
        self.assertProblem((yield self.call("GET", "/api/v1")), 404, "openapi.json")
        response, content = yield self.h.request("PUT", "/api/v1/jobs")
        self.assertEqual((response.code, response.headers.getRawHeaders("allow")), (405, ["GET, HEAD, POST"]))
        self.assertEqual(json.loads(content)["status"], 405)
        self.assertProblem((yield self.call("PATCH", f"/api/v1/jobs/{jobs.new_job_id()}")), 405, "DELETE")
        code, body, content_type = yield self.call("GET", "/transferStatus?job_id=x")
        self.assertEqual((code, body["error"], content_type), (400, True, "application/json; charset=utf-8"))
        code, body, _ = yield self.call("GET", "/api/v2/jobs")
        self.assertEqual((code, body["error"]), (404, True))

    @defer.inlineCallbacks
    def test_openapi_document_served(self):
        """GET /api/v1/openapi.json serves the package's OpenAPI 3.1 document."""
        code, document, content_type = yield self.call("GET", "/api/v1/openapi.json")
        self.assertEqual((code, content_type, document["openapi"]), (200, "application/json", "3.1.0"))
        with open(os.path.join(os.path.dirname(jobs.__file__), "openapi_v1.json")) as handle:
            self.assertEqual(document, json.load(handle))


class LimitTests(V1TestCase):
    """[limits] as a client sees them: 429 beyond the waiting cap, and waiting_for naming the limit."""

    settings = {("limits", "max_waiting_per_submitter"): "2", ("limits", "retry_after"): "45"}

    @defer.inlineCallbacks
    def test_waiting_cap_refuses_the_whole_batch_with_retry_after(self):
        """A batch that would leave more than 2 jobs waiting is refused whole (429, Retry-After), creating nothing;
        /submitTransfer answers 429 in its own JSON; a batch within the cap is accepted."""
        code, body, content_type = yield self.call("POST", "/api/v1/jobs", {"jobs": [self.item() for _ in range(3)]})
        self.assertProblem((code, body, content_type), 429, "anonymous has 0 job(s) waiting to be staged and may have"
                                                           " at most 2")
        self.assertEqual((yield self.all_jobs()), [])
        yield self.submit([self.item(), self.item()])
        response, content = yield self.h.request("POST", "/submitTransfer", data={
            "product_id": "sample-001", "destination_path": self.h.destination})
        self.assertEqual((response.code, response.headers.getRawHeaders("retry-after")), (429, ["45"]))
        answer = json.loads(content)
        self.assertEqual((answer["error"], answer["job_id"]), (True, None))
        self.assertIn("too many jobs waiting", answer["msg"])
        response, _ = yield self.h.request("POST", "/api/v1/jobs", data=json.dumps({"jobs": [self.item()]}).encode(),
                                           headers=JSON)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["45"])
        self.assertEqual(len((yield self.all_jobs())), 2)


class WaitingForLimitTests(V1TestCase):
    consume = True
    settings = {("limits", "max_staging"): "1", ("stager", "delay"): "3600"}

    @defer.inlineCallbacks
    def test_a_job_held_back_says_which_limit(self):
        """With one staging request at a time and the first job staging, the second says it waits for a slot."""
        yield self.submit([self.item(), self.item()])  # one batch: which of the two goes first is the database's
        staging = jobs.JobFilter(statuses=(jobs.STAGING,))
        yield wait_for(lambda: self.h.store.list_jobs(staging, 10).addCallback(len))
        (second,) = yield self.h.store.list_jobs(jobs.JobFilter(statuses=(jobs.SUBMITTED,)), 10)
        code, view, _ = yield self.call("GET", f"/api/v1/jobs/{second.job_id}")
        self.assertEqual((code, view["status"], view["share"]), (200, jobs.SUBMITTED, "anonymous"))
        self.assertEqual(view["waiting_for"]["reason"], "limit_staging", view["waiting_for"])
        self.assertIn("at most 1 staging requests at once ([limits] max_staging), and 1 are in progress",
                      view["waiting_for"]["message"])
