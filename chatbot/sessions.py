"""Sessions and their message history."""
from flask import Blueprint

from . import store
from .db import get_db
from .errors import session_not_found
from .models import CreateSession, parse_body

bp = Blueprint("sessions", __name__, url_prefix="/api/sessions")


def session_or_404(session_id):
    session = store.get_session(get_db(), session_id)
    if session is None:
        raise session_not_found(session_id)
    return session


@bp.post("")
def create():
    body = parse_body(CreateSession, optional=True)
    return store.create_session(get_db(), body.metadata), 201


@bp.get("/<session_id>")
def get(session_id):
    return session_or_404(session_id)


@bp.delete("/<session_id>")
def delete(session_id):
    if not store.delete_session(get_db(), session_id):
        raise session_not_found(session_id)
    return "", 204


@bp.get("/<session_id>/messages")
def messages(session_id):
    session_or_404(session_id)
    return {"session_id": session_id, "messages": store.list_messages(get_db(), session_id)}
