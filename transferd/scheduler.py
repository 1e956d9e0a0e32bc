"""Fair share and limits: which waiting jobs go to the queues next (docs/architecture.md, "Scheduling").

The database decides and the queue only wakes.  A new job waits in
SUBMITTED, a staged one in STAGED, free (no lease); a scheduler pass picks
the next ones, puts them under a queue hold (so they are *released*) and
publishes their ids, and a worker takes them from there as before.

A pass, for one step (staging or transfer), in one transaction of the store
(IJobStore.schedule), which the passes of every daemon sharing the database
run one at a time:
  * counts, per share, the jobs waiting, released and running (STAGING for
    the staging step, TRANSFERRING for the transfer step), and per
    destination host when a host limit is set;
  * works out how many jobs the step may release now: at most
    [scheduler] queued_ahead released and not yet taken by a worker, and
    within [limits] max_staging;
  * shares them out by water-filling: each slot goes to the share with the
    fewest jobs released or running per unit of weight, among those with
    jobs waiting and below [limits] max_transfers_per_submitter;
  * takes each share's jobs by priority (5 first), then age, skipping
    destination hosts at their limit; and releases them.

A share is a submitter, or the group [scheduler] groups puts a submitter in
(by identity, or by VOMS FQAN as [auth] admins does); its weight comes from
[scheduler] weights.  Passes run when jobs arrive or leave a step (every
commit that writes an event wakes the scheduler, but for arrivals while no
staging slot is free; at most a round of passes every PASS_GAP, or every
time the last round took when that is longer) and every [scheduler]
interval, for what other daemons changed.
"""

import dataclasses
import functools
import heapq
from typing import Optional

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from transferd import jobs, leases
from transferd.auth.access import matches
from transferd.interfaces import IReconfigurable, StoreUnavailable
from transferd.queue import STAGING_QUEUE, TRANSFER_QUEUE

ANONYMOUS = "anonymous"  # the share of jobs submitted without an identity (no authentication configured)
# Seconds between the end of a pass and the next one a wake-up starts: the jobs that arrive or move meanwhile
# share one pass (a few statements) instead of each causing their own.
PASS_GAP = 0.02
# Seconds at most between folds of the kept job counts' changes (store.fold_job_counts) of their own: a pass
# that counts folds them in its own transaction, so this fold only keeps them few while nothing waits.
FOLD_EVERY = 1.0


@dataclasses.dataclass(frozen=True)
class Step:
    """One scheduling step: jobs waiting in `waiting` go to `queue`; those in `running` hold its slots."""

    name: str
    waiting: str
    running: tuple
    queue: str


STAGING = Step("staging", jobs.SUBMITTED, (jobs.STAGING,), STAGING_QUEUE)
TRANSFER = Step("transfer", jobs.STAGED, (jobs.TRANSFERRING,), TRANSFER_QUEUE)
STEPS = (STAGING, TRANSFER)
STEP_OF = {step.waiting: step for step in STEPS}


@dataclasses.dataclass(frozen=True)
class Limits:
    """[limits]: None is unlimited."""

    max_staging: Optional[int] = None  # staging requests at the stager at once, fleet-wide
    max_transfers_per_host: Optional[int] = None  # transfers to one destination host at once
    host_limits: tuple = ()  # (host, limit): a host's own limit instead of max_transfers_per_host
    max_transfers_per_submitter: Optional[int] = None  # transfers of one submitter (or group) at once
    max_waiting_per_submitter: Optional[int] = None  # jobs of one submitter (or group) in SUBMITTED; more: 429
    retry_after: float = 60.0  # what a 429 for max_waiting_per_submitter tells the client to wait

    def host_limit(self, host):
        return dict(self.host_limits).get(host, self.max_transfers_per_host)

    @property
    def hosts_limited(self):
        return self.max_transfers_per_host is not None or bool(self.host_limits)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Who shares with whom, with what weight, within which limits."""

    groups: tuple = ()  # (group name, identity or FQAN), in the configured order: the first match wins
    weights: tuple = ()  # (weight, share name)
    default_weight: float = 1.0
    limits: Limits = Limits()
    queued_ahead: int = 64  # per step: jobs released and not yet taken by a worker, fleet-wide

    def share_of(self, identity):
        """The share a submitter's jobs count against: its first group, else its identity."""
        if identity is None:
            return ANONYMOUS
        for group, member in self.groups:
            if matches(identity, frozenset([member])):
                return group
        return identity.name

    def weight(self, share):
        return dict((name, weight) for weight, name in self.weights).get(share, self.default_weight)


class TooManyWaiting(Exception):
    """A submission would put more jobs of one share in SUBMITTED than [limits] max_waiting_per_submitter allows."""

    def __init__(self, share, waiting, limit, retry_after):
        super().__init__(f"too many jobs waiting: {share} has {waiting} job(s) waiting to be staged and may have at"
                         f" most {limit}; submit again once some have started (try again in {retry_after:g} s)")
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a pass sees of one step, per share (and per destination host for the transfer step)."""

    waiting: dict  # share -> jobs free to release
    released: dict  # share -> jobs released (under a queue hold or a worker's lease, or waiting for a service)
    running: dict  # share -> jobs in the step's running states
    hosts: dict = dataclasses.field(default_factory=dict)  # destination host -> jobs released or running


def allocate(free, counts, weight, cap=None):
    """Share out `free` slots: {share: count}, by water-filling on (released + running) / weight.

    Each slot goes to the share with the lowest occupancy per unit of weight
    (ties by name, so every daemon decides alike) that still has jobs
    waiting and is under cap (a share's most released + running, or None).
    """
    heap = []
    for share, waiting in counts.waiting.items():
        if waiting <= 0:
            continue
        held = counts.released.get(share, 0) + counts.running.get(share, 0)
        if cap is not None and held >= cap:
            continue
        heapq.heappush(heap, (held / weight(share), share, held))
    given = {}
    while free > 0 and heap:
        _, share, held = heapq.heappop(heap)
        given[share] = given.get(share, 0) + 1
        free -= 1
        held += 1
        if given[share] < counts.waiting[share] and (cap is None or held < cap):
            heapq.heappush(heap, (held / weight(share), share, held))
    return given


def plan(step, policy, counts):
    """(slots per share, room per destination host or None): what a pass of step releases, from its counts."""
    limits = policy.limits
    released = sum(counts.released.values())
    free = policy.queued_ahead - released
    if step is STAGING and limits.max_staging is not None:
        free = min(free, limits.max_staging - released - sum(counts.running.values()))
    cap = limits.max_transfers_per_submitter if step is TRANSFER else None
    room = None
    if step is TRANSFER and limits.hosts_limited:
        room = {}
        for host, held in counts.hosts.items():
            limit = limits.host_limit(host)
            if limit is not None:
                room[host] = max(0, limit - held)
    return allocate(max(0, free), counts, policy.weight, cap), room


def counts_hosts(step, limits):
    """Whether a pass of step counts per destination host: the transfer step, with a host limit set."""
    return step is TRANSFER and limits.hosts_limited


def room_for(room, host, limits):
    """Whether one more job to host fits (room: from plan); if it does, it takes its room."""
    if room is None:
        return True
    if host not in room:
        limit = limits.host_limit(host)
        if limit is None:
            return True
        room[host] = limit
    if room[host] <= 0:
        return False
    room[host] -= 1
    return True


@implementer(IReconfigurable)
class Scheduler(Service):
    """Runs passes: on wake(), coalesced, and every interval.  Publishes what each pass released."""

    log = Logger()

    def __init__(self, store, pipeline, reactor, clock, interval=1.0, daemon_id=None):
        self.store = store
        self.pipeline = pipeline  # its policy is the one in force: submissions and passes read it there
        self.reactor = reactor  # wake-ups run on its next turn: "soon", not a time
        self.clock = clock  # the interval
        self.interval = interval
        self.daemon_id = daemon_id
        self.draining = False  # a drained daemon releases nothing (transferd.fleet); the others do
        self.passes = 0  # passes run, for tests and monitoring
        self._wanted = False  # a wake-up came while a round ran: run another, PASS_GAP after it
        self._last_pass = 0.0  # when the last round ended (reactor time)
        self._round_took = 0.0  # seconds the last round took: the gap before the next is at least that
        # The last staging pass released nothing although jobs waited: no slot was free, and a job that only
        # arrives frees none, so arrivals do not wake the scheduler (_committed).
        self._staging_blocked = False
        self._store_away = False  # the last pass found the store away (logged once)
        self._folded_at = float("-inf")  # when the last fold of its own ran (reactor time)
        self._running = None
        self._soon = None
        self._timer = task.LoopingCall(self.wake)
        self._timer.clock = clock

    # -- service -------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.store.listen_for_events(self._committed)  # every commit that writes an event: jobs arrived or moved
        self._timer.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._timer.running:
            self._timer.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        return self._running if self._running is not None else defer.succeed(None)

    def drain(self):
        self.draining = True

    def undrain(self):
        self.draining = False
        self.wake()

    def reconfigure(self, config):
        """[scheduler] groups and weights and [limits] take effect with the next pass."""
        self.pipeline.policy = policy_from_config(config)

    @property
    def policy(self):
        return self.pipeline.policy

    # -- passes ---------------------------------------------------------------------------

    def _committed(self, moved):
        """Jobs changed state (moved), and a pass may find a slot free, or only arrived: those wake the
        scheduler unless the staging step is blocked, when the next move (or the interval) runs the pass
        that releases them.  Under a stream of submissions to a full step, waking on each ran futile
        passes 50 times a second (docs/benchmarks.md, "Flat costs at a million jobs")."""
        if moved or not self._staging_blocked:
            self.wake()

    def wake(self):
        """Run a pass soon: the wake-ups of PASS_GAP after the last pass, or during a pass, share one."""
        if not self.running or self.draining:
            return
        if self._running is not None:
            self._wanted = True
        elif self._soon is None or not self._soon.active():
            # Rounds that take long (many jobs to count) come as far apart as they take: at most half
            # of the time goes to passes, however busy the daemon.
            gap = max(PASS_GAP, self._round_took)
            delay = max(0.0, self._last_pass + gap - self.reactor.seconds())
            self._soon = self.reactor.callLater(delay, self._start)

    def _start(self):
        started = self.reactor.seconds()
        self._running = defer.Deferred.fromCoroutine(self._passes())
        self._running.addBoth(self._ended, started)

    def _ended(self, _, started):
        self._running = None
        self._last_pass = self.reactor.seconds()
        self._round_took = self._last_pass - started
        if self._wanted:  # woken during the last round: once the gap has passed
            self._wanted = False
            self.wake()

    async def _passes(self):
        """One round: the job counts' changes folded in (at most every FOLD_EVERY; passes that count fold them
        too), then a pass of each step."""
        if self.running and not self.draining:
            for work in (self._fold, *(functools.partial(self.run_pass, step) for step in STEPS)):
                try:
                    await work()
                except StoreUnavailable as error:
                    if not self._store_away:  # once per outage: the passes go on every interval meanwhile
                        self.log.warn("scheduling passes not run while the job store is away ({error});"
                                      " trying every {interval:g}s", error=error, interval=self.interval)
                    self._store_away = True
                    return
                except Exception:
                    self.log.failure("scheduling pass failed; the next one will try again")
                    return
                if self._store_away:
                    self._store_away = False
                    self.log.info("scheduling passes run again: the job store is back")

    async def _fold(self):
        now = self.reactor.seconds()
        if now - self._folded_at < FOLD_EVERY:
            return
        self._folded_at = now
        if await self.store.fold_job_counts() >= self.store.fold_batch:
            self._wanted = True  # more changes than one fold takes: the next round comes after the gap

    async def settle(self):
        """Wait for the pass in progress, then run passes until none releases a job; fire with how many were
        released (tests: with queue.idle(), it says when the work the jobs in the store can cause is done)."""
        released = 0
        while True:
            if self._running is not None:
                await self._running
            count = 0
            for step in STEPS:
                count += await self.run_pass(step)
            released += count
            if not count:
                return released

    async def run_pass(self, step):
        """One pass of step: release jobs and publish them; fire with how many were released."""
        policy = self.policy
        waiting = []

        def planned(counts):
            waiting.append(sum(counts.waiting.values()))
            return plan(step, policy, counts)

        released = await self.store.schedule(
            step, planned, lambda room, host: room_for(room, host, policy.limits),
            leases.in_queue(self.pipeline.lease), self.daemon_id, hosts=counts_hosts(step, policy.limits))
        if step is STAGING:
            self._staging_blocked = bool(sum(waiting)) and not released
        self.passes += 1
        if released:
            await self.pipeline.publish_released(step.queue, step.waiting, released)
        return len(released)

    # -- why a job waits (the v1 API's waiting_for) -----------------------------------------------

    async def why_waiting(self, job):
        """({"reason", "message"}, jobs ahead of it in its share) for a job free to release; None if it is not one."""
        step = STEP_OF.get(job.status)
        if step is None or job.lease_until is not None:
            return None
        policy, limits = self.policy, self.policy.limits
        counts = await self.store.scheduling_counts(step, hosts=counts_hosts(step, limits))
        share = job.share or ANONYMOUS
        ahead = await self.store.ahead_in_share(job)
        held = counts.released.get(share, 0) + counts.running.get(share, 0)
        if step is STAGING and limits.max_staging is not None:
            busy = sum(counts.released.values()) + sum(counts.running.values())
            if busy >= limits.max_staging:
                return _why("limit_staging", f"waiting for a staging slot: the stager takes at most"
                                             f" {limits.max_staging} staging requests at once ([limits] max_staging),"
                                             f" and {busy} are in progress; {ahead} job(s) of {share} are ahead of"
                                             f" it"), ahead
        if step is TRANSFER:
            limit = limits.host_limit(job.destination_host)
            busy = counts.hosts.get(job.destination_host, 0)
            if limit is not None and busy >= limit:
                return _why("limit_destination_host", f"waiting for a transfer slot to {job.destination_host}: at"
                                                      f" most {limit} transfers to it at once ([limits]), and {busy}"
                                                      f" are in progress"), ahead
            cap = limits.max_transfers_per_submitter
            if cap is not None and held >= cap:
                return _why("limit_submitter", f"waiting for a transfer slot: {share} may have at most {cap} transfers"
                                           f" at once ([limits] max_transfers_per_submitter), and has {held}"), ahead
        what = "staging" if step is STAGING else "transfer"
        return _why("fair_share", f"queued for {what}: {ahead} job(s) of {share} ahead of it; {share} (weight"
                                  f" {policy.weight(share):g}) has {held} job(s) in {what} now, and slots go to the"
                                  f" share with the fewest per unit of weight"), ahead


def _why(reason, message):
    return {"reason": reason, "message": message}


def policy_from_config(config):
    """The Policy of [scheduler] and [limits]."""
    section, limits = config.scheduler, config.limits
    return Policy(
        groups=section.groups, weights=section.weights, default_weight=section.default_weight,
        queued_ahead=section.queued_ahead,
        limits=Limits(
            max_staging=limits.max_staging, max_transfers_per_host=limits.max_transfers_per_host,
            host_limits=limits.host_limits, max_transfers_per_submitter=limits.max_transfers_per_submitter,
            max_waiting_per_submitter=limits.max_waiting_per_submitter, retry_after=limits.retry_after,
        ),
    )
