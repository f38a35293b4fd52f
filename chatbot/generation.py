"""One reply, produced once, followed by any number of clients.

A `Turn` is the producer: a thread of its own reads the upstream, keeps the
reply's text in memory (pieces with their end positions, in code points), and
stores the reply when it ends. Clients are subscribers: `Turn.follow()` for a
client of this process, `follow_stored()` for a reply produced by another
process or host (or already over), which reads the durable text log. Both
yield the same events, (kind, value, position):

    ("start", ids, None)  ("delta", text, end position)  ("idle", None, None)
    and last ("done", message, length) or ("error", problem, length)

"idle" means "nothing more for now": it comes after each run of deltas that
were waiting together, and each TICK while nothing arrives. So a framer can
send a run of deltas in one write (chat.py's SSE does) and knows when to send
a keep-alive. JSON, SSE, WebSocket and the OpenAI door only frame these events.

One `Monitor` thread per process looks after all its running turns at once:
it appends their new text to the database (one transaction for all of them),
renews their leases, reads stop requests, and ends a turn that timed out, was
stopped, lost its lease or has had no listener for CHATBOT_RESUME_GRACE
seconds, by aborting its upstream call (which wakes the producer's read).
"""
import array
import bisect
import ctypes
import ctypes.util
import logging
import os
import secrets
import select
import socket
import ssl
import threading
import time

from . import context, db, metrics, store
from .llm import UpstreamError

log = logging.getLogger(__name__)

TICK = 0.2               # how long a subscriber waits before it looks around (keep-alives, a gone client)
LOG_SECONDS = 0.2        # how often new text of running replies is appended to the database
CLIENT_CHECK_SECONDS = 0.5
WATCH_SECONDS = 3.0      # how long a client attached through another process counts as listening
NOTIFIED_SIGNAL_SECONDS = 1.0   # how often stop flags are read where NOTIFY wakes producers
SWEEP_SECONDS = 5.0      # how often replies of dead workers elsewhere are looked for
PRUNE_SECONDS = 600.0    # how often expired idempotency keys and old activity rows are deleted
TRIM_SECONDS = 5.0       # how often, while turns start, freed memory goes back to the system
# Set by the gunicorn worker shortly before a graceful stop would kill it
# (gunicorn.conf.py): running turns end as incomplete and say so.
SHUTDOWN = threading.Event()
PRODUCER = "producer"    # a Turn's reader when a producer thread reads its upstream
READER_STALL_SECONDS = 5.0   # a client that reads the upstream but has not for this long (a write
                             # blocked on a slow client) hands the reading to a producer thread
INTERNAL_ERROR = {"code": "internal_error", "detail": "The reply could not be generated."}
STOPPED_BEFORE_TEXT = {"code": "stopped", "detail": "The reply was stopped before any text arrived."}
CLIENT_GONE = {"code": "client_gone", "detail": "The client disconnected before the reply was finished."}
MESSAGE_GONE = {"code": "message_not_found", "detail": "The reply was deleted with its session."}


def lease_owner():
    """This process's owner id for leases: unique across hosts and restarts."""
    global _owner
    if _owner is None or _owner[0] != os.getpid():
        _owner = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}")
    return _owner[1]


_owner = None


class Pieces:
    """A reply's text as it arrived: each piece, and the position after it.

    A piece kept as a str of its own costs about 80 bytes for a few
    characters, and a Python int as much again: a long reply held thousands
    of them. So the positions are machine integers, and the older pieces'
    text is folded into one string every FOLD pieces (slices of it give the
    pieces back)."""

    FOLD = 64

    def __init__(self):
        self.ends = array.array("q")   # the position after each piece, in code points
        self.folded = ""               # the text of the pieces before `recent`
        self.recent = []               # the latest pieces, each its own str

    def __len__(self):
        return len(self.ends)

    @property
    def length(self):
        return self.ends[-1] if self.ends else 0

    def append(self, text):
        self.ends.append(self.length + len(text))
        self.recent.append(text)
        if len(self.recent) >= self.FOLD:
            self.folded += "".join(self.recent)
            self.recent = []

    def text(self, start=0, end=None):
        """The text between two positions (all of it by default)."""
        folded = len(self.folded)
        if end is not None and end <= folded:
            return self.folded[start:end]
        recent = "".join(self.recent)[:None if end is None else end - folded]
        return recent[start - folded:] if start >= folded else self.folded[start:] + recent

    def after(self, position):
        """[(end, text)] of the pieces that end after `position` (the first one whole)."""
        first = bisect.bisect_right(self.ends, position)
        start = self.ends[first - 1] if first else 0
        folded = len(self.ends) - len(self.recent)   # pieces in `folded`
        pieces = []
        for i in range(first, len(self.ends)):
            end = self.ends[i]
            pieces.append((end, self.folded[start:end] if i < folded else self.recent[i - folded]))
            start = end
        return pieces


class Turn:
    def __init__(self, config, upstream, session_id, ids, messages, options, stream=True, keep_going=False):
        self.config = config
        self.session_id, self.user_message_id = session_id, ids["user_message_id"]
        self.reply_id, self.fence = ids["reply_id"], ids["fence"]
        self.messages = messages
        self.call = upstream.call(messages, options, stream=stream)
        self.keep_going = keep_going      # "on_disconnect": "continue"
        self.cond = threading.Condition()
        self.pieces = Pieces()            # the reply's text as it arrived
        self.logged = 0                   # the position up to which the database has it
        self.started = False              # the upstream accepted the request
        self.terminal = None              # (kind, value) once the reply is stored
        self.ending = None                # (status, finish_reason, error) when ended from outside
        self.subscribers, self.left_at = 0, None
        # Who reads the upstream (see _produce): PRODUCER, a follower, or None
        # (the next follower to look); `reading` is held while one does.
        self.reader, self.reading = PRODUCER, threading.Lock()
        self.over = False                 # the answer was read to its end (or failed); stored soon
        self.stepped = time.monotonic()   # when the reader last read
        self.stalled = False              # a client stopped reading: producer threads read to the end
        self.watched_until = 0.0          # a client attached through another process
        self.began, self.last_text = time.monotonic(), None
        self.usage = self.finish_reason = None
        self.completion_tokens = None   # the upstream's count of the reply alone (midm `total_tokens`)

    @property
    def ids(self):
        return {"session_id": self.session_id, "user_message_id": self.user_message_id,
                "message_id": self.reply_id}

    def start(self, open_here=False):
        """Start the reply: open the upstream call in this thread (`open_here`,
        for a client about to follow it) or in a producer thread."""
        metrics.turn_started()
        MONITOR.add(self)
        if not open_here:
            PRODUCERS.run(self._produce)
            return self
        with self.reading:
            opened = self._open()
        if opened:
            with self.cond:
                self._leave_reading_to_clients()
        return self

    def end(self, status, finish_reason, error=None):
        """End the reply now (a stop, a timeout, nobody listening, shutdown, a lost lease)."""
        with self.cond:
            if self.ending is None and self.terminal is None:
                self.ending = (status, finish_reason, error)
        self.call.abort()

    # --- reading the upstream ---------------------------------------------------
    #
    # One thread at a time reads the upstream. A client of this process that
    # follows the reply reads it in its own thread and relays each piece
    # itself, with no hand-off between threads per piece: the client that
    # started a stream opens the call too (start(open_here=True)). A producer
    # thread reads when no client does (a whole answer, a client that left or
    # stopped reading: a write blocked on a slow client), and hands the
    # reading to the next client that follows, so the reply never depends on
    # a client.

    def _produce(self):
        """Open the upstream call; then read it until a client takes that over."""
        with self.reading:
            self._open()
        self._read_to_end()

    def _read_to_end(self):
        while not self.over:
            with self.cond:
                if self.subscribers and self.call.stream and not self.stalled:
                    self._leave_reading_to_clients()
                    return
            with self.reading:
                self._step(None)

    def _leave_reading_to_clients(self):
        """(under cond) The first follower to look takes the reading up."""
        self.reader, self.stepped = None, time.monotonic()
        self.cond.notify_all()

    def _hand_to_producer(self, stalled=False):
        """(under cond) A producer thread reads from now on; for good when a
        client stalled (it would take the reading back, and stall again)."""
        self.reader = PRODUCER
        self.stalled = self.stalled or stalled
        PRODUCERS.run(self._read_to_end)

    def _open(self):
        try:
            self.call.open()
        except UpstreamError as e:
            self._finish(self.ending or ("incomplete", None, {"code": e.code, "detail": e.detail}))
            return False
        except Exception:
            log.exception("turn %s: opening the upstream call failed", self.reply_id)
            self._finish(("failed", None, INTERNAL_ERROR))
            return False
        with self.cond:
            self.started = True
            self.cond.notify_all()
        return True

    def _step(self, timeout):
        """Read what the upstream sends within `timeout` seconds (under `reading`);
        at the end of the answer, store the reply."""
        if self.over:
            return
        self.stepped = time.monotonic()
        try:
            chunks = self.call.read(timeout)
        except UpstreamError as e:
            return self._finish(self.ending or ("incomplete", None, {"code": e.code, "detail": e.detail}))
        except Exception:
            log.exception("turn %s: reading the upstream failed", self.reply_id)
            return self._finish(("failed", None, INTERNAL_ERROR))
        if chunks is None:
            return self._finish(self.ending or ("complete", self.finish_reason or "stop", None))
        texts = []
        for chunk in chunks:
            self.usage = chunk.usage or self.usage
            if chunk.completion_tokens is not None:
                self.completion_tokens = chunk.completion_tokens
            self.finish_reason = chunk.finish_reason or self.finish_reason
            if chunk.text:
                texts.append(chunk.text)
        if texts:
            now = time.monotonic()
            if self.last_text is None:
                metrics.first_token(now - self.began)
            with self.cond:
                for text in texts:
                    self.pieces.append(text)
                self.last_text = now
                self.cond.notify_all()

    def _finish(self, outcome):
        self.over = True
        self.call.abort()
        try:
            self._store(outcome)
        except Exception:   # _store logs its own failures; the followers must still hear the end
            log.exception("turn %s: finishing failed", self.reply_id)
            with self.cond:
                if self.terminal is None:
                    self.terminal = "error", {**INTERNAL_ERROR, "status": 500}
                self.cond.notify_all()

    @property
    def length(self):
        return self.pieces.length

    def _store(self, outcome):
        status, finish_reason, error = outcome
        text = self.pieces.text()
        if status == "incomplete" and not text:
            # A reply with no text is failed, whatever ended it, and says why.
            status, error = "failed", error or STOPPED_BEFORE_TEXT
        usage = self._usage()
        metrics.turn_finished(status, finish_reason, time.monotonic() - self.began, usage,
                              error["code"] if error else None)
        try:
            # Retried on a fresh connection while the database is busy or unreachable;
            # safe to repeat: a second try after a lost commit finds the lease released.
            message = db.write_surely(self.config, store.finish_turn, self.session_id, self.reply_id, self.fence,
                                      text, status, usage, finish_reason, error)
        except Exception:
            log.exception("turn %s: the reply could not be stored", self.reply_id)
            message = None
        try:
            # The session's conversation digest follows every turn, so that an
            # OpenAI-style request that continues it finds it (store/conversations.py).
            if message is not None:
                db.write_surely(self.config, store.refresh_conversation_hash, self.session_id, seconds=10)
        except Exception:   # the reply is stored: a stale digest only means a new session later
            log.exception("turn %s: the conversation digest could not be refreshed", self.reply_id)
        finally:
            MONITOR.remove(self)
        if message is None:
            terminal = "error", {**MESSAGE_GONE, "status": 404}
        elif message["status"] == "pending":  # our lease was taken: the new owner closes the reply
            terminal = "error", {**store.WORKER_LOST, "status": 502, "message": message}
        else:
            terminal = terminal_event(message)
        with self.cond:
            self.terminal = terminal
            self.cond.notify_all()

    def _usage(self):
        """The upstream's usage when it gave one, else our estimate, marked as such:
        "estimated": true when every count is ours, "estimated_fields" naming ours
        when the upstream counted the completion alone."""
        if self.usage or not self.pieces:
            return self.usage
        prompt = context.count_tokens(self.messages)
        if self.completion_tokens is not None:
            return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                    "total_tokens": prompt + self.completion_tokens,
                    "estimated_fields": ["prompt_tokens", "total_tokens"]}
        completion = len(self.pieces) if self.call.stream else context.estimate_tokens(self.pieces.text())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion, "estimated": True}

    # --- subscribers ----------------------------------------------------------

    def follow(self, after=0, client_gone=None, announce=False):
        """This reply's events for one client, from position `after` on.

        `start` comes once the upstream accepted the request (or at once with
        `announce`, for a client that re-attaches); a turn that failed before
        that yields only its `error`. A client that leaves just stops
        iterating: when it was the last one, the reply goes on for the grace
        period (see Monitor), or to its end with on_disconnect "continue".
        """
        me = object()   # this follower, as the turn's reader
        with self.cond:
            self.subscribers += 1
        try:
            yield from self._events(me, after, client_gone or (lambda: False), announce)
        finally:
            with self.cond:
                self.subscribers -= 1
                last = self.subscribers == 0 and self.terminal is None
                if last:
                    self.left_at = time.monotonic()
                # Reading: a client that read, or the last one leaving before any
                # client took the reading up, leaves it to a producer thread.
                if (self.reader is me or (self.reader is None and not self.subscribers)) and not self.over:
                    self._hand_to_producer()
                elif self.reader is me:
                    self.reader = None
            if last and not self.keep_going and self.config["RESUME_GRACE"] <= 0:
                self.end("incomplete", "client_gone", CLIENT_GONE)

    def _events(self, me, sent, client_gone, announced):
        if announced:
            yield "start", self.ids, None
        next_check = time.monotonic() + CLIENT_CHECK_SECONDS
        while True:
            read = False
            if self.reader is None and self.started and not self.over:
                with self.cond:
                    if self.reader is None and not self.over:
                        self.reader = me
            if self.reader is me and self.reading.acquire(blocking=False):
                try:
                    if self.reader is me:  # the monitor may have handed it to a producer meanwhile
                        self._step(TICK)
                        read = True
                finally:
                    self.reading.release()
            with self.cond:
                if (not read and self.length <= sent and self.terminal is None
                        and (announced or not self.started)):
                    self.cond.wait(TICK)
                started, terminal, length = self.started, self.terminal, self.length
                pieces = self.pieces.after(sent)
            if started and not announced:
                announced = True
                yield "start", self.ids, None
            elif terminal and not announced:  # failed before the upstream accepted the request
                yield terminal[0], terminal[1], 0
                return
            yield from deltas_after(pieces, sent)
            sent = pieces[-1][0] if pieces else sent
            if terminal:
                yield terminal[0], terminal[1], max(length, sent)
                return
            yield "idle", None, None   # the framer sends what it holds
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CLIENT_CHECK_SECONDS
                if client_gone():
                    return


def follow_stored(config, reply, after=0, client_gone=None):
    """Events of a reply produced by another process (or already over), read
    from the database: the same events as Turn.follow(announce=True)."""
    client_gone = client_gone or (lambda: False)
    conn = db.connect(config["DATABASE"])
    try:
        yield "start", reply["ids"], None
        sent, next_watch = after, 0.0
        while True:
            message, pieces, expired = store.read_reply(conn, reply["ids"]["message_id"], sent)
            if message is None:
                yield "error", {**MESSAGE_GONE, "status": 404}, sent
                return
            if message["status"] != "pending":
                content = message["content"]
                if len(content) > sent:
                    yield "delta", content[sent:], len(content)
                kind, value = terminal_event(message)
                yield kind, value, max(len(content), sent)
                return
            yield from deltas_after(pieces, sent)
            sent = pieces[-1][0] if pieces else sent
            if expired:  # its worker is gone: close it, and the next look finds it over
                store.recover_reply(conn, message["session_id"], message["message_id"])
                continue
            now = time.monotonic()
            if now >= next_watch:
                next_watch = now + WATCH_SECONDS / 3
                store.watch(conn, message["message_id"], WATCH_SECONDS)
                if client_gone():
                    return
            yield "idle", None, None
            time.sleep(TICK)
    finally:
        conn.close()


def deltas_after(pieces, sent):
    """Delta events of pieces (end position, text) that end past position
    `sent`; the piece that `sent` falls inside is cut there."""
    for end, text in pieces:
        yield "delta", text[max(0, len(text) - (end - sent)):], end


def terminal_event(message):
    """A stored reply's last event: `error` for a reply an error cut short or
    prevented, else `done` (also for one stopped or left by its client)."""
    error = message["error"]
    if message["status"] != "complete" and error and error["code"] not in ("stopped", "client_gone"):
        return "error", {**error, "status": outcome_status(error), "message": message}
    return "done", message


def outcome_status(error):
    """The HTTP status that goes with an error code of a turn."""
    return {"upstream_unavailable": 503, "upstream_timeout": 504}.get(error["code"], 502)


class Producers:
    """The threads that produce turns. One that finished its turn waits a while
    for the next one: starting a thread per turn (and waiting for it to start)
    cost more CPU than the rest of a short turn's set-up."""

    IDLE_SECONDS = 30.0

    def __init__(self):
        self.lock = threading.Lock()
        self.idle = []   # slots [wake-up lock, task] of threads waiting for a task
        self.pid = os.getpid()

    def run(self, task):
        with self.lock:
            if self.pid != os.getpid():  # a forked child has none of its parent's threads
                self.pid, self.idle = os.getpid(), []
            slot = self.idle.pop() if self.idle else None
        if slot is None:
            threading.Thread(target=self._serve, args=(task,), daemon=True, name="turn-producer").start()
        else:
            slot[1] = task
            slot[0].release()

    def _serve(self, task):
        slot = [threading.Lock(), None]
        slot[0].acquire()
        while True:
            try:
                task()
            except BaseException:  # _produce logs its own; this thread must survive anything
                log.exception("turn producer: task failed")
            with self.lock:
                self.idle.append(slot)
            if not slot[0].acquire(timeout=self.IDLE_SECONDS):
                with self.lock:
                    if any(s is slot for s in self.idle):  # nobody took this thread: it ends
                        self.idle = [s for s in self.idle if s is not slot]
                        return
                slot[0].acquire()  # taken at the last moment: its task is on the way
            task, slot[1] = slot[1], None


PRODUCERS = Producers()


class Monitor:
    """One thread per worker process looks after all its running turns: their
    log, leases, stop requests, timeouts and listeners, one query for all of
    them at a time (per-turn queries would make hundreds of streams queue for
    SQLite's single writer). It is restarted if it ever dies, and one failure
    (a busy database, say) only delays its work to the next round."""

    def __init__(self):
        self.lock = threading.Lock()
        self.turns = {}
        self.thread = None
        self.pid = None
        self.listening = set()   # (pid, database) with a stop listener
        self.started = 0      # turns started since memory was last trimmed
        self.trimmed = 0.0

    def add(self, turn):
        self.listen_for_stops(turn.config["DATABASE"])
        with self.lock:
            self.turns[turn.reply_id] = turn
            self.started += 1
            if self.thread is None or not self.thread.is_alive() or self.pid != os.getpid():
                if self.thread is not None and self.pid == os.getpid():
                    log.error("turn monitor: the thread had died; starting it again")
                self.pid = os.getpid()
                # Published once started, so nobody sees a thread not yet alive.
                thread = threading.Thread(target=self._run, daemon=True, name="turn-monitor")
                thread.start()
                self.thread = thread

    def listen_for_stops(self, database):
        """On PostgreSQL, one connection per process LISTENs for stop requests
        (store.request_stop NOTIFYs them), so a stop sent to any host wakes
        the producer at once."""
        key = (os.getpid(), database)
        with self.lock:
            if not db.is_url(database) or key in self.listening:
                return
            self.listening.add(key)
        from . import pg
        threading.Thread(target=pg.listen, args=(database, store.STOP_CHANNEL, self._stop_notified),
                         daemon=True, name="stop-listener").start()

    def _stop_notified(self, session_id):
        turn = self.for_session(session_id)
        if turn is not None:
            turn.end("incomplete", "stopped")

    def remove(self, turn):
        with self.lock:
            self.turns.pop(turn.reply_id, None)

    def get(self, reply_id):
        with self.lock:
            return self.turns.get(reply_id)

    def for_session(self, session_id):
        with self.lock:
            return next((t for t in self.turns.values() if t.session_id == session_id), None)

    def _run(self):
        databases = {}   # path -> its connection and schedule (a test process may serve several)
        while True:
            time.sleep(LOG_SECONDS)
            try:
                self._round(databases)
            except Exception:
                log.exception("turn monitor: round failed (will retry)")
                for state in databases.values():
                    state["conn"].close()
                databases.clear()

    def _round(self, databases):
        with self.lock:
            turns = list(self.turns.values())
        now = time.monotonic()
        by_database = {}
        for turn in turns:
            self._check(turn, now)
            by_database.setdefault(turn.config["DATABASE"], []).append(turn)
        for path, group in by_database.items():
            if path not in databases:
                databases[path] = {"conn": db.connect(path), "config": group[0].config,
                                   "renewed": 0.0, "swept": now, "pruned": 0.0, "signalled": 0.0}
            self._save(databases[path], group, now)
        for state in databases.values():
            # Replies of dead workers elsewhere are closed within a lease, even
            # if nobody asks for their session.
            if now - state["swept"] >= SWEEP_SECONDS:
                state["swept"] = now
                store.recover_dead_generations(state["conn"])
            if now - state["pruned"] >= PRUNE_SECONDS:
                state["pruned"] = now
                store.prune(state["conn"], state["config"]["IDEMPOTENCY_TTL"])
        if self.started and now - self.trimmed >= TRIM_SECONDS:
            self.started, self.trimmed = 0, now
            trim_memory()

    @staticmethod
    def _save(state, group, now):
        """Append the group's new text, renew its leases when due, read its stop requests."""
        conn, lease = state["conn"], float(state["config"]["LEASE_SECONDS"])
        renew = now - state["renewed"] >= lease / 3
        pieces = []
        for turn in group:
            with turn.cond:
                end = turn.pieces.length
                if end > turn.logged:
                    pieces.append((turn, end, turn.pieces.text(turn.logged, end)))
        if pieces or renew:
            lost = store.save_progress(conn, lease_owner(), lease,
                                       [(t.reply_id, t.fence, end, text) for t, end, text in pieces],
                                       [(t.reply_id, t.fence) for t in group] if renew else [])
            if renew:
                state["renewed"] = now
            for turn, end, _ in pieces:
                turn.logged = end
            for turn in group:
                if turn.reply_id in lost and turn.terminal is None:
                    turn.end("incomplete", None, store.WORKER_LOST)
        # On PostgreSQL a stop also arrives at once by NOTIFY (see listen_for_stops):
        # the flag is then only the truth to fall back on, read once a second.
        if conn.engine == "postgresql" and now - state["signalled"] < NOTIFIED_SIGNAL_SECONDS:
            return
        state["signalled"] = now
        signals = store.turn_signals(conn, [t.reply_id for t in group])
        for turn in group:
            stop, turn.watched_until = signals.get(turn.reply_id, (False, 0.0))
            if stop:
                turn.end("incomplete", "stopped")

    @staticmethod
    def _check(turn, now):
        """End a turn that timed out, is being shut down, or has had no listener too long."""
        cfg = turn.config
        if turn.reader is not PRODUCER and not turn.over and now - turn.stepped > READER_STALL_SECONDS:
            with turn.cond:
                if turn.reader is not PRODUCER and not turn.over:
                    turn._hand_to_producer(stalled=True)
        if turn.terminal is not None or turn.ending is not None:
            return
        if SHUTDOWN.is_set():
            turn.end("incomplete", "shutdown")
        elif turn.last_text is None and now - turn.began > cfg["LLM_FIRST_TOKEN_TIMEOUT"]:
            turn.end("incomplete", None, {"code": "upstream_timeout", "detail":
                     f"The LLM server sent no text within {cfg['LLM_FIRST_TOKEN_TIMEOUT']:g} s."})
        elif turn.last_text is not None and now - turn.last_text > cfg["LLM_IDLE_TIMEOUT"]:
            turn.end("incomplete", None, {"code": "upstream_timeout", "detail":
                     f"The LLM server was silent for more than {cfg['LLM_IDLE_TIMEOUT']:g} s."})
        elif (not turn.keep_going and turn.subscribers == 0 and turn.left_at is not None
              and now - turn.left_at >= cfg["RESUME_GRACE"] and time.time() > turn.watched_until):
            turn.end("incomplete", "client_gone", CLIENT_GONE)


MONITOR = Monitor()


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_memory():
    """Give freed heap memory back to the system. A burst of turns starting at
    once (each opens a database connection, parses a request, starts an upstream
    call) leaves glibc's heaps full of freed holes that it keeps otherwise: about
    a third of a worker's memory per open stream in the benchmark."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def client_watcher(environ):
    """A function that tells whether the HTTP client has closed its connection.

    A WSGI app otherwise learns it only when a write fails, which during a long
    upstream silence can take a minute of wasted generation. gunicorn and
    werkzeug hand us the client socket; a zero-byte peek means it closed.
    poll, not select: select fails for descriptors of 1024 and above.
    """
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return None

    def gone():
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(0):
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True
    return gone
