"""The reference stager (transferd-stager): its HTTP API, its staging and callbacks, and the stager contract.

Handlers that answer at once are driven in memory (StubTreq); staging and
callbacks use real HTTP on 127.0.0.1, with a recording server standing in
for transferd's /doneStaging, and time on a Clock where waits matter.
"""

import dataclasses
import json
import os

import treq
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.python import usage
from twisted.trial import unittest

from transferd import jobs, stagerd
from transferd.jobs import StagedFile, StageResult
from transferd.stagerd import ReferenceStager
from transferd.pipeline import hash_authcode
from transferd.stagers.callback import CallbackStager
from tests.contract_stager import (
    DIR_CONTENT, DIR_PRODUCT, FILE_CONTENT, FILE_PRODUCT, StagerContract, adler32, read_tree, write_archive,
)
from tests.daemon import free_port
from tests.support import wait_for
from tests.test_callback_stager import Recorder, serve, write_tls_files


def order(job_id=None, product_id=FILE_PRODUCT, callback_url="http://127.0.0.1:1/doneStaging", authcode="code-1"):
    return {"job_id": job_id or jobs.new_job_id(), "product_id": product_id,
            "callback_url": callback_url, "authcode": authcode}


class StagerTestCase(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.archive = os.path.abspath(self.mktemp())
        self.staging = os.path.abspath(self.mktemp())
        write_archive(self.archive)
        os.makedirs(self.staging)
        self.clock = task.Clock()
        self.transferd = Recorder(default_code=200, default_body=b'{"error": false, "msg": "recorded"}')
        self.callbacks = serve(self, self.transferd)

    def make(self, **options):
        settings = dict(hostname="stager.example.org", clock=self.clock, random=lambda: 1.0, request_timeout=1000.0)
        settings.update(options)
        stager = ReferenceStager(self.archive, self.staging, reactor, **settings)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stager.close()))
        return stager

    def order(self, **fields):
        fields.setdefault("callback_url", self.callbacks.url + "/doneStaging")
        return order(**fields)

    def reports(self):
        return [seen.body for seen in self.transferd.of("POST")]

    def sleeps(self):
        """The waits pending on the clock, in seconds from now, other than request timeouts (1000 s)."""
        now = self.clock.seconds()
        return [call.getTime() - now for call in self.clock.getDelayedCalls() if call.getTime() - now < 500]


class HandlerTests(StagerTestCase):
    """The API's answers, in memory."""

    def setUp(self):
        super().setUp()
        self.stager = self.make(delay=60.0)
        self.client = StubTreq(self.stager.resource())

    @defer.inlineCallbacks
    def call(self, method, path, body=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = yield self.client.request(method, "http://stager" + path, data=data,
                                             headers={"Content-Type": "application/json"})
        answer = yield response.json()
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        return response.code, answer

    @defer.inlineCallbacks
    def test_accepts_a_valid_request(self):
        """A valid POST /stage answers 202 {"job_id", "accepted": true} and the job is recalling."""
        request = self.order()
        code, answer = yield self.call("POST", "/stage", request)
        self.assertEqual((code, answer), (202, {"job_id": request["job_id"], "accepted": True}))
        code, answer = yield self.call("GET", "/stage/" + request["job_id"])
        self.assertEqual((code, answer["state"], answer["product_id"]), (200, "recalling", FILE_PRODUCT))
        self.assertEqual(answer["authcode_sha256"], hash_authcode(request["authcode"]))

    @defer.inlineCallbacks
    def test_invalid_requests_refused(self):
        """Malformed requests answer 400 with a message saying what is wrong, and start nothing."""
        cases = [
            (None, b"not json", "JSON object"),
            (None, b"[1, 2]", "JSON object"),
            ({"job_id": "nope"}, None, "job_id"),
            ({"product_id": "../etc"}, None, "product_id"),
            ({"product_id": "dir-prod/a.dat"}, None, "product_id"),
            ({"product_id": ""}, None, "product_id"),
            ({"callback_url": "ftp://host/doneStaging"}, None, "callback_url"),
            ({"callback_url": "http:///doneStaging"}, None, "callback_url"),
            ({"callback_url": 7}, None, "callback_url"),
            ({"authcode": ""}, None, "authcode"),
            ({"authcode": None}, None, "authcode"),
        ]
        for fields, raw, text in cases:
            body = self.order(**fields) if fields is not None else None
            code, answer = yield self.call("POST", "/stage", body, raw)
            self.assertEqual(code, 400, (fields, raw))
            self.assertTrue(answer["error"])
            self.assertIn(text, answer["msg"])
        self.assertEqual(self.stager.stagings, {})

    @defer.inlineCallbacks
    def test_oversized_body_refused(self):
        """A body over the limit answers 413."""
        code, answer = yield self.call("POST", "/stage", raw=b"x" * (stagerd.MAX_BODY_BYTES + 1))
        self.assertEqual(code, 413)
        self.assertIn("larger than", answer["msg"])

    @defer.inlineCallbacks
    def test_unknown_paths_and_methods(self):
        """Unknown paths answer 404, other methods 405, unknown jobs 404, malformed job ids on DELETE 400."""
        self.assertEqual((yield self.call("GET", "/nothing"))[0], 404)
        self.assertEqual((yield self.call("GET", "/stage"))[0], 405)
        self.assertEqual((yield self.call("PUT", "/stage/" + jobs.new_job_id()))[0], 405)
        self.assertEqual((yield self.call("GET", "/stage/" + jobs.new_job_id()))[0], 404)
        self.assertEqual((yield self.call("DELETE", "/stage/not-a-uuid"))[0], 400)

    @defer.inlineCallbacks
    def test_unavailable_first(self):
        """With --unavailable-first 2, the first two POST /stage answer 503 and the third is accepted."""
        stager = self.make(unavailable_first=2)
        client = StubTreq(stager.resource())
        codes = []
        for _ in range(3):
            response = yield client.post("http://stager/stage", json=self.order())
            codes.append(response.code)
            yield response.content()
        self.assertEqual(codes, [503, 503, 202])


class StagingTests(StagerTestCase):
    """Staging and calling back, over real HTTP."""

    @defer.inlineCallbacks
    def post(self, stager, body):
        """POST /stage over HTTP (serving the stager on first use); fire (code, JSON answer)."""
        if getattr(stager, "served", None) is None:
            stager.served = serve(self, stager.resource())
        response = yield treq.post(stager.served.url + "/stage", json=body, persistent=False)
        return response.code, (yield response.json())

    @defer.inlineCallbacks
    def delete(self, stager, job_id):
        response = yield treq.delete(f"{stager.served.url}/stage/{job_id}", persistent=False)
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def test_stages_a_file_product_and_calls_back(self):
        """A file product is copied to staging/<job_id>/<product> and reported with size and adler32."""
        stager = self.make(clock=reactor)
        request = self.order()
        code, _ = yield self.post(stager, request)
        self.assertEqual(code, 202)
        yield wait_for(self.reports)
        (report,) = self.reports()
        path = os.path.join(self.staging, request["job_id"], FILE_PRODUCT)
        self.assertEqual(report, {
            "job_id": request["job_id"], "product_id": FILE_PRODUCT, "authcode": "code-1", "success": True,
            "staged_to": "stager.example.org", "path": path,
            "msg": f"staged 1 file(s), {len(FILE_CONTENT)} bytes",
            "files": [{"path": FILE_PRODUCT, "size": len(FILE_CONTENT), "checksum": adler32(FILE_CONTENT)}],
        })
        with open(path, "rb") as staged:
            self.assertEqual(staged.read(), FILE_CONTENT)
        yield wait_for(lambda: stager.stagings[request["job_id"]].state == "done")  # once transferd's answer is in

    @defer.inlineCallbacks
    def test_stages_a_directory_product(self):
        """A directory product is copied whole; files are listed sorted, under the product name."""
        stager = self.make(clock=reactor)
        request = self.order(product_id=DIR_PRODUCT)
        yield self.post(stager, request)
        yield wait_for(self.reports)
        (report,) = self.reports()
        self.assertEqual(read_tree(report["path"]), DIR_CONTENT)
        self.assertEqual(report["files"], [
            {"path": f"{DIR_PRODUCT}/{name}", "size": len(data), "checksum": adler32(data)}
            for name, data in sorted(DIR_CONTENT.items())
        ])
        self.assertEqual(os.listdir(os.path.join(self.staging, request["job_id"])), [DIR_PRODUCT])

    @defer.inlineCallbacks
    def test_link_mode_shares_the_archive_files(self):
        """With --link, the staged files are hard links to the archive's."""
        stager = self.make(clock=reactor, link=True)
        yield self.post(stager, self.order(product_id=DIR_PRODUCT))
        yield wait_for(self.reports)
        (report,) = self.reports()
        staged = os.path.join(report["path"], "sub", "b.dat")
        self.assertTrue(os.path.samefile(staged, os.path.join(self.archive, DIR_PRODUCT, "sub", "b.dat")))
        self.assertEqual(read_tree(report["path"]), DIR_CONTENT)

    @defer.inlineCallbacks
    def test_waits_for_the_delay(self):
        """Nothing is staged before --delay has passed on the clock."""
        stager = self.make(delay=30.0)
        request = self.order()
        yield self.post(stager, request)
        self.clock.advance(29.9)
        self.assertFalse(os.path.exists(os.path.join(self.staging, request["job_id"])))
        self.clock.advance(0.1)
        yield wait_for(self.reports)
        self.assertTrue(self.reports()[0]["success"])

    @defer.inlineCallbacks
    def test_repeated_request_stages_once(self):
        """The same request again (same authcode) answers 202 without a second staging."""
        stager = self.make(delay=30.0)
        request = self.order()
        first = yield self.post(stager, request)
        again = yield self.post(stager, request)
        self.assertEqual((first[0], again[0]), (202, 202))
        self.assertEqual(stager.accepted, 1)
        self.clock.advance(30)
        yield wait_for(lambda: stager.stagings[request["job_id"]].state == "done")
        yield self.post(stager, request)  # even after the callback: transferd only repeats unanswered requests
        self.assertEqual((len(self.reports()), stager.accepted, self.clock.getDelayedCalls()), (1, 1, []))

    @defer.inlineCallbacks
    def test_callback_stager_learns_whether_an_attempt_is_still_under_way(self):
        """transferd's still_staging over real HTTP: True while this stager works on the attempt whose authcode's
        hash the job holds; False for another attempt's hash, once the report is recorded, and for an unknown job."""
        stager = self.make(delay=30.0)
        request = self.order()
        yield self.post(stager, request)
        client = CallbackStager(stager.served.url + "/stage", self.callbacks.url, reactor, reactor, timeout=60.0,
                                max_attempts=2, retry_delay=0.05)
        self.addCleanup(client.stopService)
        job = jobs.Job(job_id=request["job_id"], product_id=request["product_id"], destination_path="file:///d",
                       status=jobs.STAGING, stager_callback=hash_authcode(request["authcode"]))
        self.assertTrue((yield client.still_staging(job)))
        self.assertFalse((yield client.still_staging(dataclasses.replace(job, stager_callback=hash_authcode("x")))))
        self.assertFalse((yield client.still_staging(dataclasses.replace(job, job_id=jobs.new_job_id()))))
        self.clock.advance(30)
        yield wait_for(lambda: stager.stagings[request["job_id"]].state == "done")
        self.assertFalse((yield client.still_staging(job)))

    @defer.inlineCallbacks
    def test_new_authcode_restarts(self):
        """A new authcode for the same job (transferd re-staging after its timeout) replaces the old attempt."""
        stager = self.make(delay=30.0)
        request = self.order()
        yield self.post(stager, request)
        self.clock.advance(10)
        yield self.post(stager, dict(request, authcode="code-2"))
        self.clock.advance(20)  # the first attempt's recall would have ended now: it was stopped
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        yield wait_for(lambda: stager.stagings[request["job_id"]].state == "done")
        self.assertEqual([report["authcode"] for report in self.reports()], ["code-2"])

    @defer.inlineCallbacks
    def test_unknown_product_reported_as_failure(self):
        """A product not in the archive is reported with success false and a message naming it."""
        stager = self.make(clock=reactor)
        yield self.post(stager, self.order(product_id="no-such-product"))
        yield wait_for(self.reports)
        (report,) = self.reports()
        self.assertFalse(report["success"])
        self.assertEqual(report["msg"], "product 'no-such-product' is not in the archive")
        self.assertNotIn("path", report)

    @defer.inlineCallbacks
    def test_fail_products(self):
        """--fail-products reports failure for the products named, and stages others."""
        stager = self.make(clock=reactor, fail_products=[FILE_PRODUCT])
        yield self.post(stager, self.order())
        yield wait_for(self.reports)
        self.assertFalse(self.reports()[0]["success"])
        self.assertIn("--fail-products", self.reports()[0]["msg"])
        yield self.post(stager, self.order(product_id=DIR_PRODUCT))
        yield wait_for(lambda: len(self.reports()) == 2)
        self.assertTrue(self.reports()[1]["success"])

    @defer.inlineCallbacks
    def test_drop_first(self):
        """--drop-first 1 accepts the first request but never calls back; transferd's re-stage is served."""
        stager = self.make(drop_first=1)
        request = self.order()
        code, _ = yield self.post(stager, request)
        self.assertEqual((code, stager.stagings[request["job_id"]].state, self.clock.getDelayedCalls()),
                         (202, "dropped", []))
        yield self.post(stager, dict(request, authcode="code-2"))
        self.clock.advance(0)
        yield wait_for(self.reports)
        self.assertEqual([report["authcode"] for report in self.reports()], ["code-2"])

    @defer.inlineCallbacks
    def test_callback_retried_while_transferd_is_unavailable(self):
        """Callbacks answered 503 are retried with doubling waits until transferd records the report."""
        stager = self.make(callback_retry=1.0, callback_retry_max=3.0)
        self.transferd.answers.extend([(503, b""), (503, b""), (502, b""), (200, b"{}")])
        request = self.order()
        yield self.post(stager, request)
        self.clock.advance(0)
        waits = []
        for attempt in range(1, 4):
            yield wait_for(lambda: len(self.reports()) == attempt and self.sleeps())
            waits.extend(self.sleeps())
            self.clock.advance(waits[-1])
        yield wait_for(lambda: stager.stagings[request["job_id"]].state == "done")
        self.assertEqual(waits, [1.0, 2.0, 3.0])
        self.assertEqual(len(self.reports()), 4)

    @defer.inlineCallbacks
    def test_refused_callback_gives_up_and_frees_the_copy(self):
        """A callback refused with 403 (cancelled or expired) is not retried, and the staged copy is removed."""
        stager = self.make()
        self.transferd.answers.append((403, b'{"error": true, "msg": "authcode has expired"}'))
        request = self.order()
        yield self.post(stager, request)
        self.clock.advance(0)
        yield wait_for(lambda: stager.stagings[request["job_id"]].state == "refused")
        yield wait_for(lambda: not os.path.exists(os.path.join(self.staging, request["job_id"])))
        self.assertEqual((len(self.reports()), self.clock.getDelayedCalls()), (1, []))

    @defer.inlineCallbacks
    def test_callback_deadline(self):
        """When transferd stays unreachable, callbacks stop at --callback-deadline."""
        stager = self.make(callback_retry=1.0, callback_retry_max=2.0, callback_deadline=5.0)
        request = self.order(callback_url=f"http://127.0.0.1:{free_port()}/doneStaging")
        yield self.post(stager, request)
        self.clock.advance(0)
        staging = stager.stagings[request["job_id"]]
        while staging.state != "given up":
            yield wait_for(lambda: self.sleeps() or staging.state == "given up")
            if self.sleeps():
                self.clock.advance(self.sleeps()[0])
        self.assertLessEqual(self.clock.seconds(), 5.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_delete_stops_a_pending_staging(self):
        """DELETE during the recall answers 200: nothing is staged and no callback comes; a second DELETE is 404."""
        stager = self.make(delay=30.0)
        request = self.order()
        yield self.post(stager, request)
        self.assertEqual((yield self.delete(stager, request["job_id"])), 200)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNotIn(request["job_id"], stager.stagings)
        self.assertFalse(os.path.exists(os.path.join(self.staging, request["job_id"])))
        self.assertEqual((yield self.delete(stager, request["job_id"])), 404)
        self.assertEqual(self.reports(), [])

    @defer.inlineCallbacks
    def test_delete_stops_callback_retries_and_removes_the_copy(self):
        """DELETE while callbacks are being retried stops them and removes the staged copy."""
        stager = self.make()
        self.transferd.default = (503, b"")
        request = self.order()
        yield self.post(stager, request)
        self.clock.advance(0)
        yield wait_for(lambda: self.reports() and self.sleeps())
        self.assertTrue(os.path.exists(os.path.join(self.staging, request["job_id"], FILE_PRODUCT)))
        self.assertEqual((yield self.delete(stager, request["job_id"])), 200)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(os.path.exists(os.path.join(self.staging, request["job_id"])))

    @defer.inlineCallbacks
    def test_delete_after_a_restart_removes_what_is_on_disk(self):
        """A DELETE for a job this process never saw still removes its staged copy (the stager restarted)."""
        stager = self.make()
        job_id = jobs.new_job_id()
        os.makedirs(os.path.join(self.staging, job_id, FILE_PRODUCT))
        stager.served = serve(self, stager.resource())
        self.assertEqual((yield self.delete(stager, job_id)), 200)
        self.assertFalse(os.path.exists(os.path.join(self.staging, job_id)))

    @defer.inlineCallbacks
    def test_https_callback_verified_with_callback_ca(self):
        """With --callback-ca, an https callback_url is verified against those CAs and the report delivered."""
        paths = write_tls_files(os.path.abspath(self.mktemp()))
        transferd = Recorder(default_code=200, default_body=b"{}")
        secure = serve(self, transferd, tls=paths.server_only_options)
        options = stagerd.Options()
        options.parseOptions(["--archive", self.archive, "--staging", self.staging, "--callback-ca", paths.ca])
        stager = self.make(clock=reactor, tls_policy=options["tls-policy"])
        yield self.post(stager, self.order(callback_url=secure.url + "/doneStaging"))
        yield wait_for(lambda: transferd.of("POST"))
        self.assertTrue(transferd.of("POST")[0].body["success"])

    @defer.inlineCallbacks
    def test_ignore_cancel(self):
        """With --ignore-cancel a DELETE answers 200 but staging and its callback go on."""
        stager = self.make(delay=30.0, ignore_cancel=True)
        request = self.order()
        yield self.post(stager, request)
        self.assertEqual((yield self.delete(stager, request["job_id"])), 200)
        self.clock.advance(30)
        yield wait_for(self.reports)

    @defer.inlineCallbacks
    def test_close_stops_everything(self):
        """close() stops recalls and callback retries and refuses new requests with 503."""
        stager = self.make(delay=30.0)
        yield self.post(stager, self.order())
        yield defer.Deferred.fromCoroutine(stager.close())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((yield self.post(stager, self.order()))[0], 503)


class OptionsTests(unittest.TestCase):
    def setUp(self):
        self.archive = os.path.abspath(self.mktemp())
        os.makedirs(self.archive)

    def parse(self, *args):
        options = stagerd.Options()
        options.parseOptions(list(args))
        return options

    def test_defaults(self):
        """Only --archive and --staging are needed; testing options default to off."""
        options = self.parse("--archive", self.archive, "--staging", "/tmp/x")
        self.assertEqual((options["endpoint"], options["delay"], options["drop-first"], options["fail-products"],
                          options["callback-deadline"], options["link"]),
                         ("tcp:8081:interface=127.0.0.1", 0.0, 0, (), 86400.0, 0))

    def test_values(self):
        """Numbers and product lists are parsed."""
        options = self.parse("--archive", self.archive, "--staging", "/tmp/x", "--delay", "1.5",
                             "--fail-products", "a, b", "--drop-first", "2", "--link")
        self.assertEqual((options["delay"], options["fail-products"], options["drop-first"], options["link"]),
                         (1.5, ("a", "b"), 2, 1))

    def test_refusals(self):
        """Missing directories and bad numbers are refused with a message naming the option."""
        for args, text in [
            ((), "--archive"),
            (("--archive", self.archive), "--staging"),
            (("--archive", "/no/such/dir", "--staging", "/tmp/x"), "not a directory"),
            (("--archive", self.archive, "--staging", "/tmp/x", "--delay", "-1"), "--delay"),
            (("--archive", self.archive, "--staging", "/tmp/x", "--drop-first", "many"), "--drop-first"),
            (("--archive", self.archive, "--staging", "/tmp/x", "--callback-retry", "0"), "--callback-retry"),
            (("--archive", self.archive, "--staging", "/tmp/x", "--callback-ca", self.archive), "--callback-ca"),
        ]:
            error = self.assertRaises(usage.UsageError, self.parse, *args)
            self.assertIn(text, str(error))


class ReferenceStagerContractTests(StagerContract, unittest.TestCase):
    """transferd's callback stager talking to the reference stager: together they are an IStager.

    stage() fires None; finish() waits for the reference stager's callback
    at a recording /doneStaging and turns it into the StageResult transferd
    would record.
    """

    timeout = 30

    def make_stager(self, archive_root, staging_root):
        self.transferd = Recorder(default_code=200, default_body=b"{}")
        callbacks = serve(self, self.transferd)
        reference = ReferenceStager(archive_root, staging_root, reactor, reactor, hostname="stager.example.org")
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(reference.close()))
        served = serve(self, reference.resource())
        return CallbackStager(served.url + "/stage", callbacks.url, reactor, reactor, timeout=60.0, max_attempts=2,
                              retry_delay=0.05)

    @defer.inlineCallbacks
    def finish(self, stager, job, result):
        if result is not None:
            return result

        def report():
            mine = [seen.body for seen in self.transferd.of("POST") if seen.body["job_id"] == job.job_id]
            return mine[-1] if mine else None

        body = yield wait_for(report)
        return StageResult(
            success=body["success"], msg=body["msg"], staged_to=body.get("staged_to"), path=body.get("path"),
            files=tuple(StagedFile(**entry) for entry in body.get("files", ())),
        )
