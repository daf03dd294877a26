"""Metrics of one process: a Prometheus registry, and OpenTelemetry's SDK beside it when asked.

``Metrics`` owns every instrument. The front door, the engine and the streamer feed it through a
few calls (``model_call``, ``provider_retry``, ``queued``, ``turn_ended``, ``reply_times``, and a
``PlatformCalls`` observer per reply); nothing else touches prometheus-client or OpenTelemetry.
Model-call figures follow the OpenTelemetry GenAI semantic conventions (``gen_ai.*``: in
Prometheus dots become underscores and the unit is suffixed, ``gen_ai_client_token_usage``).

Labels are bounded: platform names, call kinds, outcomes, causes, the configured model, and
rate-limit scopes with their ids stripped (``slack:chat.update``); never a user, channel,
message id or text. With ``OTEL_EXPORTER_OTLP_ENDPOINT`` the same figures, and a span per turn,
go out over OTLP/HTTP (``/v1/metrics``, ``/v1/traces``). With ``PROMETHEUS_MULTIPROC_DIR``,
``/metrics`` sums the files of every worker sharing the directory (prometheus-client's
multiprocess mode, for pre-forked workers behind one port).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.config import Settings
from core.errors import TransientProviderError

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter
    from opentelemetry.trace import Span, Tracer

#: The content type of ``exposition()`` (the Prometheus text format).
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: The OpenTelemetry instrumentation scope and service name of our figures and spans.
SCOPE = "threadbot"
#: The GenAI operation every model call is (``gen_ai.operation.name``).
CHAT_OPERATION = "chat"
#: OTLP/HTTP paths under ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the OTLP exporter specification).
OTLP_METRICS_PATH = "/v1/metrics"
OTLP_TRACES_PATH = "/v1/traces"

# Bucket boundaries the GenAI semantic conventions advise for each histogram.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)  # fmt: skip
FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip
#: Seconds a person waits: the first visible text, the final text, a place in line.
WAIT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

#: A rate-limit scope key's middle parts kept in its label (others are ids: stripped).
_SCOPE_WORD = re.compile(r"[a-z]+")
#: A scope key's last part (a method or call name) as it may appear in a label.
_SCOPE_CALL = re.compile(r"[A-Za-z][A-Za-z._]*")
#: HTTP statuses that mean overload rather than a server error (529: Anthropic's overloaded).
_OVERLOAD_STATUSES = frozenset({503, 529})

RetryCause = Literal["rate_limit", "server_error", "overload", "timeout", "connection"]


@dataclass(frozen=True, slots=True)
class _Spec:
    """One figure: its OpenTelemetry name, its Prometheus name, its labels (OTel spelling)."""

    otel: str
    prom: str
    help: str
    labels: tuple[str, ...]
    unit: str = ""
    buckets: tuple[float, ...] = ()  # empty: a counter

    @property
    def prom_labels(self) -> list[str]:
        return [label.replace(".", "_") for label in self.labels]


_MODEL = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model")
OPERATION_DURATION = _Spec(
    "gen_ai.client.operation.duration", "gen_ai_client_operation_duration_seconds",
    "Seconds one model call took, to the end of its stream or its failure.",
    (*_MODEL, "error.type"), "s", DURATION_BUCKETS,
)  # fmt: skip
FIRST_TOKEN = _Spec(
    "gen_ai.server.time_to_first_token", "gen_ai_server_time_to_first_token_seconds",
    "Seconds from a model call's start to its first streamed text.",
    _MODEL, "s", FIRST_TOKEN_BUCKETS,
)  # fmt: skip
TOKEN_USAGE = _Spec(
    "gen_ai.client.token.usage", "gen_ai_client_token_usage",
    "Tokens one model call used, as the provider reported them.",
    (*_MODEL, "gen_ai.token.type"), "{token}", TOKEN_BUCKETS,
)  # fmt: skip
FIRST_TEXT = _Spec(
    "threadbot.reply.first_text.duration", "threadbot_reply_first_text_seconds",
    "Seconds from the user's message to the first answer text shown on the platform.",
    ("threadbot.platform",), "s", WAIT_BUCKETS,
)  # fmt: skip
FINAL_TEXT = _Spec(
    "threadbot.reply.final_text.duration", "threadbot_reply_final_text_seconds",
    "Seconds from the user's message to the final answer text shown on the platform.",
    ("threadbot.platform",), "s", WAIT_BUCKETS,
)  # fmt: skip
QUEUED = _Spec(
    "threadbot.turn.queued.duration", "threadbot_turn_queued_seconds",
    "Seconds a turn waited behind another turn of its conversation.",
    ("threadbot.platform",), "s", WAIT_BUCKETS,
)  # fmt: skip
PLATFORM_CALLS = _Spec(
    "threadbot.platform.calls", "threadbot_platform_calls",
    "Platform calls the streamer made, by kind (post, edit, start, append, stop).",
    ("threadbot.platform", "threadbot.call"), "{call}",
)  # fmt: skip
RATE_LIMITED = _Spec(
    "threadbot.platform.rate_limited", "threadbot_platform_rate_limited",
    "429 answers from a platform, by rate-limit scope kind (ids stripped).",
    ("threadbot.scope",), "{response}",
)  # fmt: skip
RETRIES = _Spec(
    "threadbot.provider.retries", "threadbot_provider_retries",
    "Model calls retried, by cause.", ("threadbot.cause",), "{retry}",
)  # fmt: skip
TURNS = _Spec(
    "threadbot.turns", "threadbot_turns",
    "Turns ended, by outcome (answered, failed, stopped, interrupted).",
    ("threadbot.platform", "threadbot.outcome"), "{turn}",
)  # fmt: skip
FEEDBACK = _Spec(
    "threadbot.feedback", "threadbot_feedback",
    "Feedback clicks on answers, by value.", ("threadbot.platform", "threadbot.value"), "{click}",
)  # fmt: skip
SPECS = (OPERATION_DURATION, FIRST_TOKEN, TOKEN_USAGE, FIRST_TEXT, FINAL_TEXT, QUEUED,
         PLATFORM_CALLS, RATE_LIMITED, RETRIES, TURNS, FEEDBACK)  # fmt: skip


class _Instrument:
    """One figure in Prometheus, and in OpenTelemetry when a meter is given."""

    def __init__(self, spec: _Spec, registry: CollectorRegistry, meter: Meter | None) -> None:
        self.spec = spec
        self._prom: Counter | Histogram
        self._otel: Any = None
        if spec.buckets:
            self._prom = Histogram(
                spec.prom, spec.help, spec.prom_labels, registry=registry, buckets=spec.buckets
            )
            if meter is not None:
                self._otel = meter.create_histogram(
                    spec.otel, spec.unit, spec.help,
                    explicit_bucket_boundaries_advisory=spec.buckets,
                )  # fmt: skip
        else:
            self._prom = Counter(spec.prom, spec.help, spec.prom_labels, registry=registry)
            if meter is not None:
                self._otel = meter.create_counter(spec.otel, spec.unit, spec.help)

    def record(self, value: float, *labels: str) -> None:
        """Observe ``value`` (a histogram) or add it (a counter) under ``labels`` in spec order."""
        child = self._prom.labels(*labels)
        if isinstance(child, Histogram):
            child.observe(value)
        else:
            child.inc(value)
        if self._otel is not None:
            # An empty value (``error.type`` of a call that succeeded) is no attribute at all.
            attributes = {k: v for k, v in zip(self.spec.labels, labels, strict=True) if v}
            if self.spec.buckets:
                self._otel.record(value, attributes)
            else:
                self._otel.add(value, attributes)


def scope_kind(key: str) -> str:
    """A rate-limit scope key with its ids stripped: ``slack:T1:chat.update`` -> ``slack:chat.update``,
    ``discord:channel:42:edit`` -> ``discord:channel:edit``; a label of bounded values."""
    parts = key.split(":")
    if len(parts) < 2:
        return "other"
    middle = [part for part in parts[1:-1] if _SCOPE_WORD.fullmatch(part)]
    call = parts[-1] if _SCOPE_CALL.fullmatch(parts[-1]) else "other"
    platform = parts[0] if _SCOPE_WORD.fullmatch(parts[0]) else "other"
    return ":".join([platform, *middle, call])


def retry_cause(error: TransientProviderError) -> RetryCause:
    """Why a model call is retried, from the error's status or its stated reason."""
    status = error.status
    if status == 429:
        return "rate_limit"
    if status in _OVERLOAD_STATUSES:
        return "overload"
    if status == 408 or error.reason == "timeout":
        return "timeout"
    if status is not None or error.reason is None:
        # Other transient statuses, and error events inside a stream the server had accepted.
        return "server_error"
    return "connection"


class PlatformCalls:
    """What one platform's streamer reports as it calls the platform (``CallObserver``)."""

    def __init__(self, metrics: Metrics, platform: str) -> None:
        self._metrics = metrics
        self._platform = platform

    def call(self, kind: str) -> None:
        """One call of ``kind`` (post, edit, start, append, stop) was made."""
        self._metrics.instruments[PLATFORM_CALLS].record(1, self._platform, kind)

    def rate_limited(self, scope: str) -> None:
        """The platform answered 429 in rate-limit scope ``scope`` (a key with ids)."""
        self._metrics.instruments[RATE_LIMITED].record(1, scope_kind(scope))


class Metrics:
    """Every figure of this process (see the module docstring)."""

    def __init__(
        self,
        *,
        multiprocess_dir: str | None = None,
        meter: Meter | None = None,
        tracer: Tracer | None = None,
        providers: Sequence[Any] = (),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiprocess_dir = multiprocess_dir
        self._tracer = tracer
        # OpenTelemetry's meter and tracer providers: flushed and shut down by ``close``.
        self._providers = list(providers)
        self.instruments = {spec: _Instrument(spec, self.registry, meter) for spec in SPECS}

    @classmethod
    def from_settings(cls, settings: Settings) -> Metrics:
        """Prometheus always; OpenTelemetry too when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""
        endpoint = settings.otel_exporter_otlp_endpoint
        if endpoint is None:
            return cls(multiprocess_dir=settings.prometheus_multiproc_dir)
        meter, tracer, providers = _otlp(endpoint)
        return cls(
            multiprocess_dir=settings.prometheus_multiproc_dir,
            meter=meter,
            tracer=tracer,
            providers=providers,
        )

    # -- what the front door, the engine and the streamer report --------------------------------

    def model_call(
        self,
        provider: str,
        model: str,
        seconds: float,
        *,
        first_token: float | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        error: str | None = None,
    ) -> None:
        """One model call (one attempt): its duration, first token, tokens; ``error`` its type."""
        labels = (CHAT_OPERATION, provider, model)
        self.instruments[OPERATION_DURATION].record(seconds, *labels, error or "")
        if first_token is not None:
            self.instruments[FIRST_TOKEN].record(first_token, *labels)
        for kind, tokens in (("input", input_tokens), ("output", output_tokens)):
            if tokens is not None:
                self.instruments[TOKEN_USAGE].record(tokens, *labels, kind)

    def provider_retry(self, error: TransientProviderError) -> None:
        """A model call is about to be retried after ``error``."""
        self.instruments[RETRIES].record(1, retry_cause(error))

    def queued(self, platform: str, seconds: float) -> None:
        """A turn waited ``seconds`` behind another turn of its conversation."""
        self.instruments[QUEUED].record(seconds, platform)

    def turn_ended(self, platform: str, outcome: str) -> None:
        """A turn ended: answered, failed, stopped or interrupted."""
        self.instruments[TURNS].record(1, platform, outcome)

    def reply_times(
        self, platform: str, first_text: float | None, final_text: float | None
    ) -> None:
        """Seconds from the user's message to the first and to the final text shown."""
        if first_text is not None:
            self.instruments[FIRST_TEXT].record(first_text, platform)
        if final_text is not None:
            self.instruments[FINAL_TEXT].record(final_text, platform)

    def feedback(self, platform: str, value: str) -> None:
        """A feedback click (``good`` / ``bad``) on an answer."""
        self.instruments[FEEDBACK].record(1, platform, value)

    def calls(self, platform: str) -> PlatformCalls:
        """The observer a streamer on ``platform`` reports its calls and 429s to."""
        return PlatformCalls(self, platform)

    @contextlib.contextmanager
    def turn_span(self, platform: str, conversation: str) -> Iterator[Span | None]:
        """A span around one turn when OpenTelemetry is on (None otherwise)."""
        if self._tracer is None:
            yield None
            return
        with self._tracer.start_as_current_span(
            "threadbot.turn",
            attributes={"threadbot.platform": platform, "threadbot.conversation": conversation},
        ) as span:
            yield span

    # -- out ----------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of every worker in the multiprocess dir."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def close(self) -> None:
        """Export what OpenTelemetry still holds and stop its exporters (blocking calls: in a
        thread)."""
        providers, self._providers = self._providers, []
        for provider in providers:
            await asyncio.to_thread(provider.shutdown)


def _otlp(endpoint: str) -> tuple[Meter, Tracer, list[Any]]:
    """OpenTelemetry's SDK exporting to ``endpoint`` over OTLP/HTTP (protobuf)."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": SCOPE})
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=endpoint + OTLP_METRICS_PATH)
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint + OTLP_TRACES_PATH))
    )
    return (
        meter_provider.get_meter(SCOPE),
        tracer_provider.get_tracer(SCOPE),
        [meter_provider, tracer_provider],
    )
