"""Rank -> notebook events: their types, the authenticated loopback channel, and the sinks
that show them (a text printer now; an ipywidgets dashboard implements the same ``EventSink``)."""
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
