"""The database: SQLite (a file path) or PostgreSQL (a postgresql:// URL, see pg.py)
behind one connection interface, a connection per request (kept on g), the
schema, init-db and copy-db.

A connection has execute(sql, params) with sqlite3's placeholders (`?`,
`:name`) and rows that read like sqlite3.Row, transaction(), lock(*key) and
close(); driver errors come out as the store's (store/base.py).
"""
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import click
from flask import current_app, g

from . import sqlite
from .migrations import create_or_upgrade
from .store import recover_dead_generations
from .store.base import StoreBusy, StoreError, StoreUnavailable

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = {"sqlite": ROOT / "schema.sql", "postgresql": ROOT / "schema-postgresql.sql"}
BUSY_TIMEOUT_MS = 15000
# The WAL shrinks back to this many bytes once checkpointed (it would otherwise
# stay as large as the largest burst of writes ever made); CHATBOT_WAL_SIZE_LIMIT.
journal_size_limit = 64 * 1024 * 1024


def is_url(database):
    return "://" in str(database)


def check_database(database):
    """Raise ValueError (one clear line) when CHATBOT_DATABASE cannot be used."""
    if is_url(database):
        try:
            from . import pg
        except ImportError:
            raise ValueError("CHATBOT_DATABASE is a URL, but psycopg is not installed "
                             "(pip install -r requirements.txt)") from None
        pg.check_url(str(database))


def connect(database, busy_timeout_ms=BUSY_TIMEOUT_MS):
    """A connection of its own (not pooled): SQLite with the pragmas it leaves
    off by default (they are per connection), or PostgreSQL. busy_timeout_ms:
    how long a statement waits for a lock another connection holds."""
    if is_url(database):
        from . import pg
        return pg.connect(str(database), busy_timeout_ms)
    return sqlite.connect(database, busy_timeout_ms, journal_size_limit)


def _open(config):
    database = config["DATABASE"]
    if is_url(database):
        from . import pg
        return pg.borrow(str(database), config["DB_POOL_SIZE"])
    return sqlite.borrow(database, BUSY_TIMEOUT_MS, journal_size_limit)


@contextmanager
def connection(config):
    """A connection for a moment, outside a request (from this process's pool)."""
    conn = _open(config)
    try:
        yield conn
    finally:
        conn.close()


def get_db():
    if "db" not in g:
        if not current_app.extensions["db_ready"]:
            _init_now(current_app)   # the database was down when the app started
        g.db = _open(current_app.config)
    return g.db


def _init_now(app):
    init_db(app.config["DATABASE"])   # raises StoreUnavailable while it is still down
    app.extensions["db_ready"] = True


def close_db(e=None):
    """Give the request's connection back (at teardown, or before a long wait)."""
    db = g.pop("db", None)
    if db is not None:
        db.close()


def write_surely(config, write, *args, seconds=60):
    """write(conn, *args) on a connection of its own, again while the database is
    busy or unreachable: for a write that must not be lost (a reply's final
    text). The write must be safe to repeat: the connection may break after
    its commit."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with connection(config) as conn:
                return write(conn, *args)
        except (StoreBusy, StoreUnavailable):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def init_db(database):
    """Create missing tables, apply pending migrations, and recover replies
    left pending by a worker process that died."""
    if not is_url(database):
        private_file(database)
    conn = connect(database)
    try:
        create_or_upgrade(conn, SCHEMAS[conn.engine].read_text(encoding="utf-8"))
        recover_dead_generations(conn)
    finally:
        conn.close()


def private_file(path):
    """Make the database's directory (0700) and file (0600) if they are
    missing, whatever the umask: conversations are nobody else's business.
    SQLite gives the -wal and -shm files the database file's permissions."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.fchmod(fd, 0o600)
    os.close(fd)


def shown(database):
    """The database for messages: a URL without its password."""
    if is_url(database):
        from . import pg
        return pg.without_password(str(database))
    return str(database)


@click.command("init-db")
def init_db_command():
    """Create the database tables if they are missing, or upgrade them."""
    init_db(current_app.config["DATABASE"])
    click.echo(f"Initialized the database at {shown(current_app.config['DATABASE'])}.")


@click.command("copy-db")
@click.argument("source")
@click.argument("target")
@click.option("--replace", is_flag=True, help="Delete what the target holds first.")
def copy_db_command(source, target, replace):
    """Copy every session, message and API key from SOURCE to TARGET.

    Each is a SQLite file path or a postgresql:// URL. TARGET's tables are
    made when missing; a TARGET that holds sessions is refused unless
    --replace is given. Run it while no server writes to SOURCE.
    """
    from .copydb import TargetNotEmpty, copy_database
    for database in (source, target):
        try:
            check_database(database)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    try:
        counts = copy_database(source, target, replace=replace, progress=click.echo)
    except TargetNotEmpty as e:
        raise click.ClickException(str(e)) from None
    except StoreError as e:
        raise click.ClickException(f"copy failed, the target is unchanged: {e}") from None
    done = ", ".join(f"{n} {table}" for table, n in counts.items())
    click.echo(f"Copied {done} from {shown(source)} to {shown(target)}.")


def init_app(app):
    """The teardown and the commands; the tables are made or upgraded now
    (idempotent). PostgreSQL down while a worker starts: it serves 503s until
    the database is back, rather than failing to boot."""
    global journal_size_limit
    # Connections are also opened outside requests (the turn monitor, gunicorn's
    # hooks), so this setting is kept where connect() finds it.
    journal_size_limit = app.config["WAL_SIZE_LIMIT"]
    app.extensions["db_ready"] = False
    try:
        _init_now(app)
    except StoreUnavailable as e:
        log.error("database unavailable at start: %s", e)
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
    app.cli.add_command(copy_db_command)
