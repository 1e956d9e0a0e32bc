"""A webhook receiver for tests: real HTTP on loopback, recording every request, failing the first ones.

It does not check signatures (a test does that with its own code, so the
check is independent of transferd's signing): it records the raw body and
the headers of every POST, answers the first `fail_first` attempts of each
webhook-id with `fail_status`, and 200 afterwards.  hold() makes it keep
the next requests unanswered until release(): a daemon killed meanwhile
never learns whether they arrived.
"""

import dataclasses

from twisted.internet import defer
from twisted.web import resource, server


@dataclasses.dataclass(frozen=True)
class Received:
    path: str
    headers: dict  # lower-case names -> the first value
    body: bytes
    answered: int  # the status we answered (0: never answered)


class WebhookReceiver(resource.Resource):
    isLeaf = True

    def __init__(self, fail_first=0, fail_status=503):
        super().__init__()
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.received = []  # Received, in arrival order
        self.attempts = {}  # (path, webhook-id) -> attempts seen: each path is a receiver of its own
        self.arrived = defer.DeferredQueue()  # each Received as it comes
        self._held = None  # a list of (request, Received) while holding

    def hold(self):
        """Leave the requests that arrive from now on unanswered, until release()."""
        self._held = []

    def release(self, status=200):
        held, self._held = self._held or [], None
        for request, _record in held:
            if not request._disconnected:
                request.setResponseCode(status)
                request.finish()

    def render_POST(self, request):
        headers = {name.decode("latin-1").lower(): values[0].decode("latin-1")
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read()
        key = (request.path, headers.get("webhook-id", ""))
        attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        if self._held is not None:
            record = Received(request.path.decode("latin-1"), headers, body, 0)
            self.received.append(record)
            self._held.append((request, record))
            self.arrived.put(record)
            return server.NOT_DONE_YET
        status = self.fail_status if attempt <= self.fail_first else 200
        record = Received(request.path.decode("latin-1"), headers, body, status)
        self.received.append(record)
        self.arrived.put(record)
        request.setResponseCode(status)
        return b""

    def unique(self):
        """The first request of each path and webhook-id: what receivers that de-duplicate keep, in order."""
        seen, kept = set(), []
        for record in self.received:
            key = (record.path, record.headers.get("webhook-id"))
            if key not in seen:
                seen.add(key)
                kept.append(record)
        return kept
