"""Throw-away MariaDB/MySQL databases for tests, on the server CI provides.

The server is mysql://root@127.0.0.1:3306/ unless TRANSFERD_TEST_MYSQL_URL
names another (a URL without a database).  When it cannot be reached the
tests fail, loudly: CI requires them to run, so they never skip.
"""

import os
import secrets
import time
from urllib.parse import unquote, urlsplit, urlunsplit

import MySQLdb

BASE_URL_VARIABLE = "TRANSFERD_TEST_MYSQL_URL"
DEFAULT_BASE_URL = "mysql://root@127.0.0.1:3306/"
PREFIX = "transferd_test_"


def base_url():
    return os.environ.get(BASE_URL_VARIABLE) or DEFAULT_BASE_URL


def admin_connection(database=None):
    """A plain autocommit MySQLdb connection to the test server, outside any store's pool."""
    parts = urlsplit(base_url())
    try:
        return MySQLdb.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=database or "",
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=5,
        )
    except MySQLdb.OperationalError as error:
        shown = f"{parts.hostname or '127.0.0.1'}:{parts.port or 3306}"
        raise AssertionError(
            f"the MySQL/MariaDB tests need a server at {shown} and could not reach it: {error}. "
            f"Start MariaDB there, or set {BASE_URL_VARIABLE}=mysql://user:password@host:port/ "
            "(these tests fail rather than skip: CI must run them)"
        ) from error


def fresh_database(testcase, charset="utf8mb4"):
    """Create an empty database transferd_test_<hex>, dropped when testcase cleans up; return its URL.

    Call it before opening stores on it, so their cleanups (closing pools)
    run before the drop.
    """
    name = PREFIX + secrets.token_hex(6)
    execute(f"CREATE DATABASE `{name}` CHARACTER SET {charset}")
    testcase.addCleanup(execute, f"DROP DATABASE IF EXISTS `{name}`")
    parts = urlsplit(base_url())
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def database_name(url):
    return unquote(urlsplit(url).path.lstrip("/"))


def execute(statement, args=None, database=None):
    """Run one statement on a fresh admin connection; return its rows."""
    connection = admin_connection(database)
    try:
        cursor = connection.cursor()
        cursor.execute(statement, args)
        return cursor.fetchall()
    finally:
        connection.close()


def kill_connections(ids, timeout=5.0):
    """KILL these server connections and wait until the server has let go of them all."""
    ids = sorted(ids)
    if not ids:
        return
    connection = admin_connection()
    try:
        cursor = connection.cursor()
        for connection_id in ids:
            try:
                cursor.execute("KILL %s", (connection_id,))
            except MySQLdb.OperationalError as error:
                if error.args[0] != 1094:  # unknown thread id: already gone
                    raise
        marks = ", ".join(["%s"] * len(ids))
        deadline = time.monotonic() + timeout
        while True:
            cursor.execute(f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ({marks})", ids)
            if cursor.fetchone()[0] == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"connections {ids} still alive {timeout}s after KILL")
            time.sleep(0.01)
    finally:
        connection.close()
