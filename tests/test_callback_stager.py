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
from transferd.interfaces import ServiceAway
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
        settings = dict(timeout=600.0, max_attempts=3, retry_delay=2.0, request_timeout=30.0)
        settings.update(overrides)
        stager = CallbackStager(url or self.served.url + "/stage", "http://transferd.example.org:8080/",
                                reactor, clock or self.clock, **settings)
        stager.startService()
        self.addCleanup(lambda: stager.running and stager.stopService())
        return stager

    @defer.inlineCallbacks
    def away(self, stager):
        """Stage once; fire the ServiceAway it fails with."""
        return (yield self.assertFailure(stager.stage(a_job("sample-001"), "code"), ServiceAway))

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
    def test_unavailable_stager_is_away(self):
        """A 503 is ServiceAway after one request, with the stager's message; the pipeline asks again later."""
        self.fake.answers.append((503, b'{"msg": "tape library in maintenance"}'))
        away = yield self.away(self.make())
        self.assertEqual(str(away), f"the stager at {self.served.url}/stage cannot take requests now: HTTP 503:"
                                    " tape library in maintenance")
        self.assertEqual(away.retry_after, 2.0)
        self.assertEqual(len(self.fake.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_retry_after_is_followed(self):
        """A stager's Retry-After longer than retry_delay is the wait; an HTTP date or nonsense is not."""
        def answer(retry_after):
            def render(request):
                request.setResponseCode(503)
                request.setHeader("Retry-After", retry_after)
                return b""
            return render

        self.fake.answers.extend([answer("120"), answer("Wed, 21 Oct 2026 07:28:00 GMT"), answer("nan"),
                                  answer("1"), answer("999999")])
        stager = self.make()
        waits = []
        for _ in range(5):
            waits.append((yield self.away(stager)).retry_after)
        self.assertEqual(waits, [120.0, 2.0, 2.0, 2.0, 3600.0])

    @defer.inlineCallbacks
    def test_unreachable_stager_is_away(self):
        """When nothing listens at the stager's URL, stage() fails with ServiceAway naming the URL and the error."""
        url = f"http://127.0.0.1:{free_port()}/stage"
        away = yield self.away(self.make(url=url, clock=reactor))
        self.assertIn(f"the stager at {url} cannot be reached: ", str(away))
        self.assertIn("refused", str(away))

    @defer.inlineCallbacks
    def test_server_errors_and_later_answers_are_away(self):
        """500, 429 and 408 all mean "later": ServiceAway with the status."""
        self.fake.answers.extend([(500, b'{"error": true, "msg": "tape library offline"}'), (429, b""), (408, b"")])
        stager = self.make(clock=reactor)
        messages = []
        for _ in range(3):
            messages.append(str((yield self.away(stager))))
        self.assertIn("HTTP 500: tape library offline", messages[0])
        self.assertIn("HTTP 429", messages[1])
        self.assertIn("HTTP 408", messages[2])

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
    def test_hung_stager_is_away(self):
        """A request without a complete answer within request_timeout is abandoned: ServiceAway saying so."""
        self.fake.answers.append(None)
        stager = self.make(request_timeout=30.0)
        staging = stager.stage(a_job("sample-001"), "code")
        yield wait_for(lambda: self.fake.hanging)
        self.clock.advance(30.0)
        away = yield self.assertFailure(staging, ServiceAway)
        self.assertIn("cannot be reached: no complete answer within 30s", str(away))
        self.assertEqual(len(self.fake.requests), 1)

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
    def test_still_staging_asks_about_the_jobs_attempt(self):
        """still_staging GETs <url>/<job_id>: True only for a 200 naming the job's authcode hash in a working state;
        another attempt, an ended one, 404, 405, a body that is not JSON or a stager away is False."""
        stager = self.make(clock=reactor)
        job = a_job("sample-001", stager_callback="ab" * 32)
        answers = [
            ((200, b'{"state": "copying", "authcode_sha256": "' + b"ab" * 32 + b'"}'), True),
            ((200, b'{"state": "calling back", "authcode_sha256": "' + b"ab" * 32 + b'"}'), True),
            ((200, b'{"state": "copying", "authcode_sha256": "' + b"cd" * 32 + b'"}'), False),
            ((200, b'{"state": "refused", "authcode_sha256": "' + b"ab" * 32 + b'"}'), False),
            ((200, b'{"state": "copying"}'), False),
            ((200, b"[1, 2]"), False),
            ((200, b"<html>not json</html>"), False),
            ((404, b'{"msg": "no such job"}'), False),
            ((405, b'{"msg": "method not allowed"}'), False),
            ((503, b'{"msg": "maintenance"}'), False),
        ]
        for answer, expected in answers:
            self.fake.answers.append(answer)
            self.assertIs((yield stager.still_staging(job)), expected, answer)
        self.assertEqual({(seen.method, seen.path) for seen in self.fake.requests}, {("GET", f"/stage/{job.job_id}")})
        self.assertFalse((yield stager.still_staging(a_job("sample-001", stager_callback=None))))
        away = self.make(url=f"http://127.0.0.1:{free_port()}/stage", clock=reactor)
        self.assertFalse((yield away.still_staging(job)))

    @defer.inlineCallbacks
    def test_cancel_never_raises(self):
        """When the stager cannot be reached, cancel() and free_copy() still succeed (the failure is logged)."""
        stager = self.make(url=f"http://127.0.0.1:{free_port()}/stage", clock=reactor)
        job = a_job("sample-001")
        yield stager.cancel(job)
        yield stager.free_copy(job)
        yield wait_for(lambda: not stager._work)

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
    def test_cancelled_stage_call_stops_the_request(self):
        """Cancelling stage() while the stager hangs (the daemon stopping) ends it: no timer, nothing left."""
        self.fake.answers.append(None)
        stager = self.make()
        staging = stager.stage(a_job("sample-001"), "code")
        yield wait_for(lambda: self.fake.hanging)
        staging.cancel()
        yield self.assertFailure(staging, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(stager._work)


class FromConfigTests(unittest.TestCase):
    timeout = 30

    def config(self, **stager):
        overrides = {("stager", key): value for key, value in stager.items()}
        overrides[("api", "public_url")] = "http://transferd.example.org:8080"
        return load_config(None, overrides)

    def test_settings_from_config(self):
        """[stager] url, timeout, max_attempts, retry_delay, give_up_after and [api] public_url reach the stager."""
        stager = callback.from_config(
            self.config(backend="callback", url="http://stager:8081/stage", timeout="120",
                        max_attempts="4", retry_delay="0.5", give_up_after="600"), reactor, reactor, None)
        self.addCleanup(stager.stopService)
        self.assertEqual((stager.url, stager.callback_url, stager.timeout, stager.max_attempts, stager.retry_delay,
                          stager.give_up_after),
                         ("http://stager:8081/stage", "http://transferd.example.org:8080/doneStaging",
                          120.0, 4, 0.5, 600.0))

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
        """A server whose certificate ca_path does not vouch for is not reached: the stager is away, saying why."""
        paths = write_tls_files(os.path.abspath(self.mktemp()))
        other = write_tls_files(os.path.abspath(self.mktemp()))
        fake = Recorder()
        served = serve(self, fake, tls=paths.server_options)
        stager = callback.from_config(
            self.config(backend="callback", url=served.url + "/stage", ca_path=other.ca,
                        cert=paths.client_cert, key=paths.client_key), reactor, reactor, None)
        self.addCleanup(stager.stopService)
        away = yield self.assertFailure(stager.stage(a_job("sample-001"), "code"), ServiceAway)
        self.assertIn("cannot be reached", str(away))
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
