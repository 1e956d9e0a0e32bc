"""Spike: StubTreq with a Klein handler that waits on the reactor.

Finding: the response arrives only if the caller keeps calling stub.flush()
until the handler has finished; Deferred.called is True early (the Deferred
is paused on an inner one), so wait with addBoth instead.
"""

import sys

from klein import Klein
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task


class App:
    app = Klein()

    @app.route("/slow")
    async def slow(self, request):
        await task.deferLater(reactor, 0.05, lambda: None)
        return b"done"


async def main():
    stub = StubTreq(App().app.resource())
    response_d = stub.get("http://x/slow")
    outcome = []
    response_d.addBoth(outcome.append)
    flushes = 0
    while not outcome:
        stub.flush()
        flushes += 1
        await task.deferLater(reactor, 0.005, lambda: None)
    body_d = outcome[0].content()
    body = []
    body_d.addBoth(body.append)
    while not body:
        stub.flush()
        await task.deferLater(reactor, 0.005, lambda: None)
    print(f"answer {body[0]!r} after {flushes} flushes")
    return body[0] == b"done"


def run():
    result = []
    d = defer.ensureDeferred(main())
    d.addBoth(result.append).addBoth(lambda _: reactor.stop())
    reactor.callLater(10, reactor.stop)
    reactor.run()
    return 0 if result == [True] else 1


if __name__ == "__main__":
    sys.exit(run())
