"""Migrated stores for contract mixins whose make_store(clock) is async: one on SQLite, one on MariaDB."""

import os

from twisted.internet import reactor

from tests import mysql_support
from transferd.config import parse_database_url
from transferd.store.mysql import MySQLJobStore
from transferd.store.sqlite import SQLiteJobStore


class OnSQLite:
    async def make_store(self, clock):
        path = os.path.abspath(self.mktemp() + ".sqlite")
        store = SQLiteJobStore.from_url(parse_database_url("sqlite:///" + path), reactor, clock)
        await store.migrate()
        return store


class OnMariaDB:
    """A fresh database per test; its URL in self.url."""

    async def make_store(self, clock):
        self.url = mysql_support.fresh_database(self)
        store = MySQLJobStore.from_url(parse_database_url(self.url), reactor, clock)
        await store.migrate()
        return store
