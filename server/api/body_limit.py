"""A cap on request bodies, enforced before anything reads them: a body over `--max-request-bytes` gets 413
in OpenAI's error shape. Content-Length is checked up front; a chunked body is counted as it arrives and,
at the first chunk past the cap, answered with the 413 while the app is told the client went away. Neither
kind is ever held in memory beyond the cap."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes)",
        code="request_too_large",
    )


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, too_large(self.max_bytes))
            return
        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    await _send_error(send, too_large(self.max_bytes))
                    return {"type": "http.disconnect"}  # the app stops reading, as if the client had left
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # after the 413, whatever the app answers goes nowhere
                await send(message)

        await self.app(scope, counting_receive, guarded_send)


async def _send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
