"""Request counts per key, for the rate limit (all workers share them)."""
import math
import time

from .base import transaction


def take_request(db, owner, limit, period, now=None):
    """Count one request of `owner` against `limit` requests per `period` seconds.

    The rate is a sliding window estimated from two fixed slots (the previous
    slot's count weighted by how much of it still lies within the window), so a
    client cannot send twice the limit around a slot boundary. Returns 0 when
    the request may go ahead (and counts it), else the seconds to wait.
    """
    now = time.time() if now is None else now
    slot = int(now // period)
    elapsed = now - slot * period
    with transaction(db):
        db.lock("rate", owner)   # read, then write: one request of this owner at a time
        counts = dict(db.execute("SELECT slot, count FROM request_counts WHERE owner = ? AND slot >= ?",
                                 (owner, slot - 1)).fetchall())
        current, previous = counts.get(slot, 0), counts.get(slot - 1, 0)
        if current + 1 + previous * (1 - elapsed / period) > limit:
            return _wait(limit, period, elapsed, current, previous)
        db.execute("INSERT INTO request_counts (owner, slot, count) VALUES (?, ?, 1)"
                   " ON CONFLICT (owner, slot) DO UPDATE SET count = request_counts.count + 1", (owner, slot))
        db.execute("DELETE FROM request_counts WHERE owner = ? AND slot < ?", (owner, slot - 1))
    return 0


def _wait(limit, period, elapsed, current, previous):
    """Seconds until one more request fits the sliding window."""
    if current + 1 > limit:
        # Not in this slot; in the next one this slot's count is the weighted one.
        at = period + period * (1 - (limit - 1) / current)
    else:
        at = period * (1 - (limit - current - 1) / previous)
    return max(1, math.ceil(at - elapsed))
