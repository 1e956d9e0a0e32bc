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


@defer.inlineCallbacks
def settled(daemon):
    """Fire once daemon's queue is idle and its scheduler has nothing left to release: the work done.

    Twice in a row: a pass the scheduler ran on its own may have released jobs meanwhile.
    """
    quiet = 0
    while quiet < 2:
        yield daemon.queue.idle()
        released = yield defer.Deferred.fromCoroutine(daemon.scheduler.settle())
        quiet = quiet + 1 if not released else 0
