"""What an engine replica answers to a runtime adapter load or unload, and the one answer the
caller gets from all of them. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OK = 200
NOT_FOUND = 404
UNAVAILABLE = 503
NO_REPLICA = "No engine replica is running; retry once one is."


@dataclass(frozen=True)
class AdapterOutcome:
    """vLLM's answer on one replica: 200 and its success text, or its error's status and message."""

    status: int
    message: str
    err_type: str = ""
    param: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def replica_failure(exc: BaseException) -> AdapterOutcome:
    """A replica that could not answer (it died, or is being replaced)."""
    return AdapterOutcome(UNAVAILABLE, f"an engine replica did not answer: {type(exc).__name__}: {exc}",
                          "ServiceUnavailableError")


def merged_load(outcomes: Sequence[AdapterOutcome | BaseException]) -> AdapterOutcome:
    """A load succeeds when every running replica loaded the adapter; else the first failure,
    saying on how many replicas (the caller then undoes it where it succeeded)."""
    answers = [o if isinstance(o, AdapterOutcome) else replica_failure(o) for o in outcomes]
    if not answers:
        return AdapterOutcome(UNAVAILABLE, NO_REPLICA, "ServiceUnavailableError")
    failed = [a for a in answers if not a.ok]
    if not failed:
        return answers[0]
    first = failed[0]
    if len(answers) == 1:
        return first
    return AdapterOutcome(first.status, f"{first.message} (failed on {len(failed)} of {len(answers)} engine "
                          "replicas; the adapter is not loaded)", first.err_type, first.param)


def merged_unload(outcomes: Sequence[AdapterOutcome | BaseException]) -> AdapterOutcome:
    """An unload succeeds when some replica unloaded the adapter and none failed otherwise than
    by not having it (a replica started since the load only loads it when a request names it)."""
    answers = [o if isinstance(o, AdapterOutcome) else replica_failure(o) for o in outcomes]
    if not answers:
        return AdapterOutcome(UNAVAILABLE, NO_REPLICA, "ServiceUnavailableError")
    unloaded = [a for a in answers if a.ok]
    errors = [a for a in answers if not a.ok and a.status != NOT_FOUND]
    if errors:
        return errors[0]
    return unloaded[0] if unloaded else answers[0]
