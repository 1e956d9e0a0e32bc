"""A TCP forwarder between transferd and a real server (MariaDB, RabbitMQ), to stage outages of that server.

    proxy = TCPProxy(3306)
    port = await proxy.start()   # 127.0.0.1:port now reaches 127.0.0.1:3306
    proxy.swallow()              # what clients send is dropped: their requests wait for answers that never come
    await proxy.cut()            # every connection closed, new ones refused: the server is gone
    await proxy.start()          # back, on the same port
    await proxy.stop()

The shared servers never notice: only the connections through the proxy are affected.
"""

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols import portforward


class _Server(portforward.ProxyServer):
    def connectionMade(self):
        self.factory.connections[self] = defer.Deferred()
        super().connectionMade()

    def dataReceived(self, data):
        if not self.factory.swallowing:
            super().dataReceived(data)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.connections.pop(self).callback(None)


class _Factory(portforward.ProxyFactory):
    protocol = _Server
    noisy = False

    def __init__(self, port):
        super().__init__("127.0.0.1", port)
        self.connections = {}  # open client connection -> Deferred fired when it is gone
        self.swallowing = False


class TCPProxy:
    def __init__(self, target_port):
        self.factory = _Factory(target_port)
        self.port = 0
        self.listening = None

    async def start(self):
        """Listen (again, on the same port once it has one) and forward; fires with the port."""
        self.factory.swallowing = False
        self.listening = await TCP4ServerEndpoint(reactor, self.port, interface="127.0.0.1").listen(self.factory)
        self.port = self.listening.getHost().port
        return self.port

    def swallow(self):
        self.factory.swallowing = True

    async def cut(self):
        """Stop listening and close every connection, both ways; fires once they are gone."""
        if self.listening is not None:
            listening, self.listening = self.listening, None
            await listening.stopListening()
        gone = list(self.factory.connections.values())
        for connection in list(self.factory.connections):
            connection.transport.abortConnection()
            if connection.peer is not None:
                connection.peer.transport.abortConnection()
        await defer.DeferredList(gone)

    stop = cut
