"""Shared test helpers."""

import os

from twisted.internet import defer, reactor, task

IN_CI = os.environ.get("CI") == "true"


@defer.inlineCallbacks
def wait_for(predicate, timeout=10.0, interval=0.02):
    """Poll predicate() (may return a Deferred) on the real reactor until truthy."""
    deadline = reactor.seconds() + timeout
    while True:
        value = yield defer.maybeDeferred(predicate)
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        yield task.deferLater(reactor, interval, lambda: None)
