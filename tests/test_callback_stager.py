"""The callback stager against a small recording HTTP server on 127.0.0.1 (real HTTP, time on a Clock)."""

import collections
import datetime
import ipaddress
import json
import os

from twisted.internet import defer, reactor, ssl, task
from twisted.trial import unittest
from twisted.web import resource, server

from transferd.config import ConfigError, load_config
from transferd.stagers import callback
from transferd.stagers.callback import CallbackStager
from transferd.testing.servers import QuietSite, TrackingFactory
from tests.contract_stager import a_job
from tests.daemon import free_port
from tests.support import wait_for

# -- a recording HTTP server (also the fake stager of tests/test_e2e_staging.py) ------------------


Seen = collections.namedtuple("Seen", "method path body headers")


class Recorder(resource.Resource):
    """Records every request (JSON bodies decoded) and answers from a script, else default_code.

    answers holds (code, body) pairs for the next requests, None to leave a
    request unanswered (a hung server), or a function rendering the request.
    """

    isLeaf = True

    def __init__(self, default_code=202, default_body=b'{"accepted": true}'):
        super().__init__()
        self.default = (default_code, default_body)
        self.answers = collections.deque()
        self.requests = []
        self.hanging = []

    def render(self, request):
        body = request.content.read()
        try:
            decoded = json.loads(body) if body else None
        except ValueError:
            decoded = body
        self.requests.append(Seen(request.method.decode(), request.path.decode(), decoded, request.requestHeaders))
        answer = self.answers.popleft() if self.answers else self.default
        if callable(answer):
            return answer(request)
        if answer is None:
            self.hanging.append(request)
            return server.NOT_DONE_YET
        code, payload = answer
        request.setResponseCode(code)
        request.setHeader("Content-Type", "application/json")
        return payload

    def of(self, method):
        return [seen for seen in self.requests if seen.method == method]


class Served:
    """A resource listening on 127.0.0.1 (a free port, or the one given); stop() closes everything."""

    def __init__(self, root, port=0, tls=None):
        self.factory = TrackingFactory(QuietSite(root))
        if tls is None:
            self.port = reactor.listenTCP(port, self.factory, interface="127.0.0.1")
        else:
            self.port = reactor.listenSSL(port, self.factory, tls, interface="127.0.0.1")
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port.getHost().port}"

    def stop(self):
        return self.factory.close_all(self.port)


def serve(test, root, port=0, tls=None):
    served = Served(root, port, tls)
    test.addCleanup(served.stop)
    return served


# -- the tests --------------------------------------------------------------------


class CallbackStagerTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.fake = Recorder()
        self.served = serve(self, self.fake)
        self.clock = task.Clock()

    def make(self, url=None, clock=None, **overrides):
        settings = dict(timeout=600.0, max_attempts=3, retry_delay=2.0, request_timeout=30.0, random=lambda: 0.5)
        settings.update(overrides)
        stager = CallbackStager(url or self.served.url + "/stage", "http://transferd.example.org:8080/",
                                reactor, clock or self.clock, **settings)
        stager.startService()
        self.addCleanup(lambda: stager.running and stager.stopService())
        return stager

    @defer.inlineCallbacks
    def wait_for_retry(self, requests):
        """Wait until the server has seen requests POSTs and the stager sleeps on the clock; return the sleep."""
        yield wait_for(lambda: len(self.fake.of("POST")) == requests and self.sleeps())
        return self.sleeps()[0]

    def sleeps(self):
        """Delayed calls on the clock other than request timeouts (30 s)."""
        return [call.getTime() - self.clock.seconds() for call in self.clock.getDelayedCalls()
                if call.getTime() - self.clock.seconds() < 30]

    @defer.inlineCallbacks
    def test_accepted_request_fires_none(self):
        """When the stager answers 202, stage() fires None: the stager reports later through /doneStaging."""
        stager = self.make()
        job = a_job("sample-001")
        result = yield stager.stage(job, "the-code")
        self.assertIsNone(result)
        (seen,) = self.fake.requests
        self.assertEqual((seen.method, seen.path), ("POST", "/stage"))
        self.assertEqual(seen.body, {"job_id": job.job_id, "product_id": "sample-001", "authcode": "the-code",
                                     "callback_url": "http://transferd.example.org:8080/doneStaging"})
        self.assertEqual(seen.headers.getRawHeaders("content-type"), ["application/json; charset=UTF-8"])
        self.assertIs((yield stager.check("sample-001")), None)

    @defer.inlineCallbacks
    def test_unavailable_stager_is_retried_with_backoff(self):
        """When the stager answers 503 twice, the same request is sent again after jittered, doubling waits."""
        self.fake.answers.extend([(503, b'{"msg": "busy"}'), (503, b"busy")])
        stager = self.make(random=lambda: 0.5)
        job = a_job("sample-001")
        staging = stager.stage(job, "code")
        self.assertEqual((yield self.wait_for_retry(1)), 1.0)  # half of retry_delay (2 s)
        self.clock.advance(1.0)
        self.assertEqual((yield self.wait_for_retry(2)), 2.0)  # half of 4 s
        self.clock.advance(2.0)
        self.assertIsNone((yield staging))
        bodies = [seen.body for seen in self.fake.requests]
        self.assertEqual(len(bodies), 3)
        self.assertEqual(bodies[0], bodies[2])

    def test_backoff_ceiling_doubles_up_to_a_limit(self):
        """The wait before retry n is drawn below retry_delay * 2**(n-1), never above max_retry_delay."""
        stager = self.make(retry_delay=2.0, max_retry_delay=10.0, random=lambda: 0.999)
        waits = [stager._backoff(n) for n in range(1, 6)]
        self.assertEqual([round(w, 2) for w in waits], [2.0, 4.0, 7.99, 9.99, 9.99])
        self.assertEqual(self.make(random=lambda: 0.0)._backoff(3), 0.0)

    @defer.inlineCallbacks
    def test_unreachable_stager_fails_after_max_attempts(self):
        """When nothing listens at the stager's URL, stage() fires a failure naming the URL, attempts and error."""
        url = f"http://127.0.0.1:{free_port()}/stage"
        stager = self.make(url=url, clock=reactor, max_attempts=3, retry_delay=0.01)
        result = yield stager.stage(a_job("sample-001"), "code")
        self.assertFalse(result.success)
        self.assertIn(f"the stager at {url} could not be reached after 3 attempts: ", result.msg)
        self.assertIn("refused", result.msg)

    @defer.inlineCallbacks
    def test_server_errors_exhaust_attempts(self):
        """When every try answers 5xx, the failure carries the last status and the stager's message."""
        self.fake.default = (500, b'{"error": true, "msg": "tape library offline"}')
        stager = self.make(clock=reactor, max_attempts=2, retry_delay=0.01)
        result = yield stager.stage(a_job("sample-001"), "code")
        self.assertFalse(result.success)
        self.assertIn("could not be reached after 2 attempts: HTTP 500: tape library offline", result.msg)
        self.assertEqual(len(self.fake.requests), 2)

    @defer.inlineCallbacks
    def test_too_many_requests_is_retried(self):
        """429 and 408 mean "later": they are retried like 5xx."""
        self.fake.answers.extend([(429, b""), (408, b"")])
        stager = self.make(clock=reactor, max_attempts=3, retry_delay=0.01)
        self.assertIsNone((yield stager.stage(a_job("sample-001"), "code")))
        self.assertEqual(len(self.fake.requests), 3)

    @defer.inlineCallbacks
    def test_refusal_fails_at_once(self):
        """A 4xx refusal fails staging at once, with the status and the stager's message; no retry."""
        self.fake.answers.append((400, b'{"error": true, "msg": "product_id must be a plain name"}'))
        stager = self.make()
        result = yield stager.stage(a_job("sample-001"), "code")
        self.assertFalse(result.success)
        self.assertIn("refused the request: HTTP 400: product_id must be a plain name", result.msg)
        self.fake.answers.append((404, b"No Such Resource"))
        result = yield stager.stage(a_job("sample-001"), "code")
        self.assertIn("HTTP 404: No Such Resource", result.msg)
        self.assertEqual(len(self.fake.requests), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_hung_stager_times_out_and_is_retried(self):
        """A request without a complete answer within request_timeout is abandoned and tried again."""
        self.fake.answers.append(None)
        stager = self.make(request_timeout=30.0)
        staging = stager.stage(a_job("sample-001"), "code")
        yield wait_for(lambda: self.fake.hanging)
        self.clock.advance(30.0)
        self.assertEqual((yield self.wait_for_retry(1)), 1.0)
        self.clock.advance(1.0)
        self.assertIsNone((yield staging))
        self.assertEqual(len(self.fake.requests), 2)

    @defer.inlineCallbacks
    def test_hung_stager_message(self):
        """When every try hangs, the failure says no complete answer came in time."""
        self.fake.default = None
        stager = self.make(clock=reactor, max_attempts=2, retry_delay=0.01, request_timeout=0.2)
        result = yield stager.stage(a_job("sample-001"), "code")
        self.assertIn("could not be reached after 2 attempts: no complete answer within 0.2s", result.msg)

    @defer.inlineCallbacks
    def test_cancel_and_free_copy_send_delete(self):
        """cancel() and free_copy() DELETE <url>/<job_id> and fire at once."""
        stager = self.make()
        job = a_job("sample-001")
        self.assertIsNone((yield stager.cancel(job)))
        yield wait_for(lambda: self.fake.of("DELETE"))
        self.assertEqual(self.fake.of("DELETE")[0].path, f"/stage/{job.job_id}")
        self.fake.answers.append((404, b'{"msg": "no such job"}'))
        self.assertIsNone((yield stager.free_copy(job)))
        yield wait_for(lambda: len(self.fake.of("DELETE")) == 2)

    @defer.inlineCallbacks
    def test_cancel_never_raises(self):
        """When the stager cannot be reached, cancel() and free_copy() still succeed (the failure is logged)."""
        stager = self.make(url=f"http://127.0.0.1:{free_port()}/stage", clock=reactor)
        job = a_job("sample-001")
        yield stager.cancel(job)
        yield stager.free_copy(job)
        yield wait_for(lambda: not stager._work)

    def retrying(self):
        """A stager whose stage() waits to retry a 503; fires (stager, stage() Deferred)."""
        self.fake.answers.append((503, b""))
        stager = self.make()
        staging = stager.stage(a_job("sample-001"), "code")
        return self.wait_for_retry(1).addCallback(lambda _: (stager, staging))

    @defer.inlineCallbacks
    def test_stop_cancels_pending_retries(self):
        """Stopping during a retry wait fails stage() with CancelledError and leaves no timer behind."""
        stager, staging = yield self.retrying()
        yield stager.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        yield self.assertFailure(staging, defer.CancelledError)

    @defer.inlineCallbacks
    def test_stop_cancels_requests_in_flight(self):
        """Stopping with a request hanging cancels it: stage() fails with CancelledError."""
        self.fake.answers.append(None)
        stager = self.make()
        staging = stager.stage(a_job("sample-001"), "code")
        yield wait_for(lambda: self.fake.hanging)
        yield stager.stopService()
        yield self.assertFailure(staging, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_cancelled_stage_call_stops_retrying(self):
        """Cancelling stage() during a retry wait (the daemon stopping) ends it: no timer, no further POST."""
        stager, staging = yield self.retrying()
        staging.cancel()
        yield self.assertFailure(staging, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.fake.of("POST")), 1)
        self.assertFalse(stager._work)


class FromConfigTests(unittest.TestCase):
    timeout = 30

    def config(self, **stager):
        overrides = {("stager", key): value for key, value in stager.items()}
        overrides[("api", "public_url")] = "http://transferd.example.org:8080"
        return load_config(None, overrides)

    def test_settings_from_config(self):
        """[stager] url, timeout, max_attempts, retry_delay and [api] public_url reach the stager."""
        stager = callback.from_config(
            self.config(backend="callback", url="http://stager:8081/stage", timeout="120",
                        max_attempts="4", retry_delay="0.5"), reactor, reactor, None)
        self.addCleanup(stager.stopService)
        self.assertEqual((stager.url, stager.callback_url, stager.timeout, stager.max_attempts, stager.retry_delay),
                         ("http://stager:8081/stage", "http://transferd.example.org:8080/doneStaging",
                          120.0, 4, 0.5))

    def test_url_required(self):
        """backend = callback without a url is refused with a message naming the key."""
        with self.assertRaises(ConfigError) as caught:  # refused by the configuration, or else by from_config
            callback.from_config(self.config(backend="callback"), reactor, reactor, None)
        self.assertIn("[stager] url", str(caught.exception))

    def test_unusable_tls_files(self):
        """An https url with a CA path holding no certificate is refused at start-up."""
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        error = self.assertRaises(ConfigError, callback.from_config,
                                  self.config(backend="callback", url="https://stager:8081/stage", ca_path=empty),
                                  reactor, reactor, None)
        self.assertIn("ca_path", str(error))

    @defer.inlineCallbacks
    def test_https_with_ca_and_client_certificate(self):
        """Over https the stager is verified against ca_path and sees our client certificate from cert/key."""
        paths = write_tls_files(os.path.abspath(self.mktemp()))
        fake = Recorder()
        served = serve(self, fake, tls=paths.server_options)
        stager = callback.from_config(
            self.config(backend="callback", url=served.url + "/stage", ca_path=paths.ca,
                        cert=paths.client_cert, key=paths.client_key), reactor, reactor, None)
        self.addCleanup(stager.stopService)
        self.assertIsNone((yield stager.stage(a_job("sample-001"), "code")))
        self.assertEqual(len(fake.requests), 1)

    @defer.inlineCallbacks
    def test_https_refuses_an_unknown_server(self):
        """A server whose certificate ca_path does not vouch for is not reached: staging fails with the reason."""
        paths = write_tls_files(os.path.abspath(self.mktemp()))
        other = write_tls_files(os.path.abspath(self.mktemp()))
        fake = Recorder()
        served = serve(self, fake, tls=paths.server_options)
        stager = callback.from_config(
            self.config(backend="callback", url=served.url + "/stage", ca_path=other.ca, max_attempts="1",
                        cert=paths.client_cert, key=paths.client_key), reactor, reactor, None)
        self.addCleanup(stager.stopService)
        result = yield stager.stage(a_job("sample-001"), "code")
        self.assertFalse(result.success)
        self.assertIn("could not be reached after 1 attempts", result.msg)
        self.assertEqual(fake.requests, [])


# -- throw-away TLS credentials -------------------------------------------------------


class TLSFiles:
    pass


def write_tls_files(directory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files under directory.

    Returns paths (ca, client_cert, client_key), server_options: TLS options
    for a server that requires a client certificate signed by the CA, and
    server_only_options: the same server asking for no client certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject, key, issuer_name, issuer_key, ca=False, alt=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if alt is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem(cert):
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = issue("test CA", ca_key, "test CA", ca_key, ca=True)
    server_cert = issue("127.0.0.1", server_key, "test CA", ca_key,
                        alt=x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    client_cert = issue("transferd", client_key, "test CA", ca_key)
    os.makedirs(directory)
    paths = TLSFiles()
    for name, data in (("ca", pem(ca)), ("client_cert", pem(client_cert)), ("client_key", key_pem(client_key))):
        setattr(paths, name, os.path.join(directory, name + ".pem"))
        with open(getattr(paths, name), "wb") as out:
            out.write(data)
    paths.server_options = ssl.CertificateOptions(
        privateKey=server_key, certificate=server_cert, verify=True, requireCertificate=True,
        caCerts=[ssl.Certificate.loadPEM(pem(ca)).original],
    )
    paths.server_only_options = ssl.CertificateOptions(privateKey=server_key, certificate=server_cert)
    return paths
