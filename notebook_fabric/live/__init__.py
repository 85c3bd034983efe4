"""Rank -> notebook events: their types, the authenticated loopback channel, and the sinks
that show them (the text printer and the ipywidgets dashboard, both ``EventSink``s), the stall
watchdog, and how a set of ranks is written (``ranks.format_ranks``)."""
from .events import (
    CollectiveEntered, CollectiveExited, CollectiveState, Heartbeat, Notice, Output, RankEvent, RankExited, RankReady,
    RankStarted, RemoteFailure, StartupFailed, TaskDone, TaskFailed, WhereReply,
)
from .sinks import EventSink, FanOutSink, NullSink, RecordingSink, TextSink

__all__ = [
    "RankEvent", "RankStarted", "RankReady", "Output", "Heartbeat", "CollectiveState", "CollectiveEntered",
    "CollectiveExited", "TaskDone", "TaskFailed", "RemoteFailure", "StartupFailed", "WhereReply", "RankExited",
    "Notice", "EventSink", "TextSink", "NullSink", "RecordingSink", "FanOutSink",
]
