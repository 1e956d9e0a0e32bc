"""A service tree that starts its children in order and stops them in reverse.

twisted.application.service.MultiService starts every child at once and
ignores the Deferreds their startService returns, so a listener could open
before the schema is migrated.  OrderedService waits for each child to have
started (its startService Deferred, if any) before starting the next, and
stops them last-started first, waiting for each: nothing closes resources by
hand, and nothing is used after it was closed.
"""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger


class OrderedService(service.MultiService):
    """Children start one after another, in the order they were added, and stop in reverse."""

    log = Logger()

    def __init__(self):
        super().__init__()
        self.started = defer.Deferred()  # fires once every child has started, fails if one could not
        self._started_children = []

    def privilegedStartService(self):
        """Nothing listens before startService: a listener opens in its turn, after what it needs."""

    def startService(self):
        service.Service.startService(self)
        d = defer.Deferred.fromCoroutine(self._start_children())
        d.addCallbacks(self.started.callback, self.started.errback)

    async def _start_children(self):
        for child in list(self):
            if not self.running:
                return
            self._started_children.append(child)  # stopped too if stopping comes while it starts
            await defer.maybeDeferred(child.startService)

    def stopService(self):
        service.Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self):
        while self._started_children:
            child = self._started_children.pop()
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("error while stopping {child}", child=child)
