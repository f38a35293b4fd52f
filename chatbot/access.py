"""Who may call the API, and how much: API keys, the owner of each request,
per-key limits, CORS.

Every request goes through `check_request` (a before_request hook), which sets
g.owner: the name of the caller's key, or LOCAL_OWNER when CHATBOT_AUTH is
disabled. Sessions are looked up with that owner (store.get_session), so an
endpoint cannot see another owner's sessions unless it bypasses the store.
Views marked @public (health, the OpenAPI description) need no key.

A key reads `cbk_<key_id>_<secret>`: the key_id finds its row, and only a
salted HMAC-SHA256 of the secret is stored. A key is 256 random bits, so a
fast keyed hash is enough (a slow password hash protects guessable secrets).
"""
import hashlib
import hmac
import logging
import re
import secrets

import click
from flask import current_app, g, request
from flask.cli import with_appcontext

from . import store
from .db import get_db
from .errors import ApiError

LOCAL_OWNER = "local"
KEY_PREFIX = "cbk_"
KEY_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")

log = logging.getLogger(__name__)


def public(view):
    """Mark a view as open to callers without a key."""
    view.public = True
    return view


def current_owner():
    return g.owner


# --- keys ---------------------------------------------------------------

def _digest(salt, secret):
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def create_key(db, name):
    """Make a key for `name` and return it; only its hash is stored."""
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    store.insert_api_key(db, key_id, name, salt, _digest(salt, secret))
    return f"{KEY_PREFIX}{key_id}_{secret}"


_DUMMY_SALT = secrets.token_hex(16)


def key_owner(db, key):
    """The name of the active key `key`, or None."""
    key_id, _, secret = key.removeprefix(KEY_PREFIX).partition("_")
    row = store.find_api_key(db, key_id) if key.startswith(KEY_PREFIX) else None
    # Hash even when no row matched, so that a wrong id costs the same time as a wrong secret.
    digest = _digest(row["salt"] if row else _DUMMY_SALT, secret)
    if row is not None and hmac.compare_digest(digest, row["hash"]):
        return row["name"]
    return None


def unauthorized(detail):
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="chatbot"'})


def authenticate():
    """The owner of this request, from its `Authorization: Bearer` header."""
    if current_app.config["AUTH"] == "disabled":
        return LOCAL_OWNER, None
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    name = key_owner(get_db(), key.strip())
    if name is None:
        raise unauthorized("The API key is not valid (unknown or revoked).")
    return name, name


# --- the hook every request goes through ------------------------------------

def check_request():
    g.key_name = None
    if request.method == "OPTIONS":
        return  # CORS preflights carry no key
    # Routing errors too need a key: an unknown path, a wrong method or a plain
    # GET of the WebSocket says 401 to a caller without one, not what is there.
    view = current_app.view_functions.get(request.endpoint) if request.routing_exception is None else None
    if getattr(view, "public", False):
        return
    g.owner, g.key_name = authenticate()
    limit = per_key_limit("RATE_LIMIT_PER_MINUTE")
    if limit and not is_retry():
        wait = store.take_request(get_db(), g.owner, limit, 60)
        if wait:
            raise rate_limited(limit, wait)


def rate_limited(limit, wait):
    return ApiError(429, "rate_limited", f"More than {limit} requests per minute with this key.",
                    headers={"Retry-After": str(wait)})


def is_retry():
    """A request whose Idempotency-Key is known: a retry is not refused for being one."""
    from .turns import TurnRefused, idempotency_key  # turns uses this module

    try:
        key = idempotency_key(request.headers.get("Idempotency-Key"))
    except TurnRefused:
        return False  # the view says why
    return key is not None and store.idempotent_turn(get_db(), g.owner, key,
                                                     current_app.config["IDEMPOTENCY_TTL"]) is not None


def per_key_limit(setting):
    """A per-key limit, or 0 (none) when keys are off: then every client is the
    one owner 'local', and a shared budget would throttle them all together."""
    return current_app.config[setting] if current_app.config["AUTH"] == "required" else 0


# --- CLI ----------------------------------------------------------------

@click.command("create-api-key")
@click.argument("name")
@click.option("--if-missing", is_flag=True, help="Do nothing when NAME has an active key already.")
@click.option("--replace", is_flag=True, help="Revoke NAME's active key first (its sessions stay NAME's).")
@with_appcontext
def create_api_key_command(name, if_missing, replace):
    """Create an API key for NAME and print it (only this once)."""
    if not KEY_NAME.match(name):
        raise click.BadParameter("use 1-64 letters, digits and . _ @ -", param_hint="NAME")
    db = get_db()
    if replace:
        store.revoke_api_key(db, name)
    elif store.active_api_key_named(db, name) is not None:
        if if_missing:
            click.echo(f"API key {name!r} exists already; it is not shown again "
                       f"(--replace makes a new one).", err=True)
            return
        raise click.ClickException(f"{name!r} has an active key already (revoke it, or use --replace).")
    key = create_key(db, name)
    # The key alone on stdout, so that KEY=$(flask --app chatbot create-api-key NAME) works.
    click.echo(key)
    click.echo(f"Created API key {name!r}. It is shown only this once: keep it.", err=True)


@click.command("revoke-api-key")
@click.argument("name")
@with_appcontext
def revoke_api_key_command(name):
    """Revoke NAME's API key at once (its sessions are kept)."""
    if not store.revoke_api_key(get_db(), name):
        raise click.ClickException(f"No active API key named {name!r}.")
    click.echo(f"Revoked API key {name!r}.")


@click.command("list-api-keys")
@with_appcontext
def list_api_keys_command():
    """List API keys (names and ids, never the keys)."""
    for row in store.list_api_keys(get_db()):
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        click.echo(f"{row['name']}\t{KEY_PREFIX}{row['key_id']}_…\tcreated {row['created_at']}\t{state}")


def init_app(app):
    if app.config["AUTH"] == "disabled":
        log.warning("CHATBOT_AUTH=disabled: NO API KEYS ARE CHECKED. Anyone who can reach this "
                    "service reads and writes every conversation. Use it for local work only.")
    app.before_request(check_request)
    origins = [o.strip() for o in app.config["CORS_ORIGINS"].split(",") if o.strip()]
    if origins:
        from flask_cors import CORS
        CORS(app, resources={r"/api/*": {"origins": origins}},
             allow_headers=["Authorization", "Content-Type"],
             expose_headers=["Retry-After", "WWW-Authenticate"], max_age=600)
    for command in (create_api_key_command, revoke_api_key_command, list_api_keys_command):
        app.cli.add_command(command)
