"""The context sent upstream stays within CHATBOT_CONTEXT_MAX_TOKENS, system prompt included."""
from chatbot import context
from chatbot.context import count_tokens, estimate_tokens
from helpers import chat


def pairs(messages):
    return [(m["role"], m["content"]) for m in messages]


def test_whole_turns_are_dropped_oldest_first():
    history = [{"role": "user", "content": "first question " * 20}, {"role": "assistant", "content": "a1"},
               {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
               {"role": "user", "content": "u3"}]
    budget = estimate_tokens("S") + count_tokens(history[1:])   # all but the first question
    built = context.build("S", history, budget)
    # a1 would fit, but its question does not: the whole first turn goes.
    assert pairs(built) == [("system", "S"), ("user", "u2"), ("assistant", "a2"), ("user", "u3")]
    assert pairs(context.build("S", history, budget + 1000)) == [("system", "S")] + pairs(history)


def test_the_estimate_errs_high_for_korean_and_english():
    korean = "안녕하세요 오늘 날씨가 정말 좋네요"
    syllables = sum(1 for c in korean if c != " ")
    assert estimate_tokens(korean) >= 2 * syllables   # no vocabulary spends more than 2 on common syllables
    english = "The quick brown fox jumps over the lazy dog."
    assert estimate_tokens(english) >= len(english) / 3


def test_the_context_sent_stays_within_the_budget(app, client, session_id, standin_log):
    app.config["CONTEXT_MAX_TOKENS"] = 150
    for i in range(6):
        assert chat(client, session_id, f"question number {i} @@words=2").status_code == 200
    sent = standin_log()[-1]["body"]["messages"]
    stored = client.get(f"/api/sessions/{session_id}/messages").json["messages"][:-1]  # before the last reply
    assert count_tokens(sent) <= 150
    assert sent[0] == {"role": "system", "content": app.config["SYSTEM_PROMPT"]}
    kept = pairs(sent[1:])
    assert kept == pairs(stored)[-len(kept):]           # whole messages, the latest ones
    assert len(kept) < len(stored) and kept[0][0] == "user"


def test_a_session_system_prompt_counts_against_the_budget(app, client, session_id, standin_log):
    app.config["CONTEXT_MAX_TOKENS"] = 300
    for i in range(6):
        chat(client, session_id, f"question number {i} @@words=2")
    with_default = standin_log()[-1]["body"]["messages"]
    prompt = "Always answer like a careful librarian would. " * 12
    client.patch(f"/api/sessions/{session_id}", json={"system_prompt": prompt})
    # Regenerating sends the same history again, now beside the longer prompt.
    client.post("/api/chat", json={"session_id": session_id, "regenerate": True})
    sent = standin_log()[-1]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": prompt}
    assert count_tokens(sent) <= 300
    assert len(sent) < len(with_default) and sent[-1] == with_default[-1]


def test_a_message_too_long_for_the_budget_is_refused_not_truncated(app, client, session_id, standin_log):
    app.config["CONTEXT_MAX_TOKENS"] = 100
    response = chat(client, session_id, "x " * 200)
    assert response.status_code == 422 and response.json["code"] == "validation_error"
    assert [e["field"] for e in response.json["errors"]] == ["message"]
    assert client.get(f"/api/sessions/{session_id}").json["message_count"] == 0
    assert standin_log() == []


def test_a_message_that_fits_only_beside_the_default_prompt(app, client, session_id):
    app.config["CONTEXT_MAX_TOKENS"] = 300
    message = "word " * 70 + "@@words=1"                        # about 124 tokens
    client.patch(f"/api/sessions/{session_id}", json={"system_prompt": "Be careful. " * 50})  # about 204
    assert chat(client, session_id, message).status_code == 422
    client.patch(f"/api/sessions/{session_id}", json={"system_prompt": None})
    assert chat(client, session_id, message).status_code == 200


def test_regenerate_under_a_prompt_that_no_longer_leaves_room_keeps_the_reply(app, client, session_id):
    app.config["CONTEXT_MAX_TOKENS"] = 300
    reply = chat(client, session_id, "word " * 70 + "@@words=1").json
    client.patch(f"/api/sessions/{session_id}", json={"system_prompt": "Be careful. " * 50})
    response = client.post("/api/chat", json={"session_id": session_id, "regenerate": True})
    assert response.status_code == 422
    assert [e["field"] for e in response.json["errors"]] == ["regenerate"]
    assert client.get(f"/api/sessions/{session_id}/messages").json["messages"][-1] == reply
