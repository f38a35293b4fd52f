"""The service's data: every SQL statement lives in this package, one module a job.

Functions take an open connection (see db.py: SQLite or PostgreSQL, one interface)
and return plain dicts; they raise the store's own errors (base.py), never a driver's.
Write transactions are short and never span a call to the upstream.
"""
from .base import (Conflict, StoreBusy, StoreError, StoreUnavailable, checkpoint, is_busy, new_id, now_iso,  # noqa: F401
                   transaction, when_not_busy)
from .conversations import find_by_conversation, refresh_conversation_hash  # noqa: F401
from .keys import (active_api_key_named, find_api_key, insert_api_key, list_api_keys, revoke_api_key,  # noqa: F401
                   server_secret)
from .quotas import session_count, stored_bytes  # noqa: F401
from .rates import take_request  # noqa: F401
from .sessions import (SessionQuota, create_session, delete_session, get_message, get_session, history,  # noqa: F401
                       import_session, last_user_message, list_messages, list_sessions, make_title,
                       message_dict, page_messages, update_session)
from .turns import (STOP_CHANNEL, WORKER_LOST, NothingToRegenerate, SessionGone, TooManyTurns, begin_turn,  # noqa: F401
                    finish_turn, idempotent_turn, prune, question_of, read_reply, recover_dead_generations,
                    recover_reply, request_stop, running_turns, save_progress, turn_signals, watch)
