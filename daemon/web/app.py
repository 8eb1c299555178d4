"""The web app, wired: the routers, the guard, the templates, and one way to fail.

`create_app` builds a FastAPI app over one config. Nothing is opened here (see library.py),
so making the app is instant and imports neither torch nor open_clip. Failures are named
(errors.py) and answered in one place: JSON `{"detail": ...}` under /api/ and /metrics, a
small page elsewhere. A malformed id in a path is a 404 like an unknown one (a crafted URL
learns nothing), a malformed query parameter a 400 that names it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from ..config import Config
from ..decode import register_plugins
from ..store import StoreError
from . import files, pages, routes_api
from .auth import Guard, derived, is_machine_path
from .errors import BadRequest, NotFound, Unavailable, WebError
from .library import Library

if TYPE_CHECKING:
    from ..metrics import Runtime

log = logging.getLogger(__name__)

HERE = Path(__file__).parent


class _App(FastAPI):
    """FastAPI with the guard outside everything, even the handler of unexpected errors,
    so that a 500 carries the security headers too."""

    def __init__(self, *, token: str, **options: Any) -> None:
        if not token:
            raise ValueError("the web app needs a token")  # an empty one would let all in
        self.token = token  # before FastAPI may build the middleware stack
        super().__init__(**options)

    def build_middleware_stack(self) -> ASGIApp:
        return Guard(super().build_middleware_stack(), self.token)


def create_app(config: Config, *, token: str, runtime: Runtime | None = None) -> FastAPI:
    """The gallery and HTTP API over `config`'s database; every request needs `token`.
    `runtime`: the daemon's live state for /metrics (None under `cliptagd web`)."""
    register_plugins()  # thumbnails of HEIC and JPEG XL photos, as the worker reads them
    library = Library(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        library.close()

    app = _App(
        token=token,
        title="cliptagd",
        summary="The tags of your photos: the HTTP API of cliptagd's web gallery.",
        # The interactive docs load scripts from a CDN, which the CSP forbids;
        # /openapi.json stays (behind the token) for tools.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.library = library
    app.state.runtime = runtime
    app.state.csrf = derived(token, "csrf")
    app.state.templates = Jinja2Templates(env=_environment())
    app.include_router(pages.router)
    app.include_router(files.router)
    app.include_router(routes_api.router)
    app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)
    # Files by name only: StaticFiles lists no folder (html=False answers 404 for one).
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(WebError, _web_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(StoreError, _store_error)
    return app


def _environment() -> jinja2.Environment:
    # Autoescape everywhere: file names and labels are the users', and may hold markup.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _metrics(request: Request) -> Response:
    """Prometheus metrics: the database's counts, and the daemon's own when it runs."""
    from ..metrics import render

    library: Library = request.app.state.library
    body, content_type = render(library.reader, request.app.state.runtime)
    return Response(body, media_type=content_type)


# -- failures, answered one way ----------------------------------------------------------------


async def _web_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WebError)
    if is_machine_path(request.url.path):
        headers = {"retry-after": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)
    return pages.error_page(request, exc)


async def _invalid(request: Request, exc: Exception) -> Response:
    """A path parameter that is not an id: 404, as an unknown id; else 400 naming what."""
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = list(exc.errors())
    if any(error.get("loc", ("",))[0] == "path" for error in errors):
        return await _web_error(request, NotFound("No such photo"))
    return await _web_error(request, BadRequest(_describe(errors)))


def _describe(errors: list[dict[str, Any]]) -> str:
    """Pydantic's errors as one sentence: "limit: Input should be greater than 0"."""
    parts = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part not in ("query", "body")]
        parts.append(f"{'.'.join(loc) or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own (no such route, method not allowed), in our shape."""
    assert isinstance(exc, HTTPException)
    error = WebError(exc.detail if isinstance(exc.detail, str) else "Not possible")
    error.status = exc.status_code
    response = await _web_error(request, error)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _store_error(request: Request, exc: Exception) -> Response:
    log.error("The web app could not use the database: %s", exc)
    return await _web_error(request, Unavailable(f"The tag database: {exc}"))
