"""The chat page at `/`: static HTML, CSS and JavaScript from chatbot/static/.

The page is a client of the public API like any other (it sends the API key
the person pastes), so serving it needs no key. Off with CHATBOT_WEB_UI=false:
the blueprint is then not registered and `/` is an unknown path.
"""
from pathlib import Path

from flask import Blueprint, send_from_directory

from .access import public

STATIC = Path(__file__).parent / "static"

# No inline script or style, no eval, nothing from another host: a message that
# slips past the page's text-only rendering still cannot run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

bp = Blueprint("web", __name__)


@bp.get("/")
@public
def index():
    return send_from_directory(STATIC, "index.html")


@bp.get("/static/<path:filename>")
@public
def static_file(filename):
    return send_from_directory(STATIC, filename)   # refuses paths that leave STATIC (404)


@bp.after_request
def security_headers(response):
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
