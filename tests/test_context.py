"""The context sent upstream: system prompt, earlier messages in order, the new
message; trimmed oldest-first to the token budget. Checked on what the
stand-in LLM server actually received."""
from chatbot import context, db
from helpers import chat, write_turn


def sent(standin_log):
    """The messages of the latest generation request the stand-in received."""
    return standin_log()[-1]["body"]["messages"]


def test_the_context_is_the_system_prompt_the_history_and_the_new_message(app, client, session_id,
                                                                          standin_log):
    app.config["SYSTEM_PROMPT"] = "Answer like a pirate."
    first = chat(client, session_id, "하나 @@words=2").json["content"]
    second = chat(client, session_id, "two @@words=3").json["content"]
    chat(client, session_id, "three")
    assert sent(standin_log) == [
        {"role": "system", "content": "Answer like a pirate."},
        {"role": "user", "content": "하나 @@words=2"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "two @@words=3"}, {"role": "assistant", "content": second},
        {"role": "user", "content": "three"},
    ]


def test_replies_without_text_are_left_out_and_cut_replies_kept(client, session_id, standin_log):
    chat(client, session_id, "fails @@status=500")
    chat(client, session_id, "cut @@words=5 @@break=2", path="/api/chat/stream")
    chat(client, session_id, "last")
    replies = client.get(f"/api/sessions/{session_id}/messages").json["messages"]
    assert [m["status"] for m in replies if m["role"] == "assistant"] == ["failed", "incomplete", "complete"]
    cut = replies[3]["content"]
    assert cut and [m["content"] for m in sent(standin_log)[1:]] == [
        "fails @@status=500", "cut @@words=5 @@break=2", cut, "last"]


def test_other_sessions_are_not_in_the_context(client, session_id, standin_log):
    other = client.post("/api/sessions").json["session_id"]
    chat(client, other, "secret of the other session")
    chat(client, session_id, "mine")
    assert [m["role"] for m in sent(standin_log)] == ["system", "user"]


# Every text below is 30 ASCII characters: context.estimate_tokens gives 10 + 4 = 14.
TEXT_TOKENS = 14


def a_long_session(app, session_id, turns):
    conn = db.connect(app.config["DATABASE"])
    history = []
    for i in range(turns):
        question, answer = f"question {i:02d}".ljust(30, "."), f"answer {i:02d}".ljust(30, ".")
        write_turn(conn, session_id, question, answer)
        history += [question, answer]
    conn.close()
    return history


def test_the_history_is_trimmed_oldest_first_to_the_budget(app, client, standin_log):
    app.config["SYSTEM_PROMPT"] = "S" * 30
    for kept in (0, 1, 3, 10):
        session_id = client.post("/api/sessions").json["session_id"]
        history = a_long_session(app, session_id, 5)
        # Room for the system prompt, the new message and `kept` messages: one token short of kept + 1.
        app.config["CONTEXT_MAX_TOKENS"] = TEXT_TOKENS * (2 + kept + 1) - 1
        chat(client, session_id, "N" * 30)
        messages = sent(standin_log)
        assert messages[0] == {"role": "system", "content": "S" * 30}
        assert messages[-1] == {"role": "user", "content": "N" * 30}
        # Whole turns go: a reply whose question did not fit goes with it.
        expected = history[-kept:] if kept else []
        if expected and expected[0].startswith("answer"):
            expected = expected[1:]
        assert [m["content"] for m in messages[1:-1]] == expected
        assert context.count_tokens(messages) <= app.config["CONTEXT_MAX_TOKENS"]


def test_the_new_message_and_the_system_prompt_are_never_dropped(app, client, session_id, standin_log):
    app.config["SYSTEM_PROMPT"] = "S" * 30
    a_long_session(app, session_id, 3)
    app.config["CONTEXT_MAX_TOKENS"] = 2 * TEXT_TOKENS  # room for exactly these two
    chat(client, session_id, "N" * 30)
    assert sent(standin_log) == [{"role": "system", "content": "S" * 30}, {"role": "user", "content": "N" * 30}]


def test_estimates_over_count_rather_than_under():
    assert context.estimate_tokens("") == context.PER_MESSAGE_TOKENS
    assert context.estimate_tokens("a" * 300) == 100 + context.PER_MESSAGE_TOKENS
    assert context.estimate_tokens("안녕하세요") == 10 + context.PER_MESSAGE_TOKENS


def test_build_keeps_whole_turns_newest_first():
    history = [{"role": "user", "content": "a" * 30}, {"role": "assistant", "content": "b" * 30},
               {"role": "user", "content": "c" * 30}, {"role": "assistant", "content": "d" * 30},
               {"role": "user", "content": "e" * 30}]
    system = {"role": "system", "content": "s" * 30}
    # room for one more message: "d" alone would be a reply without its question
    assert context.build("s" * 30, history, 3 * TEXT_TOKENS) == [system, history[4]]
    assert context.build("s" * 30, history, 4 * TEXT_TOKENS) == [system, *history[2:]]
    assert context.build("", history, 10 * TEXT_TOKENS) == history
