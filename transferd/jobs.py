"""The job model and its state machine.

A job moves SUBMITTED -> STAGING -> STAGED -> TRANSFERRING -> SUCCESS, and may
end in ERROR or CANCELLED from any non-terminal state.  Every state has its own
timestamp column; the column names are the prototype's (docs/architecture.md,
"The jobs table"), so a prototype database upgrades in place.
"""

import dataclasses
import json
import operator
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

SUBMITTED = "SUBMITTED"
STAGING = "STAGING"
STAGED = "STAGED"
TRANSFERRING = "TRANSFERRING"
SUCCESS = "SUCCESS"
ERROR = "ERROR"
CANCELLED = "CANCELLED"

STATES = (SUBMITTED, STAGING, STAGED, TRANSFERRING, SUCCESS, ERROR, CANCELLED)
TERMINAL = frozenset({SUCCESS, ERROR, CANCELLED})
ACTIVE = tuple(s for s in STATES if s not in TERMINAL)

# Legal moves; ERROR and CANCELLED are reachable from every active state.
TRANSITIONS = {
    SUBMITTED: {STAGING},
    STAGING: {STAGED},
    STAGED: {TRANSFERRING},
    TRANSFERRING: {SUCCESS},
}
for _state in ACTIVE:
    TRANSITIONS[_state] |= {ERROR, CANCELLED}

# The timestamp column that records entry into each state.
TIME_COLUMN = {state: "time_" + state.lower() for state in STATES}


class InvalidTransition(ValueError):
    """A state change the state machine does not allow (a programming error)."""


def check_transition(old: str, new: str, fields: dict) -> None:
    """Raise InvalidTransition unless old -> new is legal with these fields."""
    if new not in TRANSITIONS.get(old, ()):
        raise InvalidTransition(f"{old} -> {new} is not a legal job transition")
    if new == ERROR and not fields.get("detailed_status"):
        raise InvalidTransition("a job cannot enter ERROR without detailed_status")


def new_job_id() -> str:
    return str(uuid.uuid4())


def is_job_id(text: str) -> bool:
    """True when text is a job id in canonical form (a UUID, any version, lower case)."""
    try:
        return str(uuid.UUID(text)) == text
    except (ValueError, TypeError, AttributeError):
        return False


def utc_from_seconds(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


@dataclasses.dataclass(frozen=True)
class StagedFile:
    """One file of a staged product.

    path is relative to the directory holding the staged product, so it
    starts with the product's name: "prod" for a single file, "prod/sub/a"
    inside a directory product.  Destinations join it the same way.
    """

    path: str
    size: Optional[int] = None
    checksum: Optional[str] = None  # "adler32:xxxxxxxx"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class StageResult:
    """What a stager reports at the end of staging."""

    success: bool
    msg: str = ""
    staged_to: Optional[str] = None  # host the product was staged to
    path: Optional[str] = None  # where, on that host
    files: tuple = ()  # of StagedFile, when the stager reports them


@dataclasses.dataclass(frozen=True)
class TransferResult:
    """What a mover reports when a transfer it ran in-line has ended."""

    success: bool
    msg: str = ""
    details: Optional[str] = None  # free-form detail kept in fts_details


# Columns the API never shows: the stager's callback code hash and the
# workers' and pollers' lease bookkeeping.
HIDDEN_FIELDS = frozenset({"stager_callback", "lease_owner", "lease_until", "poll_owner", "poll_until", "deliveries",
                           "poll_slot"})
# Columns /transferStatus (the prototype's contract) does not show; the v1 API does.
V1_FIELDS = frozenset({"priority", "label", "metadata", "destination_host", "time_updated", "time_away",
                       "time_copy_freed", "notify_url", "share"})

DEFAULT_PRIORITY = 3  # 1 (lowest) to 5 (highest), as FTS has


@dataclasses.dataclass(frozen=True)
class Job:
    job_id: str
    product_id: str
    destination_path: str
    status: str = SUBMITTED
    detailed_status: Optional[str] = None
    submitter: Optional[str] = None
    fts_jobid: Optional[str] = None
    fts_details: Optional[str] = None
    stager_callback: Optional[str] = None  # SHA-256 hex of the current authcode
    stager_path: Optional[str] = None
    stager_hostname: Optional[str] = None
    stager_status: Optional[str] = None
    staged_files: Optional[str] = None  # JSON list of StagedFile dicts
    stager_request: Optional[str] = None  # the stager's own id for the staging request (Tape REST)
    poll_owner: Optional[str] = None  # which poller polls the job this cycle
    poll_until: Optional[float] = None  # epoch seconds
    stage_attempts: int = 0
    lease_owner: Optional[str] = None
    lease_until: Optional[float] = None  # epoch seconds
    priority: int = DEFAULT_PRIORITY
    label: Optional[str] = None
    metadata: Optional[str] = None  # JSON object given at submission
    destination_host: Optional[str] = None  # the host of destination_path, kept to filter by
    deliveries: int = 0  # workers' leases taken in this state and never given back: crashes (loops end in ERROR)
    time_submitted: Optional[datetime] = None
    time_staging: Optional[datetime] = None
    time_staged: Optional[datetime] = None
    time_transferring: Optional[datetime] = None
    time_success: Optional[datetime] = None
    time_error: Optional[datetime] = None
    time_cancelled: Optional[datetime] = None
    time_updated: Optional[datetime] = None
    time_away: Optional[datetime] = None  # since when the stager or transfer service it waits for is away
    time_copy_freed: Optional[datetime] = None  # when its staged copy was freed: stager_path is no longer shown
    notify_url: Optional[str] = None  # where its state changes are sent as webhooks (transferd.events)
    share: Optional[str] = None  # whose fair share it counts against: its submitter or group (transferd.scheduler)
    poll_slot: int = 0  # which daemon's pollers ask about it (transferd.fleet)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def files(self) -> tuple:
        """The staged files, as StagedFile objects (empty when not recorded)."""
        if not self.staged_files:
            return ()
        return tuple(StagedFile(**entry) for entry in json.loads(self.staged_files))

    def public_view(self, v1=False) -> dict[str, Any]:
        """The job as /transferStatus shows it (v1: as the v1 API does): every non-null field but the hidden ones."""
        names, values = (V1_VIEW, _V1_VALUES) if v1 else (VIEW, _VALUES)
        view = {}
        # One attrgetter call and set lookups: the v1 API streams views by the hundred thousand.
        for name, value in zip(names, values(self)):
            if value is None:
                continue
            if name in TIME_FIELDS:
                value = value.isoformat().replace("+00:00", "Z")  # stored and read as UTC
            elif name in JSON_FIELDS:
                value = json.loads(value)
            view[name] = value
        if self.time_copy_freed is not None:
            view.pop("stager_path", None)  # the copy is gone: the path would point at nothing
        return view


COLUMNS = tuple(field.name for field in dataclasses.fields(Job))
TIME_FIELDS = frozenset(field.name for field in dataclasses.fields(Job) if field.type == Optional[datetime])
JSON_FIELDS = frozenset({"staged_files", "metadata"})  # kept as JSON text, shown as JSON
# The fields public_view shows, in order: /transferStatus's, and the v1 API's.
V1_VIEW = tuple(name for name in COLUMNS if name not in HIDDEN_FIELDS)
VIEW = tuple(name for name in V1_VIEW if name not in V1_FIELDS)
_V1_VALUES, _VALUES = operator.attrgetter(*V1_VIEW), operator.attrgetter(*VIEW)


@dataclasses.dataclass(frozen=True)
class JobFilter:
    """Which jobs a v1 listing or bulk cancel means: each field that is set narrows it (times exclusive)."""

    statuses: tuple = ()
    product_id: Optional[str] = None
    label: Optional[str] = None
    destination_host: Optional[str] = None
    submitter: Optional[str] = None
    submitted_after: Optional[datetime] = None
    submitted_before: Optional[datetime] = None
    updated_after: Optional[datetime] = None
    job_ids: tuple = ()


@dataclasses.dataclass(frozen=True)
class Submission:
    """A batch sent with a client-chosen submission_id, and the answer it got: sending it again gets that answer."""

    submitter: Optional[str]
    submission_id: str
    answer: dict
