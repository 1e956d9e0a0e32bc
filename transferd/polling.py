"""The timer service backends poll with (the FTS poller, the Tape REST poller).

A Poller runs one cycle at start and then every interval on its clock, one
cycle at a time.  A cycle that fails is logged and the timer goes on (a
failing LoopingCall would stop for good); stopping the service cancels the
cycle in flight, so shutdown never waits on a remote service.

A job is asked about every poll_interval while it is young in its state,
and less often as it ages (Poller.interval): the interval doubles while it
stays under AGE_SHARE of the job's time in the state, up to
max_poll_interval.  A transfer running for an hour is polled every 4
minutes, not every 30 s, and its end is noticed at most a tenth of its
duration late.  Tape archives keep many thousands of recalls and transfers
in flight for hours or days; asking about each every 30 s would cost the
daemon a large share of a core for news that rarely comes.
"""

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

AGE_SHARE = 0.1  # a job's interval stays under this share of its time in the state (beyond poll_interval)


class Poller(TimerService):
    """Asks client about the jobs it takes from store, reporting to outcomes (IOutcomes).

    Subclasses define cycle() (a coroutine), take at most poll_limit jobs a
    batch (more_due: whether to take another) and name what they poll in `service`.
    """

    log = Logger()
    service = "remote service"
    poll_limit = 1000  # jobs a batch takes at most (subclasses set their own)
    hold_share = 0.9  # a job is taken for this share of its interval: the cycle one interval on takes it again

    def __init__(self, client, store, clock, outcomes, poll_interval, max_poll_interval=None):
        """max_poll_interval: the longest interval a job ages to (None: poll_interval, every job every cycle)."""
        super().__init__(poll_interval, self.poll_once)
        self.client = client
        self.store = store
        self.clock = clock
        self.outcomes = outcomes
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval or poll_interval
        self.polls = 0  # cycles ended, for tests and monitoring
        self.draining = False  # a drained daemon polls nothing (transferd.fleet): the others poll its jobs
        self.slots = None  # (first, end): the poll slots of this daemon's share (transferd.fleet); None: all
        self._cycle = None

    async def cycle(self):
        raise NotImplementedError

    def interval(self, age):
        """How often a job `age` seconds in its state is asked about: poll_interval doubled while under
        AGE_SHARE of age, at most max_poll_interval."""
        interval = self.poll_interval
        while interval * 2 <= AGE_SHARE * age:
            interval *= 2
        return min(interval, max(self.poll_interval, self.max_poll_interval))  # never below poll_interval

    def hold(self, age):
        """How long a batch takes a job `age` seconds in its state (store.take_for_polling)."""
        return self.interval(age) * self.hold_share

    def more_due(self, taken, started):
        """Whether a cycle that has just taken `taken` jobs (of at most poll_limit) takes another batch now.

        A full batch means more are due: the cycle goes on, so that every job
        is asked about once per interval however many there are, for at most
        half the interval (the remote service and the database get a rest).
        """
        return taken >= self.poll_limit and not self.draining and self.clock.seconds() - started < self.poll_interval / 2

    def nothing(self):
        """What poll_once fires with when its cycle failed or was cancelled."""
        return None

    def drain(self):
        self.draining = True

    def undrain(self):
        self.draining = False

    def poll_once(self):
        """One cycle; fires with what cycle() returned.  Never fails (timer-safe); none while draining."""
        if self.draining:
            return defer.succeed(self.nothing())
        self._cycle = defer.Deferred.fromCoroutine(self._safely())
        return self._cycle

    async def _safely(self):
        try:
            return await self.cycle()
        except defer.CancelledError:
            return self.nothing()
        except Exception:
            self.log.failure("{service} polling cycle failed; the next one will try again", service=self.service)
            return self.nothing()
        finally:
            self.polls += 1

    def stopService(self):
        if self._cycle is not None:
            self._cycle.cancel()
        return super().stopService()
