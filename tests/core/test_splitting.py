"""Markdown-aware splitting: cut places, fences closed and reopened, cuts kept once made."""

from __future__ import annotations

from core.splitting import Fence, Splitter, cut_chunk, fence_at_cut, fence_at_end


def fits_in(limit: int):  # type: ignore[no-untyped-def]
    return lambda markdown: len(markdown) <= limit


def messages(text: str, limit: int) -> list[str]:
    return [chunk.message(text) for chunk in Splitter(fits_in(limit)).chunks(text)]


def test_short_text_is_one_message() -> None:
    assert messages("hello world", 20) == ["hello world"]


def test_cuts_at_the_paragraph_break() -> None:
    text = "first paragraph here.\n\nsecond one is longer than that"
    assert messages(text, 40) == ["first paragraph here.\n\n", "second one is longer than that"]


def test_prefers_a_line_break_to_a_space() -> None:
    text = "alpha beta gamma delta\nepsilon zeta eta theta"
    assert messages(text, 30)[0] == "alpha beta gamma delta\n"


def test_cuts_between_words_when_there_is_no_line_break() -> None:
    text = "one two three four five six seven"
    parts = messages(text, 15)
    assert "".join(parts) == text
    assert all(len(part) <= 15 for part in parts)
    assert all(not part.startswith(" ") for part in parts)
    assert parts[0] == "one two three "


def test_cuts_inside_a_word_only_when_it_must() -> None:
    parts = messages("x" * 25, 10)
    assert parts == ["x" * 10, "x" * 10, "x" * 5]


def test_code_block_is_closed_and_reopened_with_its_info_string() -> None:
    code = "".join(f"line {n}\n" for n in range(10))
    text = f"Intro.\n\n```python\n{code}```\nAfter."
    parts = messages(text, 60)
    assert len(parts) > 1
    for part in parts:
        assert fence_at_end(part + "\n") is None, part
    assert parts[1].startswith("```python\n")
    assert parts[0].endswith("```")


def test_does_not_cut_in_a_word_inside_code_when_a_line_break_fits() -> None:
    text = "```\n" + "aaaa bbbb\n" * 8 + "```"
    parts = messages(text, 40)
    for part in parts[:-1]:
        assert part.endswith("\n```")


def test_longer_fences_and_tildes_are_reopened_as_they_were() -> None:
    text = "~~~~ sh\n" + "echo hi\n" * 10 + "~~~~\n"
    parts = messages(text, 40)
    assert parts[1].startswith("~~~~ sh\n")
    assert parts[0].endswith("~~~~")


def test_rendered_length_decides() -> None:
    # A renderer that doubles every character: the limit applies to the rendered text.
    def fits(markdown: str) -> bool:
        return len(markdown) * 2 <= 20

    chunks = Splitter(fits).chunks("abcdefghij klmnop")
    assert all(len(chunk.message("abcdefghij klmnop")) <= 10 for chunk in chunks)


def test_cuts_are_kept_as_text_grows() -> None:
    splitter = Splitter(fits_in(30))
    text = "aaaa bbbb cccc dddd eeee ffff gggg"
    first = splitter.chunks(text)
    assert len(first) == 2
    grown = text + "\n\n" + "hhhh " * 3
    second = splitter.chunks(grown)
    assert second[0] == first[0]
    splitter.reset()
    assert splitter.chunks("short")[0].end == 5


def test_cut_chunk_returns_none_when_everything_fits() -> None:
    assert cut_chunk("abc", 0, None, fits_in(10)) is None


def test_an_opening_line_longer_than_a_message_is_cut_and_its_block_closed() -> None:
    info = "python title=" + "x" * 100
    text = f"Intro.\n\n```{info}\nprint(1)\n```\nAfter."
    parts = messages(text, 60)
    # The line is cut like any over-long line; the message it starts in closes the block it
    # opens, and the rest of the line continues in a block reopened with the bare fence.
    assert parts == [
        "Intro.\n\n",
        "```python title=" + "x" * 40 + "\n```",
        "```\n" + "x" * 52 + "\n```",
        "```\n" + "x" * 8 + "\nprint(1)\n```\nAfter.",
    ]
    assert all(fence_at_end(part + "\n") is None for part in parts)


def test_a_long_opening_line_is_reopened_as_the_bare_fence() -> None:
    opening = "```python title=" + "y" * 30  # more than half of a 60-character message
    text = opening + "\n" + "".join(f"line {n}\n" for n in range(10)) + "```"
    parts = messages(text, 60)
    assert parts[0] == opening + "\nline 0\n```"
    assert all(part.startswith("```\nline ") for part in parts[1:])
    assert all(len(part) <= 60 and fence_at_end(part + "\n") is None for part in parts)
    # Every cut is at a line break: each message but the last ends with a close after a newline.
    body = parts[0].removesuffix("```") + "".join(
        part.removeprefix("```\n").removesuffix("```") for part in parts[1:-1]
    )
    assert body + parts[-1].removeprefix("```\n") == text


def test_an_opening_line_that_nearly_fills_a_message_leaves_every_message_within_the_limit() -> (
    None
):
    # 57 characters: with its newline and a closing fence it no longer fits in 60.
    opening = "```python title=" + "y" * 41
    text = opening + "\n" + "".join(f"line {n}\n" for n in range(10)) + "```"
    parts = messages(text, 60)
    assert all(len(part) <= 60 and fence_at_end(part + "\n") is None for part in parts)
    assert parts[0] == opening[:-1] + "\n```"
    assert parts[1].startswith("```\ny\nline 0\n")


def test_a_cut_inside_a_line_that_is_not_a_fence_adds_no_fence() -> None:
    parts = messages("a" * 25, 10)
    assert all("`" not in part for part in parts)
    assert fence_at_cut("```" + "a" * 20, 0, 10, None) == Fence("```", "`", 3)
    assert fence_at_cut("``" + "a" * 20, 0, 10, None) is None
