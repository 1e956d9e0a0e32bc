"""Who may act on a job now, and until when (docs/architecture.md, "Leases").

Each job row holds one lease, lease_owner and lease_until (epoch seconds):
  * a worker's lease: owner = the worker; only it acts on the job, renewing the lease as it works;
  * a queue hold: owner = IN_QUEUE; a message is on its way, whoever receives it takes the lease;
  * a wait: no owner, a deadline; an outside party (stager, FTS) has the job until then;
  * free: no deadline, or a passed one; the reconciler re-drives the job.
A Hold says which of these a store operation leaves behind; None leaves the job free.
jobs.deliveries counts workers' leases never given back (crashes): at max_deliveries, ERROR.
Pollers lease separately (poll_owner, poll_until): which poller asks about the job this cycle.
"""

import dataclasses
from typing import Optional

# The owner of a queue hold.  Not a worker id, and not spelled like a job state.
IN_QUEUE = "<in queue>"


@dataclasses.dataclass(frozen=True)
class Hold:
    """A lease to leave on a job: owner (None for a wait) for seconds from now."""

    owner: Optional[str]
    seconds: float


def worker(owner, seconds):
    """The job is being worked on by owner (a worker id)."""
    return Hold(owner, seconds)


def in_queue(seconds):
    """A queue message for the job is on its way."""
    return Hold(IN_QUEUE, seconds)


def waiting(seconds):
    """The job waits for an outside party; nobody re-drives it before the deadline."""
    return Hold(None, seconds)


def is_worker(owner):
    """True for a worker's lease, not a queue hold or a wait: the job's deliveries count these."""
    return owner is not None and owner != IN_QUEUE


def worker_owner(daemon_id):
    """The lease owner of a daemon's workers: it names the daemon (transferd.fleet), so that an operator
    sees which daemon holds which jobs."""
    return f"worker-{daemon_id}"


def daemon_of(owner):
    """The daemon id in a worker's lease owner, or None for any other owner."""
    if owner and owner.startswith("worker-"):
        return owner[len("worker-"):]
    return None
