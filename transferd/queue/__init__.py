"""JobQueue implementations, chosen by the [queue] url."""

STAGING_QUEUE = "staging"
TRANSFER_QUEUE = "transfer"


def open_queue(url, reactor, clock, max_deliveries, start_wait=None):
    """Build the JobQueue service for a parsed [queue] url (transferd.config.QueueURL).

    The in-process queue runs on clock; RabbitMQ's connections need the reactor.
    start_wait: seconds the broker's startService waits for its first connection
    (then fails); None: it does not wait, and connects in the background.
    """
    if url.scheme == "memory":
        from transferd.queue.memory import MemoryJobQueue

        return MemoryJobQueue(clock, max_deliveries=max_deliveries)
    if url.scheme in ("amqp", "amqps"):
        from transferd.queue.amqp import AMQPJobQueue

        return AMQPJobQueue.from_url(url, reactor, max_deliveries=max_deliveries, start_wait=start_wait)
    raise ValueError(f"unsupported queue url scheme {url.scheme!r} (use memory:// or amqp://)")
