"""The domain's errors and their one table of HTTP statuses."""

from __future__ import annotations

import inspect

import pytest

import server.errors as errors
from server.api.errors import SERVICE_ERRORS, api_error
from server.errors import ContextTooLong, NoRoom, PatternNotFound, ServiceError


def test_every_domain_error_has_a_status() -> None:
    kinds = [k for _, k in inspect.getmembers(errors, inspect.isclass) if issubclass(k, ServiceError)]
    assert set(kinds) - {ServiceError} <= set(SERVICE_ERRORS), "a domain error without an HTTP status"


@pytest.mark.parametrize(
    ("error", "status", "code", "headers"),
    [
        (ContextTooLong("too long", param="max_tokens"), 400, "context_length_exceeded", {}),
        (PatternNotFound("no such pattern", param="model"), 404, "pattern_not_found", {}),
        (NoRoom("full", retry_after=7), 503, "cache_full", {"Retry-After": "7"}),
    ],
)
def test_a_domain_error_renders_as_its_openai_error(error, status, code, headers) -> None:
    rendered = api_error(error)
    assert (rendered.status, rendered.code, rendered.headers) == (status, code, headers)
    assert rendered.body()["error"]["param"] == error.param
    assert rendered.body()["error"]["message"] == error.message
