"""A running reply's text in memory (generation.Pieces): every piece and
position comes back exactly, before and after older pieces are folded into
one string, with Korean and characters outside the BMP."""
import random

from chatbot.generation import Pieces

WORDS = ["안녕", "하세요 ", "😀", "a", "단어12 ", "é", "\n", "𝄞음악"]


def filled(count):
    pieces, texts = Pieces(), []
    rng = random.Random(count)
    for _ in range(count):
        texts.append(rng.choice(WORDS))
        pieces.append(texts[-1])
    return pieces, texts


def test_every_piece_after_every_position_comes_back_whole():
    for count in (0, 1, Pieces.FOLD - 1, Pieces.FOLD, Pieces.FOLD + 1, 3 * Pieces.FOLD + 5):
        pieces, texts = filled(count)
        ends = [sum(len(t) for t in texts[:i + 1]) for i in range(count)]
        assert len(pieces) == count and pieces.length == (ends[-1] if ends else 0)
        for position in range(pieces.length + 1):
            expected = [(end, text) for end, text in zip(ends, texts) if end > position]
            assert pieces.after(position) == expected, (count, position)


def test_the_text_between_any_two_positions():
    pieces, texts = filled(2 * Pieces.FOLD + 7)
    whole = "".join(texts)
    assert pieces.folded and pieces.recent   # both parts are in play
    assert pieces.text() == whole
    for start in range(0, len(whole) + 1, 3):
        for end in range(start, len(whole) + 1, 5):
            assert pieces.text(start, end) == whole[start:end], (start, end)
        assert pieces.text(start) == whole[start:]


def test_older_pieces_are_folded_into_one_string():
    pieces, texts = filled(5 * Pieces.FOLD + 3)
    assert len(pieces.recent) == 3
    assert pieces.folded == "".join(texts[:5 * Pieces.FOLD])
