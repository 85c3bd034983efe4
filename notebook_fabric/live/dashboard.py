"""The live dashboard: an :class:`~.sinks.EventSink` that draws every rank in the notebook.

Built only of widgets that ship with ipywidgets 8 (``HTML``, ``Tab``, ``VBox``): no front-end
build step. Layout, top to bottom: a header line; one table row per rank (state, memory,
progress bar, last collective, last output line); a line plot of what rank 0 logs with
``fabric.log``; then a ``Tab`` with each rank's output, rank 0's open. Tabs switch in the front
end alone (the kernel is busy running the cell and could not answer a click).

It appears with the run's first output, progress, metric or failure (or after ``SHOW_AFTER``
seconds): a quick silent cell shows nothing extra. ``handle(event)`` only updates the :class:`~.dashboard_model.DashboardModel`. A render thread
redraws at most every ``interval`` seconds, and only the widgets whose HTML changed, so many
events in a burst cost one update. :meth:`freeze` (the run is over) stops the thread and
replaces the widget output with the summary as HTML and text: a saved notebook opened without a
kernel still shows it. Launcher notices are printed in the cell as text, as the text sink does.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Dict, Iterable, Optional

from .dashboard_html import header_html, output_html, plot_svg, summary_html, summary_text, table_html
from .dashboard_model import MAX_LINES, DashboardModel
from .events import Metrics, Notice, Output, Progress, RankEvent, RankExited, StartupFailed, TaskFailed
from .notices import write_notice

UPDATE_INTERVAL = 0.25  # seconds between redraws, at most
SHOW_AFTER = 1.0  # seconds a silent run may last before the dashboard appears anyway
#: events that make the dashboard appear at once
WORTH_SHOWING = (Output, Progress, Metrics, TaskFailed, StartupFailed, RankExited)


class DashboardSink:
    """See the module docstring. ``ranks``: the ranks of the run; ``shown``: whose output the
    summary shows unfolded (default rank 0, or the first rank)."""

    def __init__(self, ranks: Iterable[int], *, title: str = "notebook-fabric", shown: Optional[Iterable[int]] = None,
                 interval: float = UPDATE_INTERVAL, max_lines: int = MAX_LINES) -> None:
        self.model = DashboardModel(ranks, max_lines=max_lines)
        ranks = self.model.ranks
        self.title = title
        self.shown = sorted(shown) if shown is not None else ranks[:1]
        self.interval = interval
        self.updates = 0  # widget values sent to the front end
        self.renders = 0
        self.widget: Any = None  # built on the first render: a run that never shows opens no widgets
        self._sent: Dict[int, str] = {}
        self._output_versions: Dict[int, int] = {}
        self._rendered_version = -1
        self._series_version = -1
        self._display_id = f"notebook-fabric-{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._render_lock = threading.Lock()
        self.frozen = False
        self.started = False
        self.shown_in_cell = False
        self._started_at = 0.0

    # -- the EventSink ---------------------------------------------------------------------------
    def handle(self, event: RankEvent) -> None:
        self.model.handle(event)
        if isinstance(event, Notice):
            write_notice([event.text, *event.details], event.level)
        if not self.shown_in_cell and self.started and (
                _worth_showing(event) or time.monotonic() - self._started_at >= SHOW_AFTER):
            self._show()

    def flush(self) -> None:
        """Draw what is new now (the run loop calls this at the end of each run)."""
        if self.shown_in_cell and not self.frozen:
            self.render()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "DashboardSink":
        """Arm the dashboard: it appears in the running cell (from the thread that feeds it, so in
        the right cell) with the first output, progress, metric or failure, or once the run has
        lasted ``SHOW_AFTER`` seconds; a quick silent run adds nothing to the notebook."""
        self.started = True
        self._started_at = time.monotonic()
        return self

    def _show(self) -> None:
        from IPython.display import display

        self.shown_in_cell = True
        self.render()
        bundle = dict(self.widget._repr_mimebundle_() or {})
        # where widgets cannot render: a line of text now, the text summary once the run ends
        bundle["text/plain"] = f"{self.title}: live dashboard of {len(self.model.ranks)} ranks (needs ipywidgets)"
        display(bundle, raw=True, display_id=self._display_id)
        self._thread = threading.Thread(target=self._redraw, name="notebook-fabric dashboard", daemon=True)
        self._thread.start()

    def freeze(self) -> None:
        """The run is over: stop redrawing and leave the summary in place of the widgets."""
        if self.frozen:
            return
        self.frozen = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.model.finish()
        if self.shown_in_cell:
            self.render()
            from IPython.display import update_display

            update_display(self.summary_bundle(), raw=True, display_id=self._display_id)
        if self.widget is not None:
            self.widget.close()
            for child in (self._header, self._table, self._plot, self._tabs, *self._outputs.values()):
                child.close()

    def summary_bundle(self) -> Dict[str, str]:
        """The frozen dashboard as ``text/html`` and ``text/plain``."""
        return {"text/html": summary_html(self.model, self.title, self.shown),
                "text/plain": summary_text(self.model, self.title, self.shown)}

    # -- drawing ---------------------------------------------------------------------------------
    def _build(self) -> None:
        import ipywidgets as widgets

        ranks = self.model.ranks
        self._header = widgets.HTML()
        self._table = widgets.HTML()
        self._plot = widgets.HTML(layout=widgets.Layout(display="none"))
        self._outputs: Dict[int, Any] = {rank: widgets.HTML() for rank in ranks}
        self._tabs = widgets.Tab(children=[self._outputs[r] for r in ranks])
        for index, rank in enumerate(ranks):
            self._tabs.set_title(index, f"rank {rank}")
        self._tabs.selected_index = ranks.index(self.shown[0]) if self.shown and self.shown[0] in ranks else 0
        self.widget = widgets.VBox([self._header, self._table, self._plot, self._tabs])

    def render(self) -> None:
        """Push the widgets whose HTML changed since the last render."""
        with self._render_lock:
            if self.widget is None:
                self._build()
            model = self.model
            now = time.time()
            ticking = any(v.collective is not None for v in model.views.values()) and model.ended_at is None
            if model.version == self._rendered_version and not ticking:
                return
            self._rendered_version = model.version
            self.renders += 1
            with model.lock():
                self._set(self._header, header_html(model, self.title))
                self._set(self._table, table_html(model, now))
                if model.series and self._series_version != model.series_version:
                    self._series_version = model.series_version
                    self._set(self._plot, plot_svg(model.series))
                    if self._plot.layout.display == "none":
                        self._plot.layout.display = None
                for rank, view in model.views.items():
                    if self._output_versions.get(rank) != view.output_version:
                        self._output_versions[rank] = view.output_version
                        self._set(self._outputs[rank], output_html(view))

    def _set(self, widget: Any, value: str) -> None:
        key = id(widget)
        if self._sent.get(key) != value:
            self._sent[key] = value
            widget.value = value
            self.updates += 1

    def _redraw(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.render()
            except Exception:  # noqa: BLE001 - a drawing problem must not end the run
                pass


def _worth_showing(event: RankEvent) -> bool:
    return isinstance(event, WORTH_SHOWING) and not (isinstance(event, RankExited) and event.expected)


def dashboard_available() -> bool:
    """ipywidgets 8 is importable and this process is a Jupyter kernel."""
    from .notices import in_kernel

    if not in_kernel():
        return False
    try:
        import ipywidgets
    except ImportError:
        return False
    return int(ipywidgets.__version__.split(".")[0]) >= 8


def want_dashboard(dashboard: Optional[bool]) -> bool:
    """``dashboard`` as given; ``None``: on in a notebook unless ``NOTEBOOK_FABRIC_DASHBOARD=0``."""
    import os

    if dashboard is not None:
        return bool(dashboard) and dashboard_available()
    setting = os.environ.get("NOTEBOOK_FABRIC_DASHBOARD", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    return dashboard_available()
