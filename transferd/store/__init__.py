"""JobStore implementations, chosen by the [database] url."""

from urllib.parse import urlsplit


def open_store(url, clock):
    """Build the JobStore for a database URL (sqlite:///path or mysql://...).

    The store is not ready before its migrate() Deferred has fired.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from transferd.store.sqlite import SQLiteJobStore

        return SQLiteJobStore.from_url(url, clock)
    if scheme == "mysql":
        from transferd.store.mysql import MySQLJobStore

        return MySQLJobStore.from_url(url, clock)
    raise ValueError(f"unsupported database url scheme {scheme!r} (use sqlite:// or mysql://)")
