"""Pieces shared by the fake servers: a quiet Site and a connection-tracking factory."""

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from zope.interface import implementer


class QuietSite(server.Site):
    noisy = False

    def log(self, request):
        """Keep test logs quiet: no access log."""


@implementer(IProtocolNegotiationFactory)
class TrackingFactory(WrappingFactory):
    """Knows the open connections, so that stop() can close them all and wait.

    It also answers TLS's ALPN question itself: behind a wrapper, Twisted finds
    no protocols to offer and clients that send ALPN (curl, requests) fail.
    HTTP/1.1 only: no h2 (request.transport is None there).
    """

    def acceptableProtocols(self):
        return [b"http/1.1"]

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.lost = {}  # ProtocolWrapper -> Deferred fired when its connection is lost

    def registerProtocol(self, protocol):
        super().registerProtocol(protocol)
        self.lost[protocol] = defer.Deferred()

    def unregisterProtocol(self, protocol):
        super().unregisterProtocol(protocol)
        lost = self.lost.pop(protocol, None)
        if lost is not None:
            lost.callback(None)

    def close_all(self, port=None):
        """Stop listening on port (if given) and abort every open connection; fires when all are gone."""
        waits = [defer.maybeDeferred(port.stopListening)] if port is not None else []
        for connection, lost in list(self.lost.items()):
            waits.append(lost)
            connection.transport.abortConnection()
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)
