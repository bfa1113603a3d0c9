"""The one error type the serving code raises for a request it cannot serve; the API renders it as an
OpenAI error body (`{"error": {"message", "type", "param", "code"}}`) with its HTTP status."""

from __future__ import annotations

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


ECHO_LIMIT = 100
"""The most characters of a client's input an error message quotes (a model name can be megabytes long)."""


def shown(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` as an error message quotes it: repr'd, and cut to `limit` characters with its length said."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ServiceError(Exception):
    """A request the service refuses, in the domain's terms; `server/api/errors.py` maps each kind to its
    HTTP status and OpenAI error code in one table. `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.retry_after = message, param, retry_after


class InvalidRequest(ServiceError):
    """The request itself is wrong (a value out of range, an empty prompt, text that is not text)."""


class ContextTooLong(InvalidRequest):
    """The prompt and the tokens asked for do not fit the model's context."""


class InvalidPattern(InvalidRequest):
    """A pattern sent to the server (an import) that is not a usable pattern."""


class ModelNotFound(ServiceError):
    """A model name this server does not serve."""


class PatternNotFound(ServiceError):
    """A pattern name the store does not hold."""


class PatternDamaged(ServiceError):
    """A stored pattern whose files cannot be read (the store lists it among its problems)."""


class PatternExists(ServiceError):
    """A pattern of that name exists and the request did not ask to replace it."""


class PatternInUse(ServiceError):
    """The configuration relies on the pattern (the fallback, an upstream): it cannot be removed."""


class PatternUnusable(ServiceError):
    """A stored pattern that cannot serve this model (another model's, or a selection the model refuses)."""


class RecordingOff(ServiceError):
    """The fallback record is asked for on a server that records nothing."""


class JobInProgress(ServiceError):
    """A calibration job for the same pattern is queued or running."""


class TooManyJobs(ServiceError):
    """The job queue is full."""


class NoRoom(ServiceError):
    """The experts (or variant) a request needs do not fit the cache budget now, or ever (`permanent`: bigger
    than the whole budget, so waiting cannot help)."""

    def __init__(self, message: str, retry_after: int = 1, permanent: bool = False) -> None:
        super().__init__(message, retry_after=retry_after)
        self.permanent = permanent


class LoadFailed(ServiceError):
    """Loading a pattern's experts or building its variant failed (the next request retries)."""
