"""JobStore implementations, chosen by the [database] url."""


def open_store(url, reactor, clock, start_wait=0.0, metrics=None):
    """Build the JobStore for a parsed [database] url (transferd.config.DatabaseURL).

    reactor runs its threads, clock tells the time.  The store is not ready before
    its startService (the migration) has fired; a database server that is not up
    yet is waited for, start_wait seconds at most.  metrics: a transferd.metrics.Metrics counting transitions.
    """
    if url.scheme == "sqlite":
        from transferd.store.sqlite import SQLiteJobStore

        return SQLiteJobStore.from_url(url, reactor, clock, metrics=metrics)
    if url.scheme == "mysql":
        from transferd.store.mysql import MySQLJobStore

        return MySQLJobStore.from_url(url, reactor, clock, start_wait=start_wait, metrics=metrics)
    raise ValueError(f"unsupported database url scheme {url.scheme!r} (use sqlite:// or mysql://)")
