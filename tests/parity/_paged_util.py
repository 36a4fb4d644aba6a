"""Helpers shared by the paged-engine parity tests."""

from __future__ import annotations


class Recorder:
    """Keeps every SchedulerOutput of an LLMEngine (wraps its scheduler's `schedule`)."""

    def __init__(self, le) -> None:
        self.outputs = []
        schedule = le.scheduler.schedule

        def recording():
            out = schedule()
            self.outputs.append(out)
            return out

        le.scheduler.schedule = recording

    def chunks(self, request_id: str):
        """Every scheduled chunk of one request, in order."""
        return [s for o in self.outputs for s in o.scheduled if s.request_id == request_id]

    def first_chunk(self, request_id: str):
        return self.chunks(request_id)[0]
