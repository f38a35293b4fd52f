"""SQLite: one connection per request (kept on g), the schema, init-db."""
import os
import sqlite3

import click
from flask import current_app, g

from .migrations import migrate
from .store import recover_dead_generations

BUSY_TIMEOUT_MS = 15000
# The WAL shrinks back to this many bytes once checkpointed (it would otherwise
# stay as large as the largest burst of writes ever made); CHATBOT_WAL_SIZE_LIMIT.
journal_size_limit = 64 * 1024 * 1024


def connect(path, busy_timeout_ms=BUSY_TIMEOUT_MS):
    """Open a connection with the pragmas SQLite leaves off by default.

    Pragmas are per connection, so every connection goes through here.
    isolation_level=None: we open write transactions ourselves and keep them short.
    """
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL, far fewer fsyncs
    conn.execute(f"PRAGMA journal_size_limit = {int(journal_size_limit)}")
    return conn


def get_db():
    if "db" not in g:
        g.db = connect(current_app.config["DATABASE"])
    return g.db


def close_db(e=None):
    db = g.pop("db", None)
    if db is not None:
        db.close()


def init_db(path):
    """Create missing tables (schema.sql is idempotent), apply pending
    migrations, and recover replies left pending by a worker process that died."""
    private_file(path)
    schema = current_app.open_resource("../schema.sql").read().decode("utf-8")
    conn = connect(path)
    try:
        conn.executescript(schema)
        migrate(conn)
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


@click.command("init-db")
def init_db_command():
    """Create the database tables if they are missing."""
    init_db(current_app.config["DATABASE"])
    click.echo(f"Initialized the database at {current_app.config['DATABASE']}.")


def init_app(app):
    global journal_size_limit
    # Connections are also opened outside requests (the turn monitor, gunicorn's
    # hooks), so this setting is kept where connect() finds it.
    journal_size_limit = app.config["WAL_SIZE_LIMIT"]
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
