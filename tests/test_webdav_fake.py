import os

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from transferd.testing.webdav import FakeWebDAVServer
from tests.support import wait_for


class FakeWebDAVTests(unittest.TestCase):
    """The fake answers as a WebDAV server would, so tests against it mean something."""

    @defer.inlineCallbacks
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        yield self.start(strict=True)

    @defer.inlineCallbacks
    def start(self, strict, tls=False):
        self.server = FakeWebDAVServer(self.root, reactor, strict=strict, tls=tls)
        yield defer.Deferred.fromCoroutine(self.server.start())
        self.addCleanup(self.server.stop)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, contextFactory=self.server.client_tls_policy, pool=pool))

    @defer.inlineCallbacks
    def call(self, method, path, data=None):
        response = yield self.http.request(method, self.server.url + path, data=data)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def test_put_then_get(self):
        """A PUT stores the bytes on disk (201, then 204 when replacing) and GET returns them."""
        self.assertEqual((yield self.call("PUT", "/f", b"one"))[0], 201)
        self.assertEqual((yield self.call("PUT", "/f", b"two"))[0], 204)
        self.assertEqual((yield self.call("GET", "/f")), (200, b"two"))
        with open(os.path.join(self.root, "f"), "rb") as stored:
            self.assertEqual(stored.read(), b"two")
        self.assertEqual(self.server.puts["/f"], 2)

    @defer.inlineCallbacks
    def test_get_missing(self):
        """GET of a path that holds no file answers 404."""
        self.assertEqual((yield self.call("GET", "/nothing"))[0], 404)

    @defer.inlineCallbacks
    def test_mkcol(self):
        """MKCOL makes a collection (201), refuses an existing one (405) and a missing parent (409)."""
        self.assertEqual((yield self.call("MKCOL", "/c/"))[0], 201)
        self.assertEqual((yield self.call("MKCOL", "/c"))[0], 405)
        self.assertEqual((yield self.call("MKCOL", "/x/y"))[0], 409)
        self.assertTrue(os.path.isdir(os.path.join(self.root, "c")))

    @defer.inlineCallbacks
    def test_strict_put_needs_parent(self):
        """In strict mode a PUT into a missing collection answers 409 and stores nothing."""
        self.assertEqual((yield self.call("PUT", "/x/f", b"data"))[0], 409)
        self.assertEqual(os.listdir(self.root), [])
        self.assertEqual(self.server.puts["/x/f"], 0)

    @defer.inlineCallbacks
    def test_lenient_put_makes_parents(self):
        """Out of strict mode a PUT creates the missing collections."""
        yield self.server.stop()
        yield self.start(strict=False)
        self.assertEqual((yield self.call("PUT", "/x/y/f", b"data"))[0], 201)
        self.assertEqual((yield self.call("GET", "/x/y/f")), (200, b"data"))

    @defer.inlineCallbacks
    def test_forced_answers(self):
        """respond_next(status, n) answers status to the next n requests, then the server behaves again."""
        self.server.respond_next(503, 2)
        self.assertEqual((yield self.call("PUT", "/f", b"a"))[0], 503)
        self.assertEqual((yield self.call("GET", "/f"))[0], 503)
        self.assertEqual((yield self.call("PUT", "/f", b"a"))[0], 201)
        self.assertEqual([(s.method, s.path) for s in self.server.requests],
                         [("PUT", "/f"), ("GET", "/f"), ("PUT", "/f")])

    @defer.inlineCallbacks
    def test_dot_dot_refused(self):
        """A path that climbs out of the root is refused."""
        code, _ = yield self.call("PUT", "/%2E%2E/escape", b"x")
        self.assertEqual(code, 400)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.root), "escape")))

    @defer.inlineCallbacks
    def test_tls(self):
        """With tls=True it serves HTTPS with a certificate its client policy trusts, and a davs URL."""
        yield self.server.stop()
        yield self.start(strict=True, tls=True)
        self.assertTrue(self.server.url.startswith("https://127.0.0.1:"))
        self.assertEqual(self.server.davs_url, "davs" + self.server.url[len("https"):])
        self.assertEqual((yield self.call("PUT", "/f", b"secure"))[0], 201)

    @defer.inlineCallbacks
    def test_stop_closes_hanging_requests(self):
        """stop() ends requests left hanging, so the client sees its connection close."""
        self.server.hang_next()
        pending = self.call("GET", "/f")
        yield wait_for(lambda: self.server.dav.hanging)
        yield self.server.stop()
        yield self.assertFailure(pending, Exception)
