"""The HTTP listener's limits, over real loopback connections: header and body
sizes, idle and absolute timeouts, connections per peer, with and without TLS."""

import json

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource

from tests.support import wait_for
from transferd.testing.webdav import self_signed
from transferd.web import LimitedSite, harden

GET = b"GET / HTTP/1.1\r\nHost: transferd\r\n\r\n"


class Echo(resource.Resource):
    """Answers who is asking and how much body it was given; 413 beyond max_body_bytes, as the API does."""

    isLeaf = True

    def __init__(self, max_body_bytes):
        super().__init__()
        self.max_body_bytes = max_body_bytes
        self.buffered = []  # body sizes as LimitedRequest kept them

    def render(self, request):
        body = request.content.read()
        self.buffered.append(len(body))
        request.setHeader("Content-Type", "application/json; charset=utf-8")
        if len(body) > self.max_body_bytes:
            request.setResponseCode(413)
            return json.dumps({"job_id": None, "error": True, "msg": "too large"}).encode()
        peer = request.getClientAddress()
        peer_address = [getattr(peer, "host", None), getattr(peer, "port", None)]
        return json.dumps({"peer": peer_address, "secure": request.isSecure()}).encode()


class Client(protocol.Protocol):
    """Sends what it is told, keeps all it receives, and notes when the connection opened and closed."""

    def __init__(self, send=b""):
        self.send = send
        self.received = b""
        self.closed = defer.Deferred()
        self.opened_at = self.closed_at = self.local = None

    def connectionMade(self):
        self.opened_at = reactor.seconds()
        self.local = self.transport.getHost()
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed_at = reactor.seconds()
        self.closed.callback(self.received)

    @property
    def lifetime(self):
        return self.closed_at - self.opened_at


class Trickle(Client):
    """Slowloris: a header byte every 0.1 s, for ever; never idle, never done."""

    def connectionMade(self):
        super().connectionMade()
        data = iter(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 1000)
        self.loop = task.LoopingCall(lambda: self.transport.write(bytes([next(data)])))
        self.loop.start(0.1)

    def connectionLost(self, reason):
        self.loop.stop()
        super().connectionLost(reason)


class KeepAlive(Client):
    """Sends the next request as soon as the last answer arrives, on one connection, for ever."""

    def connectionMade(self):
        super().connectionMade()
        self.transport.write(GET)
        self.sent = 1

    def dataReceived(self, data):
        super().dataReceived(data)
        if self.answers >= self.sent:
            self.transport.write(GET)
            self.sent += 1

    @property
    def answers(self):
        return self.received.count(b"HTTP/1.1 200 ")


def parse(raw):
    """The status code, headers (lower-case names) and body of the first response in raw."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status.split()[1]), headers, body


class ListenerTestCase(unittest.TestCase):
    timeout = 20  # trial's default is 120 s; a broken limit should fail fast
    max_body_bytes = 100
    max_header_bytes = 1024
    idle_timeout = 5.0
    connection_timeout = 5.0
    max_connections_per_peer = 3

    def setUp(self):
        self.clients = []

    def listen(self, interface="127.0.0.1", tls=None, unix=None, **limits):
        """Serve Echo through LimitedSite and harden() (TLS between them when tls is given).

        limits override the class's limits for this test.
        """
        for name, value in limits.items():
            setattr(self, name, value)
        self.echo = Echo(self.max_body_bytes)
        site = LimitedSite(
            self.echo, self.max_body_bytes, max_header_bytes=self.max_header_bytes,
            timeout=self.idle_timeout, access_log=False,
        )
        wrapped = site if tls is None else TLSMemoryBIOFactory(tls, False, site)
        self.factory = harden(wrapped, self.max_connections_per_peer, self.connection_timeout, reactor)
        if unix:
            self.port = reactor.listenUNIX(unix, self.factory)
        else:
            self.port = reactor.listenTCP(0, self.factory, interface=interface)
        self.addCleanup(self.close_all)
        return self.port.getHost()

    @defer.inlineCallbacks
    def close_all(self):
        for client in self.clients:
            if client.closed_at is None and client.transport is not None:
                client.transport.abortConnection()
        yield defer.gatherResults([c.closed for c in self.clients if c.opened_at is not None])
        yield self.port.stopListening()
        yield wait_for(lambda: not self.factory.protocols)

    def connect(self, client=None, endpoint=None):
        """Connect client (a plain Client by default) to the listener; fires with it once connected."""
        client = client or Client()
        self.clients.append(client)
        if endpoint is None:
            host = self.port.getHost()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, host.host, host.port)
        return endpoints.connectProtocol(endpoint, client)

    @defer.inlineCallbacks
    def exchange(self, data, **kwargs):
        """Send data on a new connection; fire with the client once the server has closed it."""
        client = yield self.connect(Client(data), **kwargs)
        yield client.closed
        return client

    def assertRefused(self, raw, code, msg):
        """raw is one JSON refusal with this code and msg, and asks the client to close."""
        status, headers, body = parse(raw)
        self.assertEqual(status, code, raw)
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(int(headers["content-length"]), len(body))
        self.assertEqual(json.loads(body), {"job_id": None, "error": True, "msg": msg})


class RequestLimitTests(ListenerTestCase):
    def setUp(self):
        super().setUp()
        self.listen()

    @defer.inlineCallbacks
    def test_normal_request(self):
        """When a request is within every limit, it is answered and the API sees the client's own address."""
        client = yield self.exchange(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        status, _, body = parse(client.received)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"peer": ["127.0.0.1", client.local.port], "secure": False})

    @defer.inlineCallbacks
    def test_headers_over_limit(self):
        """When the request line plus headers exceed max_header_bytes, the answer is a JSON 431 and the connection closes."""
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 200) for i in range(10))
        client = yield self.exchange(b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
        self.assertRefused(client.received, 431, "request headers are larger than 1024 bytes")
        self.assertEqual(self.echo.buffered, [])

    @defer.inlineCallbacks
    def test_one_header_line_over_limit(self):
        """When one header line alone exceeds max_header_bytes, the answer is a JSON 431, not a silent close."""
        client = yield self.exchange(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        self.assertRefused(client.received, 431, "request headers are larger than 1024 bytes")

    @defer.inlineCallbacks
    def test_long_request_line(self):
        """When the request line exceeds max_header_bytes, the answer is a JSON 431."""
        client = yield self.exchange(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: transferd\r\n\r\n")
        self.assertRefused(client.received, 431, "request headers are larger than 1024 bytes")

    @defer.inlineCallbacks
    def test_endless_line(self):
        """When a line grows beyond max_header_bytes without ending, the answer is a JSON 431 without waiting for its end."""
        client = yield self.exchange(b"GET /" + b"a" * 5000)
        self.assertRefused(client.received, 431, "request headers are larger than 1024 bytes")

    @defer.inlineCallbacks
    def test_malformed_requests(self):
        """When a request is malformed (request line, Content-Length), the answer is a JSON 400."""
        for request in (b"NONSENSE\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: many\r\n\r\n"):
            client = yield self.exchange(request)
            self.assertRefused(
                client.received, 400, "malformed HTTP request: bad request line, header or body framing"
            )

    @defer.inlineCallbacks
    def test_body_over_limit(self):
        """When a body exceeds max_body_bytes, the resource answers 413 having been given only max_body_bytes + 1 bytes."""
        client = yield self.exchange(
            b"POST / HTTP/1.1\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n" + b"a" * 5000
        )
        self.assertEqual(parse(client.received)[0], 413)
        self.assertEqual(self.echo.buffered, [101])


class HeaderCountTests(ListenerTestCase):
    @defer.inlineCallbacks
    def test_many_headers(self):
        """When a request has more headers than HTTPChannel allows (500), even small ones, the answer is a JSON 431."""
        self.listen(max_header_bytes=16384)  # room for the bytes of 600 headers
        client = yield self.exchange(b"GET / HTTP/1.1\r\n" + b"a:1\r\n" * 600 + b"\r\n")
        self.assertRefused(client.received, 431, "request has more than 500 headers")


class TimeoutTests(ListenerTestCase):
    @defer.inlineCallbacks
    def test_idle_connection(self):
        """When a connection stays silent, it is closed after idle_timeout."""
        self.listen(idle_timeout=0.3)
        client = yield self.connect()
        yield client.closed
        self.assertEqual(client.received, b"")
        self.assertGreater(client.lifetime, 0.25)
        self.assertLess(client.lifetime, 2.0)

    @defer.inlineCallbacks
    def test_trickle(self):
        """When a client trickles a header byte every 0.1 s, it is never idle but is closed after connection_timeout."""
        self.listen(idle_timeout=0.3, connection_timeout=1.0)
        client = yield self.connect(Trickle())
        yield client.closed
        self.assertEqual(client.received, b"")
        self.assertGreater(client.lifetime, 0.95)
        self.assertLess(client.lifetime, 2.5)

    @defer.inlineCallbacks
    def test_endless_keep_alive(self):
        """When a client sends request after request on one connection, it is closed after connection_timeout."""
        self.listen(idle_timeout=0.3, connection_timeout=1.0)
        client = yield self.connect(KeepAlive())
        yield client.closed
        self.assertGreater(client.answers, 10)
        self.assertGreater(client.lifetime, 0.95)
        self.assertLess(client.lifetime, 2.5)

    def test_client_that_does_not_read(self):
        """When an expired connection cannot close because the client reads nothing, it is aborted abort_after seconds later."""
        clock = task.Clock()
        site = LimitedSite(Echo(100), 100, access_log=False, reactor=clock)
        factory = harden(site, 3, 10, clock)
        connection = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        transport = StringTransport()
        connection.makeConnection(transport)
        clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        clock.advance(factory.abort_after)
        self.assertTrue(transport.disconnected)
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(factory.peers, {})


class PeerLimitTests(ListenerTestCase):
    @defer.inlineCallbacks
    def open_served(self, count, **kwargs):
        """count connections, each answered once and kept open."""
        clients = []
        for _ in range(count):
            client = yield self.connect(Client(GET), **kwargs)
            yield wait_for(lambda: b"HTTP/1.1 200 " in client.received)
            clients.append(client)
        return clients

    @defer.inlineCallbacks
    def test_limit(self):
        """When a peer holds max_connections_per_peer connections, a further one is closed unanswered until one of them closes."""
        self.listen()
        clients = yield self.open_served(3)
        self.assertEqual(self.factory.peers, {"127.0.0.1": 3})
        refused = yield self.exchange(GET)
        self.assertEqual(refused.received, b"")
        clients[0].transport.loseConnection()
        yield wait_for(lambda: self.factory.peers["127.0.0.1"] == 2)
        yield self.open_served(1)
        self.assertEqual(self.factory.peers, {"127.0.0.1": 3})

    @defer.inlineCallbacks
    def test_no_leak(self):
        """When connections open, get refused, are answered, and close or abort, many times over, the counts return to zero."""
        self.listen()
        for round in range(20):
            clients = yield defer.gatherResults([self.connect(Client(GET)) for _ in range(5)])
            yield wait_for(lambda: all(b"HTTP/1.1 200 " in c.received or c.closed_at is not None for c in clients))
            for client in clients:
                if client.closed_at is None:
                    (client.transport.abortConnection if round % 2 else client.transport.loseConnection)()
            yield defer.gatherResults([c.closed for c in clients])
            yield wait_for(lambda: not self.factory.peers and not self.factory.protocols)
        self.assertEqual(sum(b"HTTP/1.1 200 " in c.received for c in self.clients), 20 * 3)
        self.assertEqual(sum(c.received == b"" for c in self.clients), 20 * 2)

    @defer.inlineCallbacks
    def test_ipv6(self):
        """When clients come over IPv6, their address is limited like an IPv4 one."""
        host = self.listen(interface="::1")  # a machine without IPv6 loopback fails here, loudly
        endpoint = endpoints.TCP6ClientEndpoint(reactor, "::1", host.port)
        yield self.open_served(3, endpoint=endpoint)
        self.assertEqual(self.factory.peers, {"::1": 3})
        refused = yield self.exchange(GET, endpoint=endpoint)
        self.assertEqual(refused.received, b"")

    def test_ipv4_mapped_ipv6(self):
        """When an IPv4 client reaches a dual-stack listener (::ffff:a.b.c.d), it counts as its IPv4 address."""
        clock = task.Clock()
        site = LimitedSite(Echo(100), 100, access_log=False, reactor=clock)
        factory = harden(site, 1, 10, clock)
        connection = factory.buildProtocol(IPv6Address("TCP", "::ffff:192.0.2.1", 40000))
        connection.makeConnection(StringTransport())
        self.assertEqual(factory.peers, {"192.0.2.1": 1})
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40001)))
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.peers, {})

    @defer.inlineCallbacks
    def test_unix_socket(self):
        """When clients come over a unix socket (no IP address), they are not limited."""
        path = self.mktemp()
        self.listen(unix=path)
        clients = yield self.open_served(5, endpoint=endpoints.UNIXClientEndpoint(reactor, path))
        self.assertEqual(len(self.factory.protocols), 5)
        self.assertEqual(self.factory.peers, {})
        self.assertEqual(json.loads(parse(clients[0].received)[2]), {"peer": [None, None], "secure": False})


class TLSTests(ListenerTestCase):
    @defer.inlineCallbacks
    def test_outside_tls(self):
        """When harden() wraps the TLS factory, requests are answered with the client's own address and the absolute timeout still applies."""
        server_options, certificate = self_signed("127.0.0.1")
        host = self.listen(tls=server_options, connection_timeout=0.5)
        endpoint = endpoints.wrapClientTLS(
            optionsForClientTLS("127.0.0.1", trustRoot=certificate),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", host.port),
        )
        asked = reactor.seconds()  # the timeout runs from the server's accept, before the TLS handshake ends
        client = yield self.connect(Client(GET), endpoint=endpoint)
        yield client.closed
        status, _, body = parse(client.received)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"peer": ["127.0.0.1", client.local.port], "secure": True})
        self.assertGreater(client.closed_at - asked, 0.45)
        self.assertLess(client.lifetime, 2.0)
