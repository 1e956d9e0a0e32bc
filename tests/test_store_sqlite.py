import os

from twisted.internet import reactor
from twisted.trial import unittest

from transferd.config import parse_database_url
from transferd.store.sqlite import SQLiteJobStore
from tests.contract_store import JobStoreContract


class SQLiteJobStoreTests(JobStoreContract, unittest.TestCase):
    async def make_store(self, clock):
        path = os.path.join(self.mktemp() + ".sqlite")
        store = SQLiteJobStore.from_url(parse_database_url("sqlite:///" + os.path.abspath(path)), reactor, clock)
        await store.migrate()
        return store
