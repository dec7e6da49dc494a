"""Exceptions raised by runledger.

Where LangBot's SQL store raises ``ValueError`` (an unknown status, a terminal
run finalized with another status) runledger raises a subclass of both
``ValueError`` and :class:`Error`, with the same message, so a host's
``except ValueError`` keeps working. Where it returns ``None`` (unknown run,
inactive claim) runledger returns ``None`` too. The rest is new: runledger
refuses what the SQL store accepted silently.
"""


class Error(Exception):
    """Base of every runledger error."""


class InvalidInput(Error, ValueError):
    """An argument was refused before anything was written (a bad status,
    id, JSON document, lease...)."""


class NotFound(Error, LookupError):
    """The run or runtime does not exist (for calls where the SQL store had no
    ``None`` answer, such as appending an event to an unknown run)."""


class StaleToken(Error):
    """The claim token no longer holds the run: its lease was lost, or
    another runtime holds it now. Nothing was written."""


class Conflict(Error, ValueError):
    """The write contradicts what is stored: another terminal status, or an
    event with the same sequence and other content."""


class OutOfOrder(Conflict):
    """A runner event whose sequence is at or below the run's last one and is
    not a retry of the event stored there."""


class RunFinished(Error):
    """The run is finished and takes no more runner events (host audit
    events are still accepted)."""


class DeadlinePassed(Error):
    """The run passed its ``deadline_at``; it is now ``timeout``."""


class LimitExceeded(Error):
    """The write would pass a configured limit (events per run); nothing
    was written."""


class QueueFull(Error):
    """A create would take the queue, one of its groups or a workspace past
    its cap of queued runs (``set_queue_limits``); nothing was written. The
    same create succeeds once runs have left the queue."""


class RedisError(Error):
    """Redis refused the call or answered with an error of its own."""


class Unavailable(RedisError, ConnectionError):
    """Redis could not be reached, or is failing over: the same call may
    succeed later (every runledger call is safe to send again)."""


class WriteConcernError(Unavailable):
    """The write landed on the master but fewer replicas than asked for
    acknowledged it in time."""


class ProtocolError(Error):
    """A stored record or reply has a shape runledger does not expect (a key
    edited by hand, or a bug)."""


class Retry(Exception):
    """Raise from a :class:`runledger.Worker` handler to send the run back
    to the queue with a backoff (while attempts remain) instead of failing
    it. Any other exception fails the run for good."""


__all__ = [
    "Error",
    "InvalidInput",
    "NotFound",
    "StaleToken",
    "Conflict",
    "OutOfOrder",
    "RunFinished",
    "DeadlinePassed",
    "LimitExceeded",
    "QueueFull",
    "RedisError",
    "Unavailable",
    "WriteConcernError",
    "ProtocolError",
    "Retry",
]
