"""HTML and text renderings of a :class:`~.dashboard_model.DashboardModel`.

The live dashboard puts these strings into ipywidgets ``HTML`` widgets; the frozen summary is the
same HTML without widgets (it survives saving the notebook), and its text twin is what front ends
without HTML (and ``text/plain`` readers) show. No JavaScript anywhere: other ranks' output in the
summary sits in ``<details>`` elements.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .dashboard_model import DashboardModel, RankView
from .events import MemorySample, Progress

FAILED_COLOR = "#c62828"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_CELL = "padding:2px 8px;text-align:left;vertical-align:top;border-bottom:1px solid #ddd;"


def format_bytes(count: Optional[float]) -> str:
    """``312.4 MiB``."""
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def memory_text(view: RankView, final: bool = False) -> str:
    """CUDA: allocated, reserved, peak and total; CPU: resident memory and its peak."""
    sample: Optional[MemorySample] = view.memory
    if sample is not None and sample.allocated_bytes is not None:
        peak = view.device_peak_bytes if view.device_peak_bytes is not None else sample.peak_allocated_bytes
        if final:
            return f"{sample.device} peak {format_bytes(peak)} of {format_bytes(sample.total_bytes)}"
        return (f"{sample.device} allocated {format_bytes(sample.allocated_bytes)}, reserved "
                f"{format_bytes(sample.reserved_bytes)}, peak {format_bytes(peak)} of {format_bytes(sample.total_bytes)}")
    if view.rss_bytes is None:
        return "-"
    if final:
        return f"RSS peak {format_bytes(view.rss_peak_bytes or view.rss_bytes)}"
    return f"RSS {format_bytes(view.rss_bytes)} (peak {format_bytes(view.rss_peak_bytes or view.rss_bytes)})"


def progress_text(bar: Optional[Progress]) -> str:
    """``train 45/100 (40.2 it/s)``."""
    if bar is None:
        return ""
    count = f"{bar.n:g}/{bar.total:g}" if bar.total else f"{bar.n:g}"
    rate = f" ({bar.rate:.1f} {bar.unit}/s)" if bar.rate else ""
    return f"{bar.desc + ' ' if bar.desc else ''}{count}{rate}"


def progress_html(bar: Optional[Progress]) -> str:
    if bar is None:
        return ""
    label = html.escape(progress_text(bar))
    if not bar.total:
        return f"<span>{label}</span>"
    fraction = max(0.0, min(1.0, bar.n / bar.total))
    color = "#2e7d32" if fraction >= 1.0 else "#1976d2"
    return (f'<div class="nbf-progress" style="display:flex;align-items:center;gap:6px">'
            f'<div style="width:110px;height:10px;background:#e0e0e0;border-radius:3px;overflow:hidden">'
            f'<div style="width:{fraction * 100:.1f}%;height:100%;background:{color}"></div></div>'
            f"<span>{label}</span></div>")


@dataclass(frozen=True)
class Column:
    """One column of the per-rank table: its header, its cell as text (the frozen text summary) and
    as HTML (the live table and the frozen HTML summary). ``flagged``: a failed or dead rank's cell
    is red; ``in_text``: shown in the text summary. A new column is one row of :data:`COLUMNS`
    (and, if it needs new data, a field of ``RankView`` that ``DashboardModel`` fills)."""

    name: str
    text: Callable[[DashboardModel, RankView, Optional[float], bool], str]
    html: Callable[[DashboardModel, RankView, Optional[float], bool], str]
    flagged: bool = False
    in_text: bool = True
    shown: Callable[[DashboardModel], bool] = lambda model: True  # e.g. the host column only on a cluster


COLUMNS: Tuple[Column, ...] = (
    Column("rank", lambda model, view, now, final: str(view.rank),
           lambda model, view, now, final: str(view.rank), flagged=True),
    Column("host", lambda model, view, now, final: view.host, lambda model, view, now, final: html.escape(view.host),
           flagged=True, shown=lambda model: any(model.views[rank].host for rank in model.ranks)),
    Column("state", lambda model, view, now, final: model.state(view.rank, now),
           lambda model, view, now, final: html.escape(model.state(view.rank, now)), flagged=True),
    Column("memory", lambda model, view, now, final: memory_text(view, final),
           lambda model, view, now, final: f'<span style="white-space:nowrap">{html.escape(memory_text(view, final))}</span>'),
    Column("progress", lambda model, view, now, final: progress_text(view.current_progress),
           lambda model, view, now, final: progress_html(view.current_progress)),
    Column("last collective", lambda model, view, now, final: view.last_collective,
           lambda model, view, now, final: html.escape(view.last_collective)),
    Column("last output", lambda model, view, now, final: view.last_line,
           lambda model, view, now, final: f'<code style="white-space:pre">{html.escape(_clip(view.last_line, 72))}</code>',
           in_text=False),  # the text summary prints the output itself, above the table
)
HEADER = tuple(column.name for column in COLUMNS)


def shown_columns(model: DashboardModel) -> List[Column]:
    """The columns this model's table has (the host column only when ranks run on other hosts)."""
    return [column for column in COLUMNS if column.shown(model)]


def table_rows(model: DashboardModel, now: Optional[float] = None, final: bool = False,
               columns: Sequence[Column] = COLUMNS) -> List[Tuple[str, ...]]:
    """One tuple of ``columns``' texts per rank."""
    with model.lock():
        return [tuple(column.text(model, model.views[rank], now, final) for column in columns) for rank in model.ranks]


def table_html(model: DashboardModel, now: Optional[float] = None, final: bool = False) -> str:
    """The per-rank table; failed and dead ranks in red."""
    body = []
    with model.lock():
        columns = shown_columns(model)
        head = "".join(f'<th style="{_CELL}">{column.name}</th>' for column in columns)
        for rank in model.ranks:
            view = model.views[rank]
            bad = model.is_bad(rank)
            style = f"color:{FAILED_COLOR};font-weight:600;" if bad else ""
            cells = "".join(f'<td style="{_CELL}{style if column.flagged else ""}">{column.html(model, view, now, final)}</td>'
                            for column in columns)
            body.append(f'<tr class="nbf-rank" data-rank="{rank}" style="{style}">{cells}</tr>')
    return (f'<table class="nbf-table" style="border-collapse:collapse;font-size:12px;font-family:monospace">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def header_html(model: DashboardModel, title: str) -> str:
    with model.lock():
        bad = [r for r in model.ranks if model.is_bad(r)]
        status = "finished" if model.ended_at is not None else "running"
        if bad:
            status += f", rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} failed"
        color = FAILED_COLOR if bad else "#555"
        duration = f"{model.duration:.1f} s" if model.ended_at is not None else f"{model.duration:.0f} s"  # live: 1/s
        return (f'<div style="font-family:sans-serif;font-size:13px;color:{color}"><b>{html.escape(title)}</b> · '
                f"{len(model.ranks)} rank{'s' if len(model.ranks) != 1 else ''} · {status} · {duration}</div>")


def output_html(view: RankView, height: Optional[int] = 240) -> str:
    """The rank's kept output in a ``<pre>``, after a marker for lines no longer kept."""
    with_marker = []
    if view.dropped_lines:
        with_marker.append(f'<div style="color:#888;font-style:italic">{view.dropped_lines} earlier lines not shown</div>')
    text = html.escape("\n".join(view.output_lines()))
    box = f"max-height:{height}px;overflow-y:auto;" if height else ""
    return (f'<div class="nbf-output" data-rank="{view.rank}" style="{box}font-size:12px">' + "".join(with_marker)
            + f'<pre style="margin:0;white-space:pre-wrap">{text or "(no output yet)"}</pre></div>')


def plot_svg(series: Dict[str, List[Tuple[float, float]]], width: int = 360, height: int = 140,
             max_points: int = 300) -> str:
    """A small line plot of each series (step on x), with a legend and the axes' ranges."""
    if not series:
        return ""
    points = [p for values in series.values() for p in values]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 48, 8, 8, 20
    pw, ph = width - left - right, height - top - bottom

    def position(x: float, y: float) -> str:
        return f"{left + (x - x0) / (x1 - x0) * pw:.1f},{top + (1 - (y - y0) / (y1 - y0)) * ph:.1f}"

    lines, legend = [], []
    for index, (name, values) in enumerate(sorted(series.items())):
        color = COLORS[index % len(COLORS)]
        values = values[:: max(1, len(values) // max_points)] + values[-1:]  # no more points than pixels
        lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                     f'points="{" ".join(position(x, y) for x, y in values)}"/>')
        last = values[-1][1] if values else float("nan")
        legend.append(f'<span style="color:{color}">&#9632; {html.escape(name)} = {last:.4g}</span>')
    axes = (f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>'
            f'<text x="{left - 4}" y="{top + 9}" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{left}" y="{height - 4}">step {x0:g}</text>'
            f'<text x="{left + pw}" y="{height - 4}" text-anchor="end">{x1:g}</text>')
    return (f'<div class="nbf-plot" style="font-family:monospace;font-size:11px">'
            f'<svg width="{width}" height="{height}" style="font-size:10px" xmlns="http://www.w3.org/2000/svg">'
            f"{axes}{''.join(lines)}</svg><div>{' &nbsp; '.join(legend)}</div></div>")


def summary_html(model: DashboardModel, title: str, shown: Sequence[int]) -> str:
    """The frozen dashboard: header, final table, plot, the shown ranks' output, the others folded."""
    with model.lock():
        parts = [header_html(model, title), table_html(model, final=True), plot_svg(model.series)]
        for rank in model.ranks:
            view = model.views[rank]
            if rank in shown:
                parts.append(f"<div><b>rank {rank}</b></div>" + output_html(view, height=None))
            else:
                count = len(view.lines) + view.dropped_lines
                parts.append(f"<details><summary>rank {rank} output ({count} lines)</summary>"
                             + output_html(view, height=None) + "</details>")
    return f'<div class="nbf-summary">{"".join(parts)}</div>'


def summary_text(model: DashboardModel, title: str, shown: Sequence[int]) -> str:
    """The frozen dashboard as text: the shown ranks' output (``[rank N] line``), then the table."""
    lines: List[str] = []
    with model.lock():
        for rank in shown:
            view = model.views.get(rank)
            if view is None:
                continue
            if view.dropped_lines:
                lines.append(f"[rank {rank}] ({view.dropped_lines} earlier lines not shown)")
            lines += [f"[rank {rank}] {line}" for line in view.output_lines()]
        columns = [column for column in shown_columns(model) if column.in_text]
        rows = table_rows(model, final=True, columns=columns)
        header = [column.name for column in columns]
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(columns))]
        lines.append(f"{title}: {len(model.ranks)} ranks, {model.duration:.1f} s")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        for name, values in sorted(model.series.items()):
            if values:
                lines.append(f"{name}: {values[0][1]:.4g} -> {values[-1][1]:.4g} over {len(values)} points")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
