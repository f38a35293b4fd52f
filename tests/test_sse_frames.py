"""The per-token SSE frame (chat.delta_frame, built without a dict per piece)
is byte for byte the general one (chat.sse_event)."""
import pytest

from chatbot.chat import delta_frame, sse_event


@pytest.mark.parametrize("text, position", [
    ("안녕하세요 ", 6), ('quote " backslash \\ newline \n', 40), ("", 0), ("\u2028 \x00 \U0001F600", 7),
])
def test_a_delta_frame_is_the_general_frame(text, position):
    assert delta_frame(text, position) == sse_event("delta", {"content": text}, position)
