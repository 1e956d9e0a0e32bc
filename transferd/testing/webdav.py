"""A fake WebDAV server, for tests and demos of HTTP/WebDAV delivery.

It speaks just enough WebDAV over real HTTP (or HTTPS, with a throw-away
self-signed certificate) to stand in for a storage element: PUT, MKCOL, GET,
HEAD and DELETE on files kept under a root directory on disk.  It counts PUTs
per path and can be told to answer a given status to the next requests, or
not to answer at all, to exercise a client's handling of 4xx and 5xx answers
and of timeouts.

    server = FakeWebDAVServer(root, reactor)
    await server.start()            # listens on 127.0.0.1, a free port
    test.addCleanup(server.stop)
    server.url                      # "http://127.0.0.1:PORT" ("https://..." with tls=True)
    server.davs_url                 # "davs://127.0.0.1:PORT" (tls=True only)
"""

import collections
import dataclasses
import datetime
import ipaddress
import os
import shutil
from typing import Optional
from urllib.parse import unquote

from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.web import http, resource, server
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from transferd.testing.servers import QuietSite, TrackingFactory


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request the server received."""

    method: str
    path: str  # decoded URL path
    length: Optional[int]  # the Content-Length header, when sent


class FakeWebDAV(resource.Resource):
    """The WebDAV resource itself: files under root, URL path = path under root.

    strict: PUT into a missing collection answers 409 Conflict, as real
    WebDAV servers do; otherwise the missing parents are created.
    """

    isLeaf = True

    def __init__(self, root, strict=True):
        super().__init__()
        self.root = os.path.abspath(root)
        self.strict = strict
        self.puts = collections.Counter()  # decoded URL path -> PUTs that stored it
        self.requests = []  # of Seen, in arrival order
        self._forced = collections.deque()  # (status, body) for the next requests; None: hang
        self.hanging = []  # requests left unanswered by hang_next()

    def respond_next(self, status, count=1, body=b""):
        """Answer status (with body) to the next count requests, whatever they ask."""
        self._forced.extend([(status, body)] * count)

    def hang_next(self, count=1):
        """Never answer the next count requests (until the server stops), to test timeouts."""
        self._forced.extend([None] * count)

    def render(self, request):
        path = unquote(request.path.decode("utf-8", "replace"))
        length = request.getHeader("content-length")
        self.requests.append(Seen(request.method.decode("ascii", "replace"), path,
                                  int(length) if length is not None else None))
        if self._forced:
            forced = self._forced.popleft()
            if forced is None:
                self.hanging.append(request)
                return server.NOT_DONE_YET
            status, body = forced
            request.setResponseCode(status)
            return body
        pieces = [piece for piece in path.split("/") if piece]
        if any(piece in (".", "..") or "\0" in piece for piece in pieces):
            return self._status(request, http.BAD_REQUEST, b"bad path\n")
        request.local_path = os.path.join(self.root, *pieces)
        return super().render(request)

    @staticmethod
    def _status(request, code, body=b""):
        request.setResponseCode(code)
        return body

    def render_PUT(self, request):
        target = request.local_path
        parent = os.path.dirname(target)
        if os.path.isdir(target) or target == self.root:
            return self._status(request, http.NOT_ALLOWED, b"a collection is there\n")
        if not os.path.isdir(parent):
            if self.strict:
                return self._status(request, http.CONFLICT, b"parent collection does not exist\n")
            os.makedirs(parent)
        existed = os.path.isfile(target)
        request.content.seek(0)
        with open(target, "wb") as out:
            shutil.copyfileobj(request.content, out)
        self.puts[unquote(request.path.decode("utf-8", "replace"))] += 1
        return self._status(request, http.NO_CONTENT if existed else http.CREATED)

    def render_MKCOL(self, request):
        target = request.local_path
        if os.path.exists(target):
            return self._status(request, http.NOT_ALLOWED, b"already exists\n")
        if not os.path.isdir(os.path.dirname(target)):
            return self._status(request, http.CONFLICT, b"parent collection does not exist\n")
        os.mkdir(target)
        return self._status(request, http.CREATED)

    def render_GET(self, request):
        target = request.local_path
        if not os.path.isfile(target):
            return self._status(request, http.NOT_FOUND, b"not found\n")
        with open(target, "rb") as data:
            return data.read()

    render_HEAD = render_GET  # twisted.web drops the body of a HEAD answer

    def render_DELETE(self, request):
        target = request.local_path
        if os.path.isdir(target) and target != self.root:
            shutil.rmtree(target)
        elif os.path.isfile(target):
            os.unlink(target)
        else:
            return self._status(request, http.NOT_FOUND, b"not found\n")
        return self._status(request, http.NO_CONTENT)


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """A client TLS policy that trusts exactly one certificate (the fake server's)."""

    def __init__(self, certificate):
        self.certificate = certificate

    def creatorForNetloc(self, hostname, port):
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.certificate)


def self_signed(host="127.0.0.1"):
    """A fresh certificate for host (an IP address or a name): (server TLS options, ssl.Certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    return ssl.CertificateOptions(privateKey=key, certificate=cert), ssl.Certificate.loadPEM(cert_pem)


class FakeWebDAVServer:
    """FakeWebDAV listening on 127.0.0.1 (a free port), over HTTP or, with tls=True, HTTPS."""

    def __init__(self, root, reactor, strict=True, tls=False):
        self.reactor = reactor
        self.dav = FakeWebDAV(root, strict=strict)
        self.site = QuietSite(self.dav)
        self._connections = TrackingFactory(self.site)
        self.tls = tls
        self.port = None
        self.url = self.davs_url = None
        self.client_tls_policy = BrowserLikePolicyForHTTPS()
        self._server_tls = None
        if tls:
            self._server_tls, certificate = self_signed("127.0.0.1")
            self.client_tls_policy = TrustOnly(certificate)

    async def start(self):
        """Listen; fire with the base URL (no trailing slash)."""
        if self.tls:
            endpoint = SSL4ServerEndpoint(self.reactor, 0, self._server_tls, interface="127.0.0.1")
        else:
            endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(self._connections)
        number = self.port.getHost().port
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{number}"
        self.davs_url = f"davs://127.0.0.1:{number}" if self.tls else None
        return self.url

    def stop(self):
        """Stop listening and close every open connection; fires when all are gone."""
        port, self.port = self.port, None
        return self._connections.close_all(port)

    # conveniences for tests

    @property
    def puts(self):
        return self.dav.puts

    @property
    def requests(self):
        return self.dav.requests

    def respond_next(self, status, count=1, body=b""):
        self.dav.respond_next(status, count, body)

    def hang_next(self, count=1):
        self.dav.hang_next(count)

    def path(self, url_path):
        """The file on disk behind a URL path such as "/dir/prod/a"."""
        return os.path.join(self.dav.root, *[p for p in url_path.split("/") if p])
