"""chatbot.llm.Body: a streamed answer's body read straight off the socket,
with its transfer coding undone, whatever way the network splits it."""
import socket
import threading

import pytest

from chatbot.llm import Body, BodyCut
from helpers import ScriptedSocket

KOREAN = "안녕하세요, 반갑습니다! 🙂".encode()


def pieces(*parts):
    """A socket whose reads hand out `parts`, one per recv; then the peer closes."""
    left = list(parts)
    return ScriptedSocket(lambda n: left.pop(0) if left else b"")


def read_all(body):
    out = b""
    while not body.ended:
        out += body.read(1)
    return out


def chunked(*parts, trailer=b""):
    encoded = b"".join(f"{len(p):x}".encode() + (b";ext=1" if i % 2 else b"") + b"\r\n" + p + b"\r\n"
                       for i, p in enumerate(parts))
    return encoded + b"0\r\n" + trailer + b"\r\n"


def split_at(data, cut):
    return [data[:cut], data[cut:]]


@pytest.mark.parametrize("cut", range(1, len(chunked(KOREAN[:7], KOREAN[7:]))))
def test_a_chunked_body_split_anywhere_reads_whole(cut):
    data = chunked(KOREAN[:7], KOREAN[7:], trailer=b"X-Trailer: yes\r\n")
    assert read_all(Body(pieces(*split_at(data, cut)), b"", chunked=True, length=None)) == KOREAN


def test_the_first_bytes_may_come_with_the_headers():
    data = chunked(b"data: one\n\n", b"data: two\n\n")
    body = Body(pieces(data[10:]), data[:10], chunked=True, length=None)
    assert read_all(body) == b"data: one\n\ndata: two\n\n"


def test_bytes_after_the_end_of_a_chunked_body_are_not_its_own():
    body = Body(pieces(chunked(b"abc") + b"HTTP/1.1 200 OK\r\n"), b"", chunked=True, length=None)
    assert read_all(body) == b"abc"


def test_a_content_length_body_ends_at_its_length():
    body = Body(pieces(b"hello", b" world and more"), b"", chunked=False, length=11)
    assert read_all(body) == b"hello world"
    assert Body(pieces(), b"", chunked=False, length=0).ended


def test_a_body_without_length_ends_when_the_connection_closes():
    body = Body(pieces(KOREAN[:5], KOREAN[5:]), b"", chunked=False, length=None)
    assert read_all(body) == KOREAN


@pytest.mark.parametrize("parts, chunked_, length", [
    ([b"5\r\nabc"], True, None),              # closed inside a chunk
    ([b"5\r\nabcde\r\n"], True, None),        # closed before the last chunk
    ([b"zz\r\nabc\r\n"], True, None),         # a size that is not hexadecimal
    ([b"3\r\nabcdef\r\n"], True, None),       # a chunk longer than its size
    ([b"x" * 5000], True, None),              # a size line with no end
    ([b"hello"], False, 10),                  # closed before Content-Length bytes came
])
def test_a_body_cut_short_or_malformed_is_cut(parts, chunked_, length):
    body = Body(pieces(*parts), b"", chunked=chunked_, length=length)
    with pytest.raises(BodyCut):
        read_all(body)


def test_a_read_waits_at_most_its_timeout_then_gives_what_came():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        body = Body(ours, b"", chunked=True, length=None)
        assert body.read(0.05) == b"" and not body.ended   # nothing yet: back after the timeout
        threading.Timer(0.1, theirs.sendall, [chunked(KOREAN)]).start()
        got = b""
        while not body.ended:
            got += body.read(5)
        assert got == KOREAN
