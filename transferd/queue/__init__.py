"""JobQueue implementations, chosen by the [queue] url."""

from urllib.parse import urlsplit

STAGING_QUEUE = "staging"
TRANSFER_QUEUE = "transfer"


def open_queue(url, clock, max_deliveries):
    """Build the JobQueue service for memory:// or amqp://user:password@host:port/vhost."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from transferd.queue.memory import MemoryJobQueue

        return MemoryJobQueue(clock, max_deliveries=max_deliveries)
    if scheme in ("amqp", "amqps"):
        from transferd.queue.amqp import AMQPJobQueue

        return AMQPJobQueue.from_url(url, clock, max_deliveries=max_deliveries)
    raise ValueError(f"unsupported queue url scheme {scheme!r} (use memory:// or amqp://)")
