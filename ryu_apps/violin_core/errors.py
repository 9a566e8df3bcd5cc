"""The one JSON error shape of every violin-snapshot HTTP API (controller, helper, snapshot server).

``{"error": <short name of the status>, "reason": <what went wrong, for a person>}`` plus any
extra keys a caller adds; ``error_body`` builds it and ``reason_of`` reads it back from an answer.
"""

from typing import Any

STATUS_NAMES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 411: "length_required", 413: "too_large",
                422: "unprocessable", 500: "internal", 501: "not_implemented", 502: "failed", 503: "unavailable", 504: "timeout",
                507: "insufficient_storage"}


def error_body(status: int, reason: str, **extra) -> dict:
    return dict({"error": STATUS_NAMES.get(status, "error"), "reason": reason}, **extra)


def reason_of(answer: Any) -> str:
    """The reason in an error answer (or the answer itself, shortened, when it has none)."""
    if isinstance(answer, dict) and isinstance(answer.get("reason"), str):
        return answer["reason"]
    text = answer if isinstance(answer, str) else repr(answer)
    return text[:500]


class Refused(Exception):
    """A request the core refuses: ``status`` is the HTTP status to answer with, ``reason`` why."""

    def __init__(self, status: int, reason: str, **extra):
        super().__init__(reason)
        self.status, self.reason, self.extra = status, reason, extra
