from twisted.internet import reactor
from twisted.trial import unittest

from transferd.queue.memory import MemoryJobQueue
from tests.contract_queue import JobQueueContract


class MemoryJobQueueTests(JobQueueContract, unittest.TestCase):
    def make_queue(self, max_deliveries):
        queue = MemoryJobQueue(reactor, max_deliveries=max_deliveries, retry_delay=0.01)
        queue.startService()
        return queue
