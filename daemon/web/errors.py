"""The web app's named failures: what a route says went wrong, as an HTTP status.

Routes and the library raise these; app.py turns each into a JSON message for the API and
a small page for people, so that every failure reads the same way wherever it comes from.
"""

from __future__ import annotations


class WebError(Exception):
    """A request that cannot be answered as asked; the message says why, in one sentence."""

    status = 500

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds, for a 503 that will pass


class BadRequest(WebError):
    status = 400


class Forbidden(WebError):
    status = 403


class NotFound(WebError):
    status = 404


class Conflict(WebError):
    """The photo is there but cannot do what is asked (no embedding to search from)."""

    status = 409


class Unavailable(WebError):
    """Not now: the model is loading, or the database cannot be opened."""

    status = 503
