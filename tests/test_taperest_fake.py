"""The fake Tape REST server answers as the WLCG Tape REST API v1 says, so tests against it mean something."""

import json

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from transferd.testing.taperest import FakeTapeRestServer

PROBLEM = "application/problem+json"


class FakeTapeRestTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.server = FakeTapeRestServer(reactor, clock=self.clock, queue_seconds=10, recall_seconds=20, seed=1)
        yield defer.Deferred.fromCoroutine(self.server.start())
        self.addCleanup(self.server.stop)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        self.api = self.server.endpoint_url

    @defer.inlineCallbacks
    def call(self, method, url, body=None, raw=None, headers=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = yield self.http.request(method, url, data=data, headers=headers)
        content = yield response.content()
        kind = (response.headers.getRawHeaders("content-type") or [""])[0]
        return response.code, (json.loads(content) if content else None), kind, response.headers

    @defer.inlineCallbacks
    def stage(self, *paths):
        code, body, _, headers = yield self.call("POST", self.api + "/stage", {"files": [{"path": p} for p in paths]})
        self.assertEqual(code, 201)
        self.assertEqual(headers.getRawHeaders("location"), [f"{self.api}/stage/{body['requestId']}"])
        return body["requestId"]

    @defer.inlineCallbacks
    def test_discovery_document(self):
        """The well-known document lists the endpoints with uri, version and metadata, v1 among them."""
        code, body, kind, _ = yield self.call("GET", self.server.url + "/.well-known/wlcg-tape-rest-api")
        self.assertEqual((code, kind), (200, "application/json"))
        self.assertIn({"uri": self.api, "version": "v1", "metadata": {}}, body["endpoints"])
        self.assertEqual(self.server.calls["discovery"], 1)

    @defer.inlineCallbacks
    def test_recall_goes_through_the_states(self):
        """A staged file is SUBMITTED, then STARTED, then COMPLETED and on disk, on the server's clock."""
        request_id = yield self.stage("/tape/a")
        seen = []
        for step in (0, 10, 20):
            self.clock.advance(step)
            code, body, _, _ = yield self.call("GET", f"{self.api}/stage/{request_id}")
            self.assertEqual((code, body["id"]), (200, request_id))
            seen.append(body["files"][0]["state"])
        self.assertEqual(seen, ["SUBMITTED", "STARTED", "COMPLETED"])
        self.assertTrue(body["files"][0]["onDisk"])
        self.assertEqual((body["createdAt"], body["completedAt"]), (1_700_000_000, 1_700_000_030))

    @defer.inlineCallbacks
    def test_failing_path_and_shuffled_files(self):
        """A failing path ends FAILED with its error; the file list comes back in varying orders."""
        self.server.fail_path("/tape/bad", "tape VOL1 unreadable")
        paths = [f"/tape/f{n}" for n in range(8)] + ["/tape/bad"]
        request_id = yield self.stage(*paths)
        self.clock.advance(30)
        orders = set()
        for _ in range(5):
            _, body, _, _ = yield self.call("GET", f"{self.api}/stage/{request_id}")
            orders.add(tuple(f["path"] for f in body["files"]))
        self.assertGreater(len(orders), 1)
        bad = [f for f in body["files"] if f["path"] == "/tape/bad"][0]
        self.assertEqual((bad["state"], bad["error"]), ("FAILED", "tape VOL1 unreadable"))

    @defer.inlineCallbacks
    def test_malformed_stage_requests(self):
        """Bodies that are not {"files": [{"path": absolute}]} answer 400 problem+json."""
        for raw in (b"not json", b"{}", b'{"files": []}', b'{"files": [{"path": "relative"}]}',
                    b'{"files": [{"path": "/a"}, {"path": "/a"}]}', b'{"files": [{"path": "/a", "diskLifetime": 3}]}'):
            code, body, kind, _ = yield self.call("POST", self.api + "/stage", raw=raw)
            self.assertEqual((code, kind, body["status"]), (400, PROBLEM, 400), raw)
            self.assertTrue(body["title"])
        self.assertEqual(self.server.stage_requests, {})

    @defer.inlineCallbacks
    def test_unknown_request_and_resource(self):
        """Unknown request ids answer 404 on every request endpoint; unknown paths 404; wrong methods 405."""
        for method, tail, body in (("GET", "/stage/nope", None), ("DELETE", "/stage/nope", None),
                                   ("POST", "/stage/nope/cancel", {"paths": ["/a"]}),
                                   ("POST", "/release/nope", {"paths": ["/a"]}), ("GET", "/other", None)):
            code, answer, kind, _ = yield self.call(method, self.api + tail, body)
            self.assertEqual((code, kind), (404, PROBLEM), tail)
        code, _, kind, headers = yield self.call("GET", self.api + "/stage")
        self.assertEqual((code, kind, headers.getRawHeaders("allow")), (405, PROBLEM, ["POST"]))

    @defer.inlineCallbacks
    def test_cancel_release_delete(self):
        """Cancel marks files CANCELLED, release records the paths, both refuse foreign paths; delete forgets."""
        request_id = yield self.stage("/tape/a", "/tape/b")
        code, _, _, _ = yield self.call("POST", f"{self.api}/stage/{request_id}/cancel", {"paths": ["/tape/a"]})
        self.assertEqual(code, 200)
        self.assertEqual(self.server.state_of(request_id, "/tape/a"), "CANCELLED")
        code, body, _, _ = yield self.call("POST", f"{self.api}/stage/{request_id}/cancel", {"paths": ["/tape/x"]})
        self.assertEqual((code, body["title"]), (400, "File missing from stage request"))
        self.clock.advance(30)
        code, _, _, _ = yield self.call("POST", f"{self.api}/release/{request_id}", {"paths": ["/tape/b"]})
        self.assertEqual((code, self.server.released), (200, [(request_id, "/tape/b")]))
        code, _, _, _ = yield self.call("DELETE", f"{self.api}/stage/{request_id}")
        self.assertEqual(code, 200)
        code, _, _, _ = yield self.call("GET", f"{self.api}/stage/{request_id}")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_archiveinfo(self):
        """archiveinfo says whether each file is on disk too."""
        request_id = yield self.stage("/tape/a")
        self.clock.advance(30)
        code, body, _, _ = yield self.call("POST", self.api + "/archiveinfo", {"paths": ["/tape/a", "/tape/b"]})
        self.assertEqual((code, body), (200, [{"path": "/tape/a", "locality": "DISK_AND_TAPE"},
                                              {"path": "/tape/b", "locality": "TAPE"}]))
        self.assertTrue(request_id)

    @defer.inlineCallbacks
    def test_bearer_token(self):
        """With a token set, API calls without it or with another answer 401; discovery stays open."""
        self.server.tape.token = "s3cret"
        body = {"files": [{"path": "/a"}]}
        for headers in (None, {"Authorization": ["Bearer wrong"]}):
            code, answer, kind, _ = yield self.call("POST", self.api + "/stage", body, headers=headers)
            self.assertEqual((code, kind, answer["title"]), (401, PROBLEM, "Unauthorized"))
        code, _, _, _ = yield self.call("POST", self.api + "/stage", body, headers={"Authorization": ["Bearer s3cret"]})
        self.assertEqual(code, 201)
        code, _, _, _ = yield self.call("GET", self.server.url + "/.well-known/wlcg-tape-rest-api")
        self.assertEqual(code, 200)
        self.assertEqual(self.server.calls["stage"], 3)

    @defer.inlineCallbacks
    def test_forced_answers(self):
        """respond_next answers the given status to the next requests of one endpoint, then the server behaves again."""
        self.server.respond_next(503, 2, endpoint="stage")
        code, _, _, _ = yield self.call("GET", self.server.url + "/.well-known/wlcg-tape-rest-api")
        self.assertEqual(code, 200)
        for expected in (503, 503, 201):
            code, _, _, _ = yield self.call("POST", self.api + "/stage", {"files": [{"path": "/a"}]})
            self.assertEqual(code, expected)
