"""Spike: when does a StreamServerEndpointService listen under twistd?

twistd (app.startApplication) calls privilegedStartService() on the whole
service tree before startService(); endpoint services listen in the former.
A parent that overrides privilegedStartService with a no-op and starts its
children after an asynchronous set-up (a schema migration) listens only then.
"""

import socket
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.server import Site
from twisted.web.resource import Resource


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class AfterSetup(service.MultiService):
    def privilegedStartService(self):
        pass  # no listening before set-up

    def startService(self):
        service.Service.startService(self)
        self.setup_done = task.deferLater(reactor, 0.2, lambda: None)
        self.setup_done.addCallback(lambda _: [child.startService() for child in self])


def check(parent_class):
    port = free_port()
    parent = parent_class()
    StreamServerEndpointService(TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), Site(Resource())).setServiceParent(parent)
    parent.privilegedStartService()  # what twistd does first
    parent.startService()
    return port, parent


async def main():
    plain_port, plain = check(service.MultiService)
    deferred_port, deferred = check(AfterSetup)
    await task.deferLater(reactor, 0.05, lambda: None)
    early = (listening(plain_port), listening(deferred_port))
    await deferred.setup_done
    await task.deferLater(reactor, 0.05, lambda: None)
    late = listening(deferred_port)
    await plain.stopService()
    await deferred.stopService()
    print(f"plain MultiService listening before set-up: {early[0]}; overridden: {early[1]}; after set-up: {late}")
    return early == (True, False) and late


def run():
    result = []
    d = defer.ensureDeferred(main())
    d.addBoth(result.append).addBoth(lambda _: reactor.stop())
    reactor.callLater(10, reactor.stop)
    reactor.run()
    return 0 if result == [True] else 1


if __name__ == "__main__":
    sys.exit(run())
