"""The web gallery and HTTP API: a face over the library's front door (cliptagd.api), as
the command line is.

    app = create_app(config, token=token)   # FastAPI: pages, thumbnails, /api/*, /metrics
    server = WebServer(app, host, port)     # beside the daemon (web.listen): start(), stop()
    serve(config, host, port)               # `cliptagd web`: in the foreground

    auth.py        the token, the cookie it becomes, CSRF, the security headers
    library.py     the database, the writer and the model, opened when first needed;
                   which photos may be served
    params.py      a query string made into a TagQuery (`cliptagd query`'s options)
    routes_api.py  /api/*: JSON rows shaped as `--format json` (records.py), plus ids
    pages.py       the HTML pages (templates/, static/)
    files.py       thumbnails (thumbs.py) and original files, by id
    server.py      uvicorn, in a thread or in the foreground
    app.py         the wiring, and one way to answer failures

Importing it, making the app and serving pages import neither torch nor open_clip: the
model loads (in the background) only for a text search or a photo's scores.
"""

from .app import create_app
from .auth import load_token, login_url
from .server import ListenError, WebServer, serve
from .thumbs import prune

__all__ = ["ListenError", "WebServer", "create_app", "load_token", "login_url", "prune", "serve"]
