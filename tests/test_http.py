"""transferd.http.HTTPClient against a small server on 127.0.0.1 (real HTTP; call time limits on a Clock)."""

from twisted.internet import defer, error, reactor, task
from twisted.trial import unittest
from twisted.web import server

from transferd.http import Answer, HTTPClient, Timeout, TooLarge, answer_message, describe
from tests.daemon import free_port
from tests.support import wait_for
from tests.test_callback_stager import Recorder, serve


def stall(request):
    """Headers and part of the body, then nothing."""
    request.setHeader("Content-Length", "100")
    request.write(b"x" * 10)
    return server.NOT_DONE_YET


class HTTPClientTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.fake = Recorder(default_code=201, default_body=b'{"recorded": true}')
        self.served = serve(self, self.fake)
        self.clock = task.Clock()

    def client(self, **options):
        client = HTTPClient(reactor, self.clock, **options)
        self.addCleanup(client.stop)
        return client

    @defer.inlineCallbacks
    def test_whole_answer(self):
        """A call fires with the code, phrase, headers and the whole body; JSON is sent, with the client's headers."""
        answer = yield self.client(headers={"Accept": "application/json"}).request(
            "POST", self.served.url + "/x", json={"a": 1}, headers={"X-Extra": "yes"})
        self.assertEqual((answer.code, answer.phrase), (201, "Created"))
        self.assertEqual(answer.header("content-type"), "application/json")
        self.assertEqual(answer.json(), {"recorded": True})
        (seen,) = self.fake.requests
        self.assertEqual((seen.method, seen.path, seen.body), ("POST", "/x", {"a": 1}))
        self.assertEqual((seen.headers.getRawHeaders("accept"), seen.headers.getRawHeaders("x-extra")),
                         (["application/json"], ["yes"]))

    def test_json_of_a_body_that_is_not(self):
        """Answer.json() raises ValueError for a body that is not JSON."""
        self.assertRaises(ValueError, Answer(200, "OK", None, b"<html>").json)
        self.assertRaises(ValueError, Answer(200, "OK", None, b"\xff").json)

    @defer.inlineCallbacks
    def test_time_limit_covers_the_body(self):
        """A server that sends headers and then stalls mid-body fails the call with Timeout at the limit."""
        self.fake.answers.append(stall)
        call = self.client(timeout=5).request("GET", self.served.url)
        yield wait_for(lambda: self.fake.requests)
        self.clock.advance(4.9)
        self.assertNoResult(call)
        self.clock.advance(0.1)
        failure = yield self.assertFailure(call, Timeout)
        self.assertEqual(str(failure), "no complete answer within 5s")

    @defer.inlineCallbacks
    def test_call_time_limit(self):
        """A call's own timeout replaces the client's."""
        self.fake.answers.append(None)
        call = self.client(timeout=5).request("GET", self.served.url, timeout=30)
        yield wait_for(lambda: self.fake.hanging)
        self.clock.advance(29)
        self.assertNoResult(call)
        self.clock.advance(1)
        yield self.assertFailure(call, Timeout)

    @defer.inlineCallbacks
    def test_body_size_bounded(self):
        """An answer body over max_body fails the call with TooLarge."""
        self.fake.answers.append((200, b"y" * 5000))
        failure = yield self.assertFailure(self.client(max_body=1000).request("GET", self.served.url), TooLarge)
        self.assertIn("1000 bytes", str(failure))

    @defer.inlineCallbacks
    def test_cancel_and_stop(self):
        """A cancelled call, and the calls in flight when the client stops, fail with CancelledError."""
        self.fake.answers.extend([None, stall])
        client = self.client()
        first = client.request("GET", self.served.url)
        yield wait_for(lambda: self.fake.hanging)
        first.cancel()
        yield self.assertFailure(first, defer.CancelledError)
        second = client.request("GET", self.served.url)
        yield wait_for(lambda: len(self.fake.requests) == 2)
        yield client.stop()
        yield self.assertFailure(second, defer.CancelledError)
        yield self.assertFailure(client.request("GET", self.served.url), defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_connection_failures_as_they_are(self):
        """A refused connection reaches the caller as the connection error, and describe() words it."""
        failure = yield self.assertFailure(self.client().request("GET", f"http://127.0.0.1:{free_port()}/"),
                                           error.ConnectionRefusedError)
        self.assertIn("refused", describe(failure))

    def test_answer_message(self):
        """answer_message() is the server's JSON "msg", else its text, shortened."""
        self.assertEqual(answer_message(b'{"error": true, "msg": "no such job"}'), "no such job")
        self.assertEqual(answer_message(b"  plain words "), "plain words")
        self.assertEqual(answer_message(b""), "(no message)")
        self.assertEqual(len(answer_message(b"z" * 900)), 500)
