"""Cleaning a typed line (``bots/cli/keyboard.py``)."""

from __future__ import annotations

from bots.cli.keyboard import clean_line, history_path


def test_escape_sequences_and_controls_go_tabs_newlines_and_text_stay() -> None:
    typed = "a\x1b[1;5Cb\x1b]8;;http://x\x1b\\c\x1bOQd\x9b2~e\x00\x08\r\tf\nline two ünï €"
    assert clean_line(typed) == "abcde\tf\nline two ünï €"


def test_surrogates_from_undecodable_bytes_become_replacement_characters() -> None:
    assert clean_line(b"caf\xe9".decode("utf-8", "surrogateescape")) == "caf\ufffd"


def test_history_lives_next_to_a_sqlite_file_else_in_the_data_dir() -> None:
    assert str(history_path("sqlite+aiosqlite:////srv/bot/chat.db?mode=rwc")) == (
        "/srv/bot/chat.db.history"
    )
    assert history_path("postgresql+asyncpg://u@h/db").name == "chat_history"
    assert history_path("sqlite+aiosqlite:///:memory:").name == "chat_history"
