"""A server-rendered SVG bar chart (no JavaScript, no chart library): grouped bars per day."""

from __future__ import annotations

from markupsafe import Markup, escape

COLOURS = ("#5865f2", "#ed4245", "#faa61a", "#3ba55d")


def bar_chart(days: list[str], series: dict[str, list[int]], *, width: int = 720, height: int = 220) -> Markup:
    """Grouped bars, one group per day, one colour per series, with a legend and the day's labels."""
    top = max([1, *(v for values in series.values() for v in values)])
    left, bottom, legend = 36, 30, 18
    plot_w, plot_h = width - left - 8, height - bottom - legend - 8
    group = plot_w / max(1, len(days))
    bar = max(1.0, (group - 4) / max(1, len(series)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="per day: {escape(", ".join(series))}" class="chart">',
             f'<text x="4" y="{legend + 12}" font-size="11">{top}</text>',
             f'<line x1="{left}" y1="{legend + 8 + plot_h}" x2="{width - 8}" y2="{legend + 8 + plot_h}" '
             f'stroke="#999"/>']
    for s, (name, values) in enumerate(series.items()):
        colour = COLOURS[s % len(COLOURS)]
        parts.append(f'<rect x="{left + s * 90}" y="2" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + s * 90 + 14}" y="11" font-size="11">{escape(name)}</text>')
        for d, value in enumerate(values):
            h = plot_h * value / top
            x = left + d * group + 2 + s * bar
            y = legend + 8 + plot_h - h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="{colour}">'
                         f'<title>{escape(days[d])} {escape(name)}: {value}</title></rect>')
    step = max(1, len(days) // 7)
    for d in range(0, len(days), step):
        parts.append(f'<text x="{left + d * group + 2:.1f}" y="{height - 8}" font-size="10">{escape(days[d][5:])}'
                     f'</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
