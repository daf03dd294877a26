"""Token counting that works offline.

A real tokenizer is used where one can be loaded without the network: tiktoken, for OpenAI
models, with an encoding file already in tiktoken's cache. tiktoken downloads a missing encoding
on first use, so ``load_cached_encoding`` checks the cache (and the file's hash) itself and never
lets tiktoken reach for the network. Otherwise ``estimate_tokens``, fitted against a real
tokenizer (below), and scaled by a ``Calibration`` learned from the input tokens the provider
reports for every request, whatever the history strategy.

How the estimate was fitted: 57 samples (1,500-character slices of this project's Markdown and
Python, plus short English, German and French chat messages) counted by llama.cpp's ``/tokenize``
for SmolLM2-135M-Instruct (a 49k-token BPE vocabulary, as small open models have). A flat
3.5 characters a token came to 1.05× the real count on average but ranged from 0.73× to 1.37×
(code and punctuation cost more tokens a character, plain words fewer). Counting letters and
digits at 3.6 a token, ASCII punctuation and symbols at 1.25, every other character (accents,
other scripts, emoji) as one token and whitespace as free (BPE joins a space to the next word)
came to 1.005× on average with half the squared error. It under-counts languages the vocabulary
was not built for (German 0.66×, French 0.79×): the calibration corrects that, and whatever else
is left, for the model actually in use.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import string
import tempfile
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from core.config import Settings

log = logging.getLogger(__name__)

#: ASCII letters and digits per token in the estimate (see the module docstring for the fit).
CHARS_PER_TOKEN = 3.6
#: ASCII punctuation and symbols per token: code and Markdown are dense in them.
SYMBOL_CHARS_PER_TOKEN = 1.25
#: Tokens per character outside ASCII: byte-level BPE vocabularies of small models spend about
#: one token on each accented letter, and more on other scripts.
NON_ASCII_TOKENS_PER_CHAR = 1.0
_ALNUM_BYTES = (string.ascii_letters + string.digits).encode()
_SPACE_BYTES = string.whitespace.encode()
#: Tokens a chat API adds around each message (role and separators).
MESSAGE_OVERHEAD_TOKENS = 4

#: Where tiktoken downloads each encoding it can use for chat models, and the file's sha256
#: (source: tiktoken_ext/openai_public.py, tiktoken 0.14). Only these are ever loaded.
TIKTOKEN_ENCODING_FILES: dict[str, tuple[str, str]] = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
#: The encoding of every current OpenAI chat model (gpt-4o, gpt-4.1, gpt-5, o-series); used for
#: the openai provider when LLM_MODEL is not set (source: tiktoken/model.py).
DEFAULT_OPENAI_ENCODING = "o200k_base"

#: Reported/estimated ratios outside this range are taken as bad data, not as a calibration.
CALIBRATION_RATIO_RANGE = (0.25, 4.0)
#: Observations needed before the calibration is applied at all.
CALIBRATION_MIN_SAMPLES = 3
#: Weight of the newest observation in the running ratio.
CALIBRATION_WEIGHT = 0.2
#: Added on top of the learned ratio, so the calibrated estimate still errs on the safe side.
CALIBRATION_MARGIN = 1.05

#: Shown where a message was cut to fit the budget; ``{cut}`` is how many characters were left out.
TRUNCATION_MARKER = "\n\n[… {cut:,} characters cut here to fit the history token budget …]\n\n"
#: Any ``TRUNCATION_MARKER``, with the blank lines around it.
TRUNCATION_MARKER_PATTERN = re.compile(
    r"\s*\[… [\d,]+ characters cut here to fit the history token budget …\]\s*"
)
# Of the text kept around the marker, the share taken from the start (the rest from the end):
# the opening usually says what a long paste is, the end what is asked about it.
TRUNCATION_HEAD_SHARE = 2 / 3


def estimate_tokens(text: str) -> int:
    """An estimate of the tokens in ``text`` without a tokenizer (see the module docstring)."""
    if not text:
        return 0
    ascii_only = text.encode("ascii", "ignore")
    non_ascii = len(text) - len(ascii_only)
    alnum = len(ascii_only) - len(ascii_only.translate(None, _ALNUM_BYTES))
    space = len(ascii_only) - len(ascii_only.translate(None, _SPACE_BYTES))
    symbols = len(ascii_only) - alnum - space
    tokens = (
        alnum / CHARS_PER_TOKEN
        + symbols / SYMBOL_CHARS_PER_TOKEN
        + non_ascii * NON_ASCII_TOKENS_PER_CHAR
    )
    # Whitespace alone is still a token or so.
    return max(1, math.ceil(tokens))


def without_cut_markers(text: str) -> str:
    """``text`` with every history cut marker taken out (a paragraph break left in its place)."""
    return TRUNCATION_MARKER_PATTERN.sub("\n\n", text).strip()


class Encoder(Protocol):
    """The part of ``tiktoken.Encoding`` a counter uses."""

    name: str

    def encode_ordinary(self, text: str) -> list[int]: ...


class Calibration:
    """A running ratio of provider-reported input tokens to our estimate of the same request."""

    def __init__(self) -> None:
        self.samples = 0
        self.ratio = 1.0

    def observe(self, estimated: int, reported: int) -> None:
        """Learn from one request: we estimated ``estimated`` tokens, the provider counted ``reported``."""
        if estimated <= 0 or reported <= 0:
            return
        ratio = reported / estimated
        low, high = CALIBRATION_RATIO_RANGE
        if not low <= ratio <= high:
            log.debug("ignoring token usage %d for an estimate of %d", reported, estimated)
            return
        self.ratio = (
            ratio
            if self.samples == 0
            else (CALIBRATION_WEIGHT * ratio + (1 - CALIBRATION_WEIGHT) * self.ratio)
        )
        self.samples += 1

    @property
    def factor(self) -> float:
        """What to multiply the estimate by (1.0 until enough requests were observed)."""
        if self.samples < CALIBRATION_MIN_SAMPLES:
            return 1.0
        return self.ratio * CALIBRATION_MARGIN


class TokenCounter:
    """Counts tokens: exactly with a tiktoken encoding, else the estimate scaled by a calibration.

    One counter is shared by every turn that uses the same provider and model (``counter_for``),
    so what it learns from reported usage carries over from turn to turn.
    """

    def __init__(self, encoding: Encoder | None = None) -> None:
        self.encoding = encoding
        self.calibration = Calibration()
        self._count: Callable[[str], int]
        if encoding is None:
            self._count = self._estimate
        else:
            # Windows are rebuilt every turn from mostly the same messages: remember their counts.
            self._count = lru_cache(maxsize=1024)(self._encode_count)

    @property
    def exact(self) -> bool:
        """Whether counts come from the model's own tokenizer."""
        return self.encoding is not None

    @property
    def name(self) -> str:
        """How tokens are counted, for operators and ``/context``."""
        if self.encoding is not None:
            return f"tiktoken {self.encoding.name}"
        factor = self.calibration.factor
        if factor == 1.0:
            return "estimate"
        return f"estimate, calibrated ×{factor:.2f} from reported usage"

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        return self._count(text) if text else 0

    def message(self, content: str) -> int:
        """Tokens one chat message with ``content`` costs, framing included."""
        return self.count(content) + MESSAGE_OVERHEAD_TOKENS

    def observe(self, estimated_raw: int, reported: int) -> None:
        """Learn from a request's reported input tokens (estimate-based counters only)."""
        if self.encoding is None:
            self.calibration.observe(estimated_raw, reported)

    def truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut in the middle, with a visible marker, to at most ``max_tokens`` tokens.

        Keeps the start and the end of the text. Returns ``text`` itself when it already fits, and
        just the marker when not even that much room is left.
        """
        total = self.count(text)
        if total <= max_tokens:
            return text
        chars_per_token = len(text) / total
        keep = int(
            (max_tokens - self.count(TRUNCATION_MARKER.format(cut=len(text)))) * chars_per_token
        )
        # Tokenizers do not cut text where characters do: shrink until the result fits.
        for _ in range(12):
            if keep <= 0:
                break
            head = int(keep * TRUNCATION_HEAD_SHARE)
            tail = keep - head
            candidate = (
                text[:head].rstrip()
                + TRUNCATION_MARKER.format(cut=len(text) - keep)
                + (text[len(text) - tail :].lstrip() if tail else "")
            )
            if self.count(candidate) <= max_tokens:
                return candidate
            keep = int(keep * 0.9)
        return TRUNCATION_MARKER.format(cut=len(text)).strip()

    def clip(self, text: str, max_tokens: int) -> str:
        """``text``'s start, to at most ``max_tokens`` tokens, ended at a line or sentence.

        Unlike ``truncate`` no marker is added: for text the bot keeps as its own (a summary).
        """
        if self.count(text) <= max_tokens:
            return text
        keep = int(len(text) * max_tokens / max(1, self.count(text)))
        while keep > 0:
            head = text[:keep]
            end = max(head.rfind("\n"), head.rfind(". "))
            candidate = (head[: end + 1] if end > 0 else head).rstrip()
            if self.count(candidate) <= max_tokens:
                return candidate
            keep = int(keep * 0.9)
        return ""

    def _estimate(self, text: str) -> int:
        return math.ceil(estimate_tokens(text) * self.calibration.factor)

    def _encode_count(self, text: str) -> int:
        assert self.encoding is not None
        return len(self.encoding.encode_ordinary(text))


def tiktoken_cache_dir(environ: Mapping[str, str]) -> Path | None:
    """Where tiktoken keeps downloaded encodings, by tiktoken's own rule (None: caching is off)."""
    if "TIKTOKEN_CACHE_DIR" in environ:
        value = environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in environ:
        value = environ["DATA_GYM_CACHE_DIR"]
    else:
        value = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(value) if value else None


def cached_encoding_file(name: str, cache_dir: Path | None) -> Path | None:
    """The cached file of encoding ``name`` when it is present and intact, else None."""
    if cache_dir is None or name not in TIKTOKEN_ENCODING_FILES:
        return None
    url, sha256 = TIKTOKEN_ENCODING_FILES[name]
    # tiktoken names a cached file by the sha1 of the address it came from (tiktoken/load.py).
    path = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    try:
        data = path.read_bytes()
    except OSError:
        return None
    # A file that does not match would make tiktoken download it again: treat it as absent.
    return path if hashlib.sha256(data).hexdigest() == sha256 else None


def encoding_name(provider: str, model: str | None) -> str | None:
    """The tiktoken encoding for ``provider``'s ``model``, or None when tiktoken does not know it."""
    if provider != "openai":
        # Anthropic's tokenizer is not public; an OpenAI-compatible server's model is looked up.
        return None
    if model is None:
        return DEFAULT_OPENAI_ENCODING
    from tiktoken.model import encoding_name_for_model

    try:
        name: str = encoding_name_for_model(model)
    except KeyError:
        return None  # a local model behind OPENAI_BASE_URL (llama, qwen, ...): estimate instead
    return name if name in TIKTOKEN_ENCODING_FILES else None


def load_cached_encoding(name: str, cache_dir: Path | None) -> Encoder | None:
    """The tiktoken encoding ``name`` if its file is already cached, without touching the network."""
    if cached_encoding_file(name, cache_dir) is None:
        return None
    import tiktoken

    try:
        encoding: Encoder = tiktoken.get_encoding(name)
    except Exception as error:  # a corrupt or unreadable cache: the estimate still works
        log.warning("tiktoken encoding %s could not be loaded (%s); estimating tokens", name, error)
        return None
    return encoding


_counters: dict[tuple[str, str | None], TokenCounter] = {}


def counter_for(settings: Settings) -> TokenCounter:
    """The shared token counter for the configured provider and model."""
    key = (settings.llm_provider, settings.llm_model)
    counter = _counters.get(key)
    if counter is None:
        name = encoding_name(settings.llm_provider, settings.llm_model)
        encoding = None
        if name is not None:
            # tiktoken reads its cache location from the process environment when it loads, so
            # this must look where tiktoken will look: its variables, not ours (not Settings).
            encoding = load_cached_encoding(name, tiktoken_cache_dir(os.environ))
            if encoding is None:
                log.info(
                    "tiktoken encoding %s is not cached (it is never downloaded); estimating "
                    "tokens instead. Set TIKTOKEN_CACHE_DIR to a directory holding it to count "
                    "exactly.",
                    name,
                )
        counter = _counters[key] = TokenCounter(encoding)
    return counter
