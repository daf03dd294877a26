"""core.metrics: bounded labels, retry causes, settings, and multiprocess mode across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.config import Settings
from core.errors import ConfigError, TransientProviderError
from core.metrics import Metrics, retry_cause, scope_kind


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("slack:T0001:chat.update", "slack:chat.update"),
        ("slack:T0001:C0001:chat.postMessage", "slack:chat.postMessage"),
        ("discord:channel:123456789012345678:edit", "discord:channel:edit"),
        ("discord:bot", "discord:bot"),
        ("slack:T0001:12345", "slack:other"),
        ("nonsense", "other"),
    ],
)
def test_scope_kind_strips_ids(key: str, kind: str) -> None:
    assert scope_kind(key) == kind


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (TransientProviderError("429", status=429), "rate_limit"),
        (TransientProviderError("529", status=529), "overload"),
        (TransientProviderError("503", status=503), "overload"),
        (TransientProviderError("500", status=500), "server_error"),
        (TransientProviderError("mid-stream error event"), "server_error"),
        (TransientProviderError("slow", reason="timeout"), "timeout"),
        (TransientProviderError("refused", reason="connection"), "connection"),
    ],
)
def test_retry_cause(error: TransientProviderError, cause: str) -> None:
    assert retry_cause(error) == cause


@pytest.mark.parametrize(
    ("name", "raw"),
    [("METRICS_PORT", "0"), ("METRICS_PORT", "x"), ("LOG_FORMAT", "xml"),
     ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
)  # fmt: skip
def test_bad_settings_name_the_setting(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({name: raw})
    assert caught.value.setting == name
    assert name in str(caught.value)


def test_settings_defaults_and_values() -> None:
    assert Settings.from_mapping({}).metrics_port is None
    assert Settings.from_mapping({}).log_format == "text"
    settings = Settings.from_mapping(
        {
            "METRICS_PORT": "9100",
            "LOG_FORMAT": "JSON",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
        }
    )
    assert (settings.metrics_port, settings.log_format) == (9100, "json")
    assert settings.otel_exporter_otlp_endpoint == "http://c:4318"


WORKER = """
from core.metrics import Metrics
metrics = Metrics()
metrics.turn_ended("slack", "answered")
metrics.model_call("openai", "m", 0.5, input_tokens=10, output_tokens=3)
"""


def test_multiprocess_dir_sums_every_worker(tmp_path: Path) -> None:
    """Pre-forked workers behind one port: each writes its own files, a scrape sums them."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", WORKER], env=env, check=True, timeout=60)
    text = Metrics(multiprocess_dir=str(tmp_path)).exposition().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    answered = (("threadbot_outcome", "answered"), ("threadbot_platform", "slack"))
    assert samples[("threadbot_turns_total", answered)] == 2
    output = tuple(
        sorted({"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai",
                "gen_ai_request_model": "m", "gen_ai_token_type": "output"}.items())
    )  # fmt: skip
    assert samples[("gen_ai_client_token_usage_sum", output)] == 6
