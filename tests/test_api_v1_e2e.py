"""The v1 API of the real daemon over HTTP, and over HTTPS with client certificates, proxies and bearer tokens."""

import json
import os

import treq
from twisted.internet import defer
from twisted.trial import unittest

from tests.daemon import Daemon, daemon_config, free_port
from tests.support import wait_for
from tests.test_e2e_auth import ISS, ExposedDaemonTestCase, dn
from transferd import jobs, sample
from transferd.testing.tokens import AUDIENCE


class PlainHTTPTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_batch_delivered_and_explained(self):
        """A batch through the real daemon on loopback is delivered; the detail view tells its history to SUCCESS."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "deliveries"))
        sample.create(os.path.join(workdir, "archive"))
        port = free_port()
        daemon = Daemon(workdir, daemon_config(workdir, port), port)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        items = [{"product_id": product, "destination_path": "file://" + os.path.join(workdir, "deliveries", str(n))}
                 for n, product in enumerate(["sample-001", "sample-002", "no-such-product"])]
        response = yield treq.post(daemon.url + "/api/v1/jobs", json={"jobs": items}, timeout=10, persistent=False)
        answer = yield response.json()
        self.assertEqual((response.code, answer["accepted"], answer["results"][2]["error"]["status"]), (200, 2, 404))
        job_ids = [result["job_id"] for result in answer["results"][:2]]
        views = yield daemon.wait_terminal(job_ids)
        self.assertEqual({view["status"] for view in views.values()}, {jobs.SUCCESS})
        response = yield treq.get(f"{daemon.url}/api/v1/jobs/{job_ids[0]}", timeout=10, persistent=False)
        detail = yield response.json()
        self.assertEqual([event["new_status"] for event in detail["history"]],
                         [jobs.SUBMITTED, jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING, jobs.SUCCESS])
        self.assertEqual((detail["waiting_for"], detail["eta"]), (None, None))
        with open(os.path.join(workdir, "archive", "sample-001"), "rb") as source, \
                open(os.path.join(workdir, "deliveries", "0", "sample-001"), "rb") as delivered:
            self.assertEqual(source.read(), delivered.read())


class ExposedV1Tests(ExposedDaemonTestCase):
    """TLS with client certificates and tokens; an admin by token."""

    def setUp(self):
        super().setUp()
        return self.start_transferd({"token_audiences": AUDIENCE, "token_issuers": f"{ISS} {self.creds.jwks}",
                                     "admins": f"SUB=operator, ISS={ISS}"})

    @defer.inlineCallbacks
    def v1(self, who, method, path, token=None, body=None):
        kwargs = {"data": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}} if body else {}
        if token:
            kwargs.setdefault("headers", {})["Authorization"] = f"Bearer {token}"
        response = yield self.creds.client(who).request(method, self.daemon.url + path, timeout=10, **kwargs)
        return response.code, json.loads((yield response.content()))

    @defer.inlineCallbacks
    def test_certificates_proxies_and_tokens(self):
        """Over HTTPS each identity submits, lists and cancels its own jobs; the admin token sees and cancels all."""
        def batch(who):
            return {"jobs": [{"product_id": "sample-001",
                              "destination_path": "file://" + os.path.join(self.workdir, "deliveries", f"{who}-{n}")}
                             for n in range(2)]}

        carol = self.creds.issuer.token(sub="carol")
        admin = self.creds.issuer.token(sub="operator")
        owned = {}
        for who, token in (("alice", None), ("bob-proxy", None), (None, carol)):
            code, answer = yield self.v1(who, "POST", "/api/v1/jobs", token, batch(who))
            self.assertEqual((code, answer["accepted"]), (200, 2), answer)
            owned[who or "carol"] = sorted(result["job_id"] for result in answer["results"])
        for who, token, identity, method in (("alice", None, dn(self.creds.alice), "x509"),
                                             ("bob-proxy", None, dn(self.creds.bob), "x509"),
                                             (None, carol, f"SUB=carol, ISS={ISS}", "token")):
            code, me = yield self.v1(who, "GET", "/api/v1/whoami", token)
            self.assertEqual(me, {"identity": identity, "method": method, "admin": False})
            code, page = yield self.v1(who, "GET", "/api/v1/jobs", token)
            self.assertEqual(sorted(view["job_id"] for view in page["jobs"]), owned[who or "carol"])
        code, problem = yield self.v1("bob-proxy", "GET", f"/api/v1/jobs/{owned['alice'][0]}")
        self.assertEqual((code, problem["status"]), (403, 403))
        code, problem = yield self.v1(None, "GET", "/api/v1/jobs")
        self.assertEqual((code, problem["status"]), (401, 401))
        code, page = yield self.v1(None, "GET", "/api/v1/jobs?limit=1000", admin)
        self.assertEqual(len(page["jobs"]), 6)
        code, answer = yield self.v1(None, "POST", "/api/v1/jobs/cancel", carol,
                                     {"job_ids": owned["alice"] + owned["carol"]})
        self.assertEqual(code, 200)  # carol's own, unless they have ended already; never alice's
        self.assertEqual(set(answer["job_ids"]) - set(owned["carol"]), set())

        @defer.inlineCallbacks
        def ended():
            code, page = yield self.v1(None, "GET", "/api/v1/jobs?limit=1000", admin)
            return all(view["status"] in jobs.TERMINAL for view in page["jobs"]) and page

        page = yield wait_for(ended, 30, interval=0.2)
        statuses = {view["job_id"]: view["status"] for view in page["jobs"]}
        self.assertTrue(all(statuses[job_id] == jobs.SUCCESS for job_id in owned["alice"] + owned["bob-proxy"]))
        with open(self.audit) as handle:
            records = [json.loads(line) for line in handle]
        self.assertEqual([r["identity"] for r in records if r["action"] == "submit"],
                         [dn(self.creds.alice), dn(self.creds.bob), f"SUB=carol, ISS={ISS}"])
