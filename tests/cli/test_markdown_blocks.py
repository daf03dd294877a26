"""How streamed Markdown is cut into blocks that render on their own (``bots/cli/output.py``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bots.cli.output import MarkdownBlocks

ANSWER = (
    "Intro with **bold**.\n\n"
    "```python\ndef f():\n\n    return 1\n```\n\n"
    "1. one\n\n   still one\n2. two\n\n"
    "Last words."
)


def feed_all(chunks: list[str]) -> tuple[list[str], str]:
    blocks = MarkdownBlocks()
    done = [block for chunk in chunks for block in blocks.feed(chunk)]
    return done, blocks.flush()


def test_blocks_end_at_paragraphs_and_closing_fences_not_inside_code_or_list_items() -> None:
    done, rest = feed_all([ANSWER])
    assert [block.strip("\n") for block in done] == [
        "Intro with **bold**.",
        "```python\ndef f():\n\n    return 1\n```",
        "1. one\n\n   still one\n2. two",
    ]
    assert rest == "Last words."


def test_a_block_is_handed_out_as_soon_as_the_next_one_starts() -> None:
    blocks = MarkdownBlocks()
    assert blocks.feed("First.\n\n") == []
    assert blocks.feed("S") == ["First.\n\n"]
    assert blocks.pending == "S"


def test_an_open_fence_is_reported_for_the_preview() -> None:
    blocks = MarkdownBlocks()
    blocks.feed("~~~~\ncode\n\nmore")
    assert blocks.open_fence == "~~~~"
    assert blocks.feed("\n~~~~\n") == ["~~~~\ncode\n\nmore\n~~~~\n"]
    assert blocks.open_fence is None


@given(st.lists(st.integers(min_value=1, max_value=len(ANSWER)), max_size=20))
def test_any_chunking_gives_the_same_blocks_and_loses_nothing(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [ANSWER[a:b] for a, b in zip([0, *points], [*points, len(ANSWER)], strict=True)]
    done, rest = feed_all(chunks)
    # Only the blank lines between blocks may go (each block is rendered on its own).
    assert ("".join(done) + rest).replace("\n", "") == ANSWER.replace("\n", "")
    assert (done, rest) == feed_all([ANSWER])
