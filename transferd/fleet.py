"""The fleet: the daemons sharing one database, each recording a heartbeat, and draining (docs/operations.md).

Every [fleet] heartbeat seconds a daemon upserts its row of the daemons
table (host, pid, version, start time, last beat) and reads back its drain
flag.  The flag is the one way to drain: SIGUSR2 and `transferctl admin
drain` (PUT /api/v1/daemons/{daemon}/drain on any daemon) both set it in the
row, and each daemon follows its own flag on its next beat.  A drained
daemon takes no new work: its queue consumers hand no more messages (those
not yet handled go back to the queue, for the others), its pollers and its
reconciler skip their cycles.  What it holds it finishes; once it holds no
job (its workers' leases, transferd.leases.worker_owner) it can be stopped
without leaving anything to re-drive.  A row silent for [fleet] stale_after
is shown as stale; one silent for FORGET_AFTER is deleted.

Heartbeats also divide the polling (FTS and Tape REST pollers): every job
has a poll slot (crc32 of its id, of schema.POLL_SLOTS), and the live
daemons (beating, not drained), sorted by daemon id, each poll an equal run
of slots by their rank.  A daemon that starts takes its run within a beat;
one that stops cleanly removes its row; one killed is stale after
stale_after, and the others divide its slots among them on their next beat.
Poll leases (poll_owner) still keep two daemons from polling one job at
once while the ranks change.
"""

import dataclasses
import os
import socket
import uuid
from datetime import datetime
from typing import Optional

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

from transferd import __version__, jobs, leases
from transferd.interfaces import StoreUnavailable
from transferd.store.schema import POLL_SLOTS

FORGET_AFTER = 7 * 86400.0  # seconds without a beat after which a daemon's row is deleted


@dataclasses.dataclass(frozen=True)
class DaemonInfo:
    """One row of the daemons table."""

    daemon_id: str
    host: str
    pid: int
    version: str
    time_started: datetime
    drain: bool = False
    time_beat: Optional[datetime] = None


def this_process(clock):
    """The DaemonInfo of this process, with a new daemon id."""
    return DaemonInfo(str(uuid.uuid4()), socket.gethostname(), os.getpid(), __version__,
                      jobs.utc_from_seconds(clock.seconds()))


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def is_stale(row, now, stale_after):
    """A daemon with no beat for longer than stale_after (or none yet)."""
    return row.time_beat is None or now - row.time_beat.timestamp() > stale_after


def poll_shares(rows, now, stale_after):
    """{daemon_id: (rank, of, (first, end))} for the live daemons among rows (beating, not drained)."""
    live = sorted(row.daemon_id for row in rows if not row.drain and not is_stale(row, now, stale_after))
    return {daemon_id: (rank, len(live), (rank * POLL_SLOTS // len(live), (rank + 1) * POLL_SLOTS // len(live)))
            for rank, daemon_id in enumerate(live)}


def _iso(moment):
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


class Fleet(TimerService):
    """This daemon's heartbeat, the drain that follows its flag, and the fleet as the API shows it.

    drainables: the parts that take new work, each with drain() and undrain()
    (the pipeline's consumers, the pollers, the reconciler).
    """

    log = Logger()

    def __init__(self, store, clock, info, heartbeat=5.0, stale_after=30.0, drainables=(), pollers=()):
        super().__init__(heartbeat, self.beat)
        self.clock = clock
        self.store = store
        self.info = info
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.drainables = list(drainables)
        self.pollers = list(pollers)  # each polls the slots of this daemon's share (Poller.slots)
        self.poll_share = None  # (rank, of, (first, end)) once a beat has read the fleet; None: polls every slot
        self.draining = False  # what this daemon does now
        self._requested = None  # a drain flag to write on the next beat (SIGUSR2 while the store was away)
        self._changes = 0  # drains asked here; a beat that read the flag before one of them does not follow it
        self._beating = None
        self._neighbours_checked = False

    @property
    def daemon_id(self):
        return self.info.daemon_id

    # -- the heartbeat --------------------------------------------------------

    def beat(self):
        """One heartbeat: write a requested flag, record the beat, follow the stored flag.  Never fails."""
        if self._beating is None:
            self._beating = defer.Deferred.fromCoroutine(self._beat())
            self._beating.addBoth(self._beaten)
        return self._beating

    def _beaten(self, result):
        self._beating = None
        return result

    async def _beat(self):
        changes = self._changes
        try:
            requested = self._requested
            if requested is not None:
                await self.store.set_drain([self.daemon_id], requested)
                if self._requested == requested:
                    self._requested = None
            flag = await self.store.beat(dataclasses.replace(self.info, drain=self.draining))
        except StoreUnavailable as error:
            self.log.warn("heartbeat not recorded ({error}); trying again in {interval:g}s",
                          error=error, interval=self.heartbeat)
            return
        except Exception:
            self.log.failure("heartbeat not recorded; trying again in {interval:g}s", interval=self.heartbeat)
            return
        if changes == self._changes:  # otherwise the flag was read before a drain asked meanwhile
            self._follow(flag)
        try:
            rows = await self.store.fleet(self.clock.seconds() - FORGET_AFTER)
            if not self._neighbours_checked:
                rows = await self._forget_dead_neighbours(rows)
                self._neighbours_checked = True
        except Exception as error:
            self.log.warn("could not read the fleet to share out the polling ({error}); keeping the share",
                          error=error)
            return
        self._share_polling(poll_shares(rows, self.clock.seconds(), self.stale_after).get(self.daemon_id))

    async def _forget_dead_neighbours(self, rows):
        """At start: rows of daemons on this host whose process is gone (killed, then restarted as this one)
        are removed, so their poll slots are shared out now rather than once they are stale."""
        alive = []
        for row in rows:
            if row.host == self.info.host and row.daemon_id != self.daemon_id and not _process_exists(row.pid):
                self.log.info("daemon {daemon_id} (pid {pid}) on this host is gone: sharing out its polling now",
                              daemon_id=row.daemon_id, pid=row.pid)
                await self.store.forget_daemon(row.daemon_id)
            else:
                alive.append(row)
        return alive

    def _share_polling(self, share):
        """Poll the slots of share (None: not live, drained: the pollers skip their cycles anyway)."""
        if share is None or share == self.poll_share:
            return
        self.poll_share = share
        rank, of, (first, end) = share
        for poller in self.pollers:
            poller.slots = (first, end)
        self.log.info("polling share now slots {first}-{last} of {slots} (rank {rank} of {of} live daemons)",
                      first=first, last=end - 1, slots=POLL_SLOTS, rank=rank + 1, of=of)

    def _follow(self, flag):
        if flag == self.draining or not self.running:
            return
        self.draining = flag
        for part in self.drainables:
            part.drain() if flag else part.undrain()
        if flag:
            self.log.info("draining: taking no new work; finishing the jobs this daemon holds")
        else:
            self.log.info("undrained: taking new work again")

    def request_drain(self, drain=True):
        """Drain (or undrain) this daemon now, and record it in its row (SIGUSR2); fires once it is recorded."""
        self._requested = drain
        self._changes += 1
        self._follow(drain)
        return defer.Deferred.fromCoroutine(self._record())

    async def _record(self):
        if self._beating is not None:
            await self._beating  # it read the flag before the request
        await self.beat()

    def stopService(self):
        """Stop beating; a daemon that stops cleanly removes its row (it holds nothing a beat would vouch for)."""
        stopped = defer.maybeDeferred(super().stopService)

        async def forget():
            if self._beating is not None:
                await self._beating
            try:
                await self.store.forget_daemon(self.daemon_id)
            except Exception as error:
                self.log.warn("could not remove this daemon from the daemons table: {error}", error=error)

        return stopped.addCallback(lambda _: defer.Deferred.fromCoroutine(forget()))

    # -- what operators see ------------------------------------------------------

    async def status(self):
        """The document of GET /api/v1/daemons: every daemon, the jobs each holds, the counts by state."""
        now = self.clock.seconds()
        rows = await self.store.fleet(now - FORGET_AFTER)
        held = await self.store.leases_by_owner(jobs.ACTIVE)
        counts = await self.store.count_by_status()
        by_daemon = {}
        for owner, count in held.items():
            daemon_id = leases.daemon_of(owner)
            if daemon_id is not None:
                by_daemon[daemon_id] = by_daemon.get(daemon_id, 0) + count
        shares = poll_shares(rows, now, self.stale_after)
        return {
            "daemons": [self.view(row, now, by_daemon.get(row.daemon_id, 0), shares.get(row.daemon_id))
                        for row in rows],
            "jobs": {state: counts.get(state, 0) for state in jobs.STATES},
            "stale_after": self.stale_after,
        }

    def view(self, row, now, held, share=None):
        """One daemon as the API shows it; state: running, draining (holds jobs still), drained, or stale.

        poll_share: its rank among the live daemons and the run of poll slots it polls (null when not live)."""
        if is_stale(row, now, self.stale_after):
            state = "stale"
        elif row.drain:
            state = "draining" if held else "drained"
        else:
            state = "running"
        return {
            "daemon_id": row.daemon_id, "host": row.host, "pid": row.pid, "version": row.version,
            "time_started": _iso(row.time_started), "time_beat": _iso(row.time_beat), "drain": row.drain,
            "state": state, "jobs_held": held, "this": row.daemon_id == self.daemon_id,
            "poll_share": ({"rank": share[0] + 1, "of": share[1], "slots": list(share[2])}
                           if share is not None else None),
        }

    async def set_drain(self, name, drain):
        """Set the drain flag of the daemons named (a daemon id, or a host: all its daemons); their views.

        This daemon, when named, follows at once; the others on their next beat.  [] when none is named so.
        """
        now = self.clock.seconds()
        rows = [row for row in await self.store.fleet(now - FORGET_AFTER) if name in (row.daemon_id, row.host)]
        if not rows:
            return []
        await self.store.set_drain([row.daemon_id for row in rows], drain)
        if any(row.daemon_id == self.daemon_id for row in rows):
            self._changes += 1
            self._follow(drain)
        held = await self.store.leases_by_owner(jobs.ACTIVE)
        return [self.view(dataclasses.replace(row, drain=drain), now, held.get(leases.worker_owner(row.daemon_id), 0))
                for row in rows]
