"""An experiment report as one self-contained HTML page: a table and an inline SVG chart of each
variant's thumbs-up share with its 95% interval (no scripts, styles or images from elsewhere)."""

from __future__ import annotations

from html import escape

from core.experiment_report import ExperimentReport, VariantReport

#: Chart geometry, in SVG user units.
CHART_WIDTH = 640
ROW_HEIGHT = 36
LABEL_WIDTH = 140
RIGHT_MARGIN = 60
TOP_MARGIN = 24
POINT_RADIUS = 5
PERCENT = 100
GRID_STEPS = (0, 25, 50, 75, 100)

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { padding: 0.3rem 0.7rem; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.verdict { font-size: 1.2rem; font-weight: 600; }
"""


def render_page(report: ExperimentReport) -> str:
    """The whole page."""
    title = f"Experiment {escape(report.experiment)}"
    difference = report.difference
    if difference.estimate is None or difference.ci_low is None or difference.ci_high is None:
        compared = "not enough ratings to compare yet"
    else:
        compared = (
            f"{escape(difference.to_variant)} − {escape(difference.from_variant)}: "
            f"{_signed(difference.estimate)} points "
            f"(95% interval {_signed(difference.ci_low)} to {_signed(difference.ci_high)}, "
            "bootstrap over conversations)"
        )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{STYLE}</style></head><body>"
        f"<h1>{title}</h1><p>{escape(report.status)}; "
        f"{report.excluded} conversations excluded (own prompt)</p>"
        f"<p class='verdict'>{escape(report.verdict)}</p>"
        f"{_chart(report.variants)}{_table(report.variants)}"
        f"<p>{compared}</p><p>Sample ratio check: p = {report.srm_p:.3g}</p>"
        "</body></html>\n"
    )


def _chart(variants: tuple[VariantReport, ...]) -> str:
    """Each variant's share (a dot) and its interval (a bar), on a 0-100% axis."""
    height = TOP_MARGIN + ROW_HEIGHT * len(variants)
    span = CHART_WIDTH - LABEL_WIDTH - RIGHT_MARGIN

    def x(share: float) -> float:
        return LABEL_WIDTH + share * span

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{CHART_WIDTH}' height='{height}' "
        f"role='img' aria-label='thumbs-up share per variant with 95% intervals'>"
    ]
    for step in GRID_STEPS:
        at = x(step / PERCENT)
        parts.append(
            f"<line x1='{at:.1f}' y1='{TOP_MARGIN - 8}' x2='{at:.1f}' y2='{height}' "
            "stroke='#ddd'/>"
            f"<text x='{at:.1f}' y='{TOP_MARGIN - 12}' font-size='11' "
            f"text-anchor='middle'>{step}%</text>"
        )
    for row, variant in enumerate(variants):
        y = TOP_MARGIN + ROW_HEIGHT * row + ROW_HEIGHT / 2
        parts.append(f"<text x='0' y='{y + 4:.1f}' font-size='13'>{escape(variant.name)}</text>")
        if variant.rate is None:
            parts.append(f"<text x='{x(0):.1f}' y='{y + 4:.1f}' font-size='12'>no ratings</text>")
            continue
        parts.append(
            f"<line x1='{x(variant.ci_low):.1f}' y1='{y:.1f}' x2='{x(variant.ci_high):.1f}' "
            f"y2='{y:.1f}' stroke='#4a78c2' stroke-width='4'/>"
            f"<circle cx='{x(variant.rate):.1f}' cy='{y:.1f}' r='{POINT_RADIUS}' fill='#1b3f7a'/>"
            f"<text x='{x(variant.ci_high) + 8:.1f}' y='{y + 4:.1f}' font-size='12'>"
            f"{variant.rate * PERCENT:.0f}%</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(variants: tuple[VariantReport, ...]) -> str:
    head = (
        "<tr><th>variant</th><th>conversations</th><th>replies</th><th>rated</th>"
        "<th>thumbs up</th><th>95% interval</th><th>time to first token p50 / p95</th>"
        "<th>errors</th></tr>"
    )
    rows = []
    for v in variants:
        rate = "–" if v.rate is None else f"{v.rate * PERCENT:.0f}%"
        ttft = "–" if v.ttft_p50 is None else f"{v.ttft_p50:.0f} / {v.ttft_p95 or 0:.0f} ms"
        rows.append(
            f"<tr><td>{escape(v.name)}</td><td>{v.conversations}</td><td>{v.replies}</td>"
            f"<td>{v.rated}</td><td>{rate}</td>"
            f"<td>{v.ci_low * PERCENT:.0f}–{v.ci_high * PERCENT:.0f}%</td>"
            f"<td>{ttft}</td><td>{v.errors}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _signed(share: float) -> str:
    return f"{share * PERCENT:+.0f}"
