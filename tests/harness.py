"""An in-process transferd (real SQLite store, memory queue, local stager and mover) for handler tests."""

import os

from twisted.internet import defer, reactor
from treq.testing import StubTreq

from transferd.api import TransferAPI
from transferd.movers.local import LocalMover
from transferd.pipeline import Pipeline, Reconciler
from transferd.queue.memory import MemoryJobQueue
from transferd.stagers.local import LocalStager
from transferd.store.sqlite import SQLiteJobStore
from transferd.validation import DestinationRules

SAMPLE = b"sample product bytes\n" * 100


class Harness:
    """Builds the pieces in a temporary directory; call close() in cleanup."""

    def __init__(self, base, max_body_bytes=16384, stager_delay=0.0, timeout=3600.0, access=None, audit=None):
        self.base = base = os.path.abspath(base)
        self.archive = os.path.join(base, "archive")
        self.staging = os.path.join(base, "staging")
        self.deliveries = os.path.join(base, "deliveries")
        for directory in (self.archive, self.staging, self.deliveries):
            os.makedirs(directory, exist_ok=True)
        with open(os.path.join(self.archive, "sample-001"), "wb") as handle:
            handle.write(SAMPLE)
        os.makedirs(os.path.join(self.archive, "sample-dir", "sub"))
        for name, data in (("a.dat", b"A" * 1000), ("sub/b.dat", b"B" * 2000)):
            with open(os.path.join(self.archive, "sample-dir", name), "wb") as handle:
                handle.write(data)
        self.store = SQLiteJobStore.from_url("sqlite:///" + os.path.join(base, "jobs.sqlite"), reactor)
        self.queue = MemoryJobQueue(reactor, max_deliveries=3, retry_delay=0.01)
        self.stager = LocalStager(self.archive, self.staging, delay=stager_delay, timeout=timeout, clock=reactor)
        self.mover = LocalMover(file_roots=(self.deliveries,), clock=reactor)
        self.pipeline = Pipeline(self.store, self.queue, self.stager, self.mover, reactor, lease=5.0)
        self.reconciler = Reconciler(self.store, self.pipeline)
        self.api = TransferAPI(
            self.store, self.pipeline, self.stager, reactor,
            destinations=DestinationRules(("file", "http", "https", "davs"), (self.deliveries,)),
            max_body_bytes=max_body_bytes,
            access=access,
            audit=audit,
        )
        self.client = StubTreq(self.api.resource())

    @defer.inlineCallbacks
    def start(self, consume=True):
        yield self.store.migrate()
        self.queue.startService()
        if consume:
            self.pipeline.startService()

    @defer.inlineCallbacks
    def close(self):
        if self.pipeline.running:
            yield self.pipeline.stopService()
        yield self.queue.stopService()
        yield self.stager.close()
        yield self.mover.close()
        yield self.store.close()

    @property
    def destination(self):
        return "file://" + self.deliveries
