"""An in-process transferd built by transferd.wiring (SQLite, memory queue, local stager and mover) for API tests.

The API answers real HTTP on a loopback port, so a test awaits its answers
like a client would; queue.idle() tells when the work its messages caused is done.
"""

import os

import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from transferd.config import load_config
from transferd.wiring import build

SAMPLE = b"sample product bytes\n" * 100


class Harness:
    """Builds the daemon in a temporary directory; call close() in cleanup.

    settings: {(section, key): text} added to the embedded defaults.
    """

    def __init__(self, base, settings=None, clock=None):
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
        values = {
            ("api", "endpoint"): "tcp:0:interface=127.0.0.1",
            ("api", "max_body_bytes"): "16384",
            ("api", "access_log"): "false",
            ("database", "url"): "sqlite:///" + os.path.join(base, "jobs.sqlite"),
            ("queue", "max_deliveries"): "3",
            ("stager", "archive_root"): self.archive,
            ("stager", "staging_root"): self.staging,
            ("transfer", "file_roots"): self.deliveries,
            ("reconciler", "lease"): "5",
        }
        values.update(settings or {})
        self.config = load_config(None, values)
        self.daemon = build(self.config, reactor, clock)
        self.store, self.queue = self.daemon.store, self.daemon.queue
        self.stager, self.mover, self.pipeline = self.daemon.stager, self.daemon.mover, self.daemon.pipeline
        self.queue.retry_delay = 0.01
        self.http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self.url = None

    @defer.inlineCallbacks
    def start(self, consume=True):
        """Start the daemon; without consume, no worker moves jobs on (the API alone)."""
        if not consume:  # and nothing is released to the queues (jobs stay free, as they were committed)
            self.pipeline.disownServiceParent()
            self.daemon.scheduler.disownServiceParent()
        self.daemon.startService()
        yield self.daemon.started
        self.url = f"http://127.0.0.1:{self.daemon.listener.port.getHost().port}"

    @defer.inlineCallbacks
    def close(self):
        yield self.daemon.stopService()

    @defer.inlineCallbacks
    def request(self, method, path, **kwargs):
        """One real HTTP request to the API; fires (response, body bytes)."""
        response = yield self.http.request(method, self.url + path, **kwargs)
        body = yield response.content()
        return response, body

    @property
    def destination(self):
        return "file://" + self.deliveries
