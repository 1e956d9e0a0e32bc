"""The HTTP listener: bounded requests and bounded connections.

The daemon may face the internet, so no client may pin memory, connections or
file descriptors:

* LimitedRequest keeps at most max_body_bytes + 1 bytes of a body, so the API
  can answer 413 without a large upload ever sitting in memory (twisted.web
  buffers whole bodies and has no limit of its own).
* LimitedChannel caps the request line plus headers at max_header_bytes and
  answers 431 in the API's JSON shape (and JSON 400 for other malformed
  requests) where Twisted answers a bare 400 or drops the connection unanswered.
* LimitedSite serves HTTP/1.1 with those two and closes connections idle for
  its timeout.
* harden() wraps the factory the daemon listens with: at most
  max_connections_per_peer connections per IP address, and every connection
  closed connection_timeout seconds after it was accepted, however busy
  (a slowloris trickle or an endless keep-alive resets the idle timeout).
"""

import collections
import functools
import ipaddress
import json

from twisted.internet import address
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.web import http, server
from zope.interface import implementer

from transferd.interfaces import IReconfigurable

# twisted.web parses every POST's Content-Type with the email package, about
# 44 µs a request, a fifth of the daemon's CPU per submission (see
# docs/benchmarks.md). The values repeat, so a small cache removes the cost.
# The function is private to Twisted, hence the guard.
if hasattr(http, "_parseContentType") and not hasattr(http._parseContentType, "cache_info"):
    http._parseContentType = functools.lru_cache(maxsize=64)(http._parseContentType)


class LimitedRequest(server.Request):
    max_body_bytes = 65536

    def gotLength(self, length):
        # Never let a declared length pick a temporary file or a large buffer.
        super().gotLength(min(length, self.max_body_bytes + 1) if length is not None else None)

    def handleContentChunk(self, data):
        room = self.max_body_bytes + 1 - self.content.tell()
        if room > 0:
            self.content.write(data[:room])


_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large"}


class LimitedChannel(http.HTTPChannel):
    """HTTP/1.1 whose refusals are JSON, with 431 when the request line plus headers are too large.

    LimitedSite sets totalHeadersSize (request line plus headers) and
    MAX_LENGTH (one line) to max_header_bytes, so neither a long line nor many
    lines can be buffered beyond it. The hook and counters used here are
    private to HTTPChannel; tests/test_web.py notices if Twisted renames them.
    """

    def lineLengthExceeded(self, line):
        """One line beyond the limit: LineReceiver would close the connection without a word."""
        self._refuse(431, f"request headers are larger than {self.totalHeadersSize} bytes")

    def _respondToBadRequestAndDisconnect(self):
        """Every malformed request HTTPChannel detects ends here; it would answer a bare 400."""
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse(431, f"request headers are larger than {self.totalHeadersSize} bytes")
        elif self._receivedHeaderCount > self.maxHeaders:
            self._refuse(431, f"request has more than {self.maxHeaders} headers")
        else:
            self._refuse(400, "malformed HTTP request: bad request line, header or body framing")

    def _refuse(self, code, msg):
        body = (json.dumps({"job_id": None, "error": True, "msg": msg}) + "\n").encode("utf-8")
        head = (
            f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            "Cache-Control: no-store\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        self.transport.write(head + body)
        self.loseConnection()


@implementer(IReconfigurable)
class LimitedSite(server.Site):
    """The API's Site: HTTP/1.1 only, bounded bodies and headers, an idle timeout, an optional access log.

    timeout: the idle timeout ([api] idle_timeout), seconds a connection may
    stay silent between requests or within one (not while a request is being
    handled). max_header_bytes bounds the request line plus headers.
    """

    protocol = LimitedChannel

    def __init__(self, resource, max_body_bytes, *, max_header_bytes=16384, timeout=60, access_log=True, **kwargs):
        super().__init__(resource, requestFactory=self._factory(max_body_bytes), timeout=timeout, **kwargs)
        self.max_header_bytes = max_header_bytes
        self.access_log = access_log

    def reconfigure(self, config):
        """New body limits (SIGHUP): the site keeps bodies up to the larger of [api] max_body_bytes and max_batch_bytes."""
        self.requestFactory.max_body_bytes = max(config.api.max_body_bytes, config.api.max_batch_bytes)

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.totalHeadersSize = channel.MAX_LENGTH = self.max_header_bytes
        return channel

    def acceptableProtocols(self):
        """Offer only HTTP/1.1 over TLS ALPN: Site would offer h2 once h2 is installed, LimitedChannel cannot speak it."""
        return [b"http/1.1"]

    def log(self, request):
        """One access line per request, unless [api] access_log is off (the daemon logs each job anyway)."""
        if self.access_log:
            super().log(request)

    @staticmethod
    def _factory(max_body_bytes):
        return type("Request", (LimitedRequest,), {"max_body_bytes": max_body_bytes})


def _peer_ip(addr):
    """The IP address a connection counts against; None (not limited) for unix sockets.

    An IPv4 client of a dual-stack (tcp6:) listener arrives as ::ffff:a.b.c.d
    and counts as a.b.c.d.
    """
    if not isinstance(addr, (address.IPv4Address, address.IPv6Address)):
        return None
    ip = ipaddress.ip_address(addr.host)
    return str(getattr(ip, "ipv4_mapped", None) or ip)


class _HardenedConnection(policies.ProtocolWrapper):
    """One accepted connection, closed connection_timeout seconds after it was accepted, busy or not."""

    def __init__(self, factory, wrapped, peer_ip):
        super().__init__(factory, wrapped)
        self.peer_ip = peer_ip
        self._timer = None

    def connectionMade(self):
        self._timer = self.factory.clock.callLater(self.factory.connection_timeout, self._expire)

    def _expire(self):
        self.factory.log.info(
            "closing a connection from {peer} open for {seconds} s ([api] connection_timeout)",
            peer=self.peer_ip or "a unix socket", seconds=self.factory.connection_timeout,
        )
        self.loseConnection()
        # loseConnection waits until our unsent bytes are gone: a client that stops reading would keep it open.
        self._timer = self.factory.clock.callLater(self.factory.abort_after, self.transport.abortConnection)

    def connectionLost(self, reason):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        super().connectionLost(reason)


def harden(factory, max_connections_per_peer, connection_timeout, clock):
    """The factory to listen with: factory inside a per-peer connection limit and an absolute connection timeout.

    factory is the site, or the TLSMemoryBIOFactory around it: the limits
    rely on nothing but IProtocol and belong outside TLS, where a refused
    connection costs no handshake and a handshake that never ends is timed
    out too. The peer address the site sees is unchanged.
    """
    return HardenedFactory(factory, max_connections_per_peer, connection_timeout, clock)


class HardenedFactory(policies.WrappingFactory):
    """Counts connections per IP address and closes each one connection_timeout seconds after it was accepted.

    A connection beyond max_connections_per_peer is closed at once, unanswered:
    outside TLS an HTTP answer is impossible without the handshake the
    flooding client wants us to spend CPU on, and even in plain HTTP a
    polite 503 would keep the descriptor until the client's request arrived.
    Unix-socket connections have no IP address and are not limited.
    """

    protocol = _HardenedConnection
    noisy = False  # the wrapped site already logs its start and stop
    log = Logger()
    abort_after = 15  # seconds from closing an expired connection to aborting it, as HTTPChannel's abortTimeout

    def __init__(self, wrapped, max_connections_per_peer, connection_timeout, clock):
        super().__init__(wrapped)
        self.max_connections_per_peer = max_connections_per_peer
        self.connection_timeout = connection_timeout
        self.clock = clock
        self.peers = collections.Counter()  # IP address -> open connections
        self._refusing = set()  # peers at the limit whose refusal is logged already

    def buildProtocol(self, addr):
        peer_ip = _peer_ip(addr)
        if peer_ip is not None and self.peers[peer_ip] >= self.max_connections_per_peer:
            if peer_ip not in self._refusing:  # once per episode: a flood must not flood the log too
                self._refusing.add(peer_ip)
                self.log.warn(
                    "refusing connections from {peer}: {limit} open already ([api] max_connections_per_peer)",
                    peer=peer_ip, limit=self.max_connections_per_peer,
                )
            return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else self.protocol(self, wrapped, peer_ip)

    def registerProtocol(self, connection):
        super().registerProtocol(connection)
        if connection.peer_ip is not None:
            self.peers[connection.peer_ip] += 1

    def unregisterProtocol(self, connection):
        super().unregisterProtocol(connection)
        peer_ip = connection.peer_ip
        if peer_ip is not None:
            self.peers[peer_ip] -= 1
            if self.peers[peer_ip] < self.max_connections_per_peer:
                self._refusing.discard(peer_ip)
            if not self.peers[peer_ip]:
                del self.peers[peer_ip]
