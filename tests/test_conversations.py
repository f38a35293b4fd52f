"""Conversations people can manage: the session list, titles, settings per session, history pages."""
import base64
import json

import pytest

from chatbot.store import make_title
from helpers import assert_problem

# Replies come from the in-process fake LLM (tests/fake_llm.py): instant, and no
# directive in the messages, so titles are the users' own words.
pytestmark = pytest.mark.usefixtures("fake_llm")


def new_session(client, **body):
    response = client.post("/api/sessions", json=body)
    assert response.status_code == 201, response.json
    return response.json["session_id"]


def chat(client, session_id, message, **options):
    response = client.post("/api/chat", json={"session_id": session_id, "message": message, **options})
    assert response.status_code == 200, response.json
    return response.json


def page(client, **params):
    response = client.get("/api/sessions", query_string=params)
    assert response.status_code == 200, response.json
    return [s["session_id"] for s in response.json["sessions"]], response.json["next_cursor"]


# The list

def test_sessions_are_listed_most_recently_active_first(client):
    a, b, c = (new_session(client) for _ in range(3))
    assert page(client) == ([c, b, a], None)
    chat(client, a, "hello")
    assert page(client) == ([a, c, b], None)
    client.patch(f"/api/sessions/{b}", json={"title": "renamed"})
    assert page(client) == ([b, a, c], None)


def test_the_list_carries_whole_session_objects(client):
    sid = new_session(client, metadata={"tag": "x"})
    chat(client, sid, "hello")
    listed = client.get("/api/sessions").json["sessions"][0]
    assert listed == client.get(f"/api/sessions/{sid}").json
    assert set(listed) == {"session_id", "created_at", "last_accessed", "title", "metadata",
                           "system_prompt", "message_count"}
    assert listed["message_count"] == 2


def test_pages_list_every_session_once_while_sessions_move_to_the_top(client):
    s = [new_session(client) for _ in range(6)]   # s[5] is the newest
    first, cursor = page(client, limit=2)
    assert first == [s[5], s[4]]
    # Meanwhile: a session of a later page and one already seen become active,
    # and a new session appears. The pages that follow keep the first page's order.
    chat(client, s[1], "hello")
    client.patch(f"/api/sessions/{s[5]}", json={"title": "renamed"})
    late = new_session(client)
    second, cursor = page(client, limit=2, cursor=cursor)
    third, cursor = page(client, limit=2, cursor=cursor)
    assert (second, third, cursor) == ([s[3], s[2]], [s[1], s[0]], None)
    # A new first page shows the new order.
    assert page(client, limit=3)[0] == [late, s[5], s[1]]


def test_a_session_deleted_between_pages_is_simply_not_listed(client):
    s = [new_session(client) for _ in range(4)]
    first, cursor = page(client, limit=2)
    client.delete(f"/api/sessions/{s[1]}")
    assert page(client, limit=2, cursor=cursor) == ([s[0]], None)


def test_the_page_size_is_capped(app, client):
    app.config["SESSIONS_PAGE_LIMIT"] = 3
    for _ in range(4):
        new_session(client)
    ids, cursor = page(client, limit=1000)
    assert len(ids) == 3 and cursor is not None
    assert len(page(client, cursor=cursor, limit=1000)[0]) == 1


@pytest.mark.parametrize("limit", ["0", "-1", "ten", "1.5"])
def test_a_bad_limit_is_a_validation_error(client, limit):
    assert_problem(client.get(f"/api/sessions?limit={limit}"), 422, "validation_error", "limit")


def b64(value):
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", ["nonsense!", "%%%", "e30", b64({}), b64([1]), b64(["a", "b"]),
                                    b64([5, 9]), b64([-1, 0]), b64([1.5, 1]), b64([2**70, 1])])
def test_a_cursor_the_server_did_not_give_is_a_400_problem(client, cursor):
    new_session(client)
    assert_problem(client.get("/api/sessions", query_string={"cursor": cursor}), 400, "invalid_cursor")


# Titles

def test_the_first_user_message_gives_the_title(client, session_id):
    assert client.get(f"/api/sessions/{session_id}").json["title"] is None
    chat(client, session_id, "What is the capital of France?")
    chat(client, session_id, "And of Germany?")
    assert client.get(f"/api/sessions/{session_id}").json["title"] == "What is the capital of France?"


def test_long_titles_are_cut_on_a_word_boundary_with_an_ellipsis():
    english = "How do I configure nginx to proxy Server-Sent Events without buffering them?"
    assert make_title(english) == "How do I configure nginx to proxy…"
    korean = "서울에서 부산까지 KTX로 가는 가장 빠른 방법과 요금을 알려주세요. 주말에도 같나요?"
    title = make_title(korean)
    # Counted in characters: 40 Hangul syllables are 120 bytes, and the cut is at a space.
    assert title == "서울에서 부산까지 KTX로 가는 가장 빠른 방법과 요금을 알려주세요…"
    assert len(title) <= 40 < len(title.encode("utf-8"))
    assert make_title("Hello,   world\n\nagain") == "Hello, world again"


def test_text_without_spaces_is_cut_between_characters():
    title = make_title("가나다라마바사아자차카타파하" * 4)
    assert len(title) == 40 and title.endswith("…")
    assert title[:-1] == ("가나다라마바사아자차카타파하" * 4)[:39]
    # A decomposed syllable (jamo) is composed first; a combining mark stays with its letter.
    assert make_title("\u1100\u1161" * 50) == "가" * 39 + "…"
    assert make_title("e\u0301" * 39 + "x") == "é" * 39 + "x"   # NFC: é is one character, so it fits
    # q with a dot above has no composed form: the cut moves before the q, not between q and its dot.
    assert make_title("q" * 38 + "q\u0307" + "zzzz") == "q" * 38 + "…"


def test_a_long_first_message_gives_a_short_title(client, session_id):
    chat(client, session_id, "안녕하세요 " * 20)
    title = client.get(f"/api/sessions/{session_id}").json["title"]
    assert title == "안녕하세요 " * 5 + "안녕하세요…"   # 35 characters: a seventh word would not fit


def test_a_title_set_by_the_user_stays(client):
    sid = new_session(client, title="Trip planning")
    chat(client, sid, "hello")
    assert client.get(f"/api/sessions/{sid}").json["title"] == "Trip planning"
    client.patch(f"/api/sessions/{sid}", json={"title": "  Trip \n planning 2 "})
    assert client.get(f"/api/sessions/{sid}").json["title"] == "Trip planning 2"
    # null: back to the title made from the first message
    assert client.patch(f"/api/sessions/{sid}", json={"title": None}).json["title"] == "hello"


def test_a_title_reset_before_any_message_is_set_by_the_first_one(client, session_id):
    assert client.patch(f"/api/sessions/{session_id}", json={"title": None}).json["title"] is None
    chat(client, session_id, "first words")
    assert client.get(f"/api/sessions/{session_id}").json["title"] == "first words"


@pytest.mark.parametrize("title", ["", "   ", "x" * 201, 5])
def test_bad_titles_are_refused(client, session_id, title):
    assert_problem(client.patch(f"/api/sessions/{session_id}", json={"title": title}),
                   422, "validation_error", "title")
    assert_problem(client.post("/api/sessions", json={"title": title}), 422, "validation_error", "title")


# PATCH, metadata, system prompt

def test_patch_changes_what_it_names_and_leaves_the_rest(client):
    sid = new_session(client, metadata={"a": 1}, title="T", system_prompt="Be brief.")
    session = client.patch(f"/api/sessions/{sid}", json={"metadata": {"b": [1, "둘"]}}).json
    assert (session["metadata"], session["title"], session["system_prompt"]) == ({"b": [1, "둘"]}, "T", "Be brief.")
    session = client.patch(f"/api/sessions/{sid}", json={"system_prompt": None}).json
    assert (session["metadata"], session["title"], session["system_prompt"]) == ({"b": [1, "둘"]}, "T", None)
    assert client.get(f"/api/sessions/{sid}").json == session


def test_patch_and_turns_are_activity_reads_are_not(client, session_id):
    created = client.get(f"/api/sessions/{session_id}").json["last_accessed"]
    client.get(f"/api/sessions/{session_id}/messages")
    client.get("/api/sessions")
    assert client.get(f"/api/sessions/{session_id}").json["last_accessed"] == created
    patched = client.patch(f"/api/sessions/{session_id}", json={"title": "x"}).json["last_accessed"]
    assert patched > created
    chat(client, session_id, "hello")
    assert client.get(f"/api/sessions/{session_id}").json["last_accessed"] > patched


def test_metadata_is_size_limited(app, client, session_id):
    fits, too_big = {"k": "가나다"}, {"k": "가나다라"}
    app.config["METADATA_MAX_BYTES"] = len('{"k":"가나다"}'.encode())   # 16 bytes, not 10 characters
    assert client.patch(f"/api/sessions/{session_id}", json={"metadata": fits}).status_code == 200
    assert_problem(client.patch(f"/api/sessions/{session_id}", json={"metadata": too_big}),
                   422, "validation_error", "metadata")
    assert_problem(client.post("/api/sessions", json={"metadata": too_big}), 422, "validation_error", "metadata")
    assert client.get(f"/api/sessions/{session_id}").json["metadata"] == fits


@pytest.mark.parametrize("body,field", [
    ({}, "(body)"),
    ({"metadata": None}, "metadata"),
    ({"metadata": [1, 2]}, "metadata"),
    ({"system_prompt": 3}, "system_prompt"),
    ({"system_prompt": "x" * 8001}, "system_prompt"),
    ({"colour": "red"}, "colour"),
])
def test_bad_patches_are_validation_errors(client, session_id, body, field):
    assert_problem(client.patch(f"/api/sessions/{session_id}", json=body), 422, "validation_error", field)


def test_a_system_prompt_that_leaves_no_room_is_refused(app, client, session_id):
    app.config["CONTEXT_MAX_TOKENS"] = 100
    assert_problem(client.patch(f"/api/sessions/{session_id}", json={"system_prompt": "word " * 100}),
                   422, "validation_error", "system_prompt")


def test_patch_of_an_unknown_session_is_404(client):
    assert_problem(client.patch("/api/sessions/nope", json={"title": "x"}), 404, "session_not_found")


def test_patch_needs_json(client, session_id):
    assert_problem(client.patch(f"/api/sessions/{session_id}", data="title=x"), 415, "unsupported_media_type")


def test_the_session_system_prompt_replaces_the_default_in_the_context(app, client, session_id, fake_llm):
    def system_sent():
        first = fake_llm.requests[-1]["messages"][0]
        return first["content"] if first["role"] == "system" else None

    chat(client, session_id, "one")
    assert system_sent() == app.config["SYSTEM_PROMPT"]
    client.patch(f"/api/sessions/{session_id}", json={"system_prompt": "당신은 해적입니다."})
    chat(client, session_id, "two")
    assert system_sent() == "당신은 해적입니다."
    client.patch(f"/api/sessions/{session_id}", json={"system_prompt": ""})   # none at all
    chat(client, session_id, "three")
    assert system_sent() is None
    client.patch(f"/api/sessions/{session_id}", json={"system_prompt": None})  # the default again
    chat(client, session_id, "four")
    assert system_sent() == app.config["SYSTEM_PROMPT"]


def test_a_system_prompt_given_at_creation_is_used(client, fake_llm):
    sid = new_session(client, system_prompt="Answer in French.")
    chat(client, sid, "hello")
    assert fake_llm.requests[-1]["messages"][0] == {"role": "system", "content": "Answer in French."}


# History pages

@pytest.fixture
def six_messages(client, session_id):
    for i in range(3):
        chat(client, session_id, f"question {i}")
    return client.get(f"/api/sessions/{session_id}/messages").json["messages"]


def messages_page(client, session_id, **params):
    response = client.get(f"/api/sessions/{session_id}/messages", query_string=params)
    assert response.status_code == 200, response.json
    return response.json["messages"], response.json["has_more"]


def test_without_parameters_the_whole_history_comes(client, session_id, six_messages):
    assert len(six_messages) == 6
    assert messages_page(client, session_id) == (six_messages, False)


def test_history_pages_go_back_from_the_newest_oldest_first_within_a_page(client, session_id, six_messages):
    m = six_messages
    assert messages_page(client, session_id, limit=4) == (m[2:], True)
    assert messages_page(client, session_id, limit=4, before=m[2]["message_id"]) == (m[:2], False)
    assert messages_page(client, session_id, limit=2, before=m[4]["message_id"]) == (m[2:4], True)
    assert messages_page(client, session_id, limit=6) == (m, False)
    assert messages_page(client, session_id, before=m[3]["message_id"]) == (m[:3], False)


def test_the_history_page_size_is_capped(app, client, session_id, six_messages):
    app.config["MESSAGES_PAGE_LIMIT"] = 4
    assert messages_page(client, session_id, limit=100) == (six_messages[2:], True)


def test_an_unknown_before_is_its_own_404(client, session_id, six_messages):
    other = new_session(client)
    chat(client, other, "elsewhere")
    foreign = client.get(f"/api/sessions/{other}/messages").json["messages"][0]["message_id"]
    for before in ("nope", foreign):
        response = client.get(f"/api/sessions/{session_id}/messages", query_string={"before": before})
        assert_problem(response, 404, "message_not_found")


@pytest.mark.parametrize("limit", ["0", "x"])
def test_a_bad_history_limit_is_a_validation_error(client, session_id, limit):
    assert_problem(client.get(f"/api/sessions/{session_id}/messages?limit={limit}"),
                   422, "validation_error", "limit")
