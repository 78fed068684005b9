"""A request's task message, as it waits for its upstream on ``<ns>.waiting``.

The intake (app/consumer.py) hands every accepted request off this way, and a
task whose upstream is saturated or down hands its request back to wait
again (:func:`wait_again`). The headers are what the dispatcher
(app/dispatcher.py) orders and routes by; it sends the message on to
``<ns>.running`` as it is, with the slot it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.broker import waiting_queue
from app.dispatcher import (
    H_AT,
    H_DEADLINE,
    H_REPLY,
    H_RID,
    H_TENANT,
    H_TIER,
    H_UPDATES,
    H_UPSTREAM,
)
from app.request import ChatRequest
from config import Settings


@dataclass(frozen=True)
class Handoff:
    """Where and how one incarnation of a request waits."""

    rid: str
    at: float  # when it was accepted (wall clock): its place in the line
    upstream: str
    tried: tuple[str, ...] = ()  # upstreams that failed it, for fallback
    again: bool = False  # its answer had begun: the next run is a restart

    def kwargs(self) -> dict[str, Any]:
        return {
            "rid": self.rid,
            "at": self.at,
            "upstream": self.upstream,
            "tried": list(self.tried),
            "again": self.again,
        }


def headers(request: ChatRequest, handoff: Handoff, settings: Settings) -> dict[str, Any]:
    """The dispatcher's headers of ``request``'s task message."""
    timeout = request.queue_timeout or settings.queue_timeout
    return {
        H_UPSTREAM: handoff.upstream,
        H_RID: handoff.rid,
        H_AT: handoff.at,
        H_DEADLINE: handoff.at + timeout,
        H_TIER: request.service_tier or "default",
        H_TENANT: request.tenant or request.username,
        H_REPLY: request.reply_to or settings.response_queue(request.uid),
        H_UPDATES: request.queue_updates,
    }


def send(
    task: Any,
    request: ChatRequest,
    handoff: Handoff,
    settings: Settings,
    producer: Any,
    **options: Any,
) -> None:
    """Publish the task message of ``request`` to ``<ns>.waiting`` with ``producer``."""
    task.apply_async(
        args=[request.to_task()],
        kwargs=handoff.kwargs(),
        task_id=request.uid,
        # What Flower and the events show: no prompts, and no repr of a whole
        # conversation for every request.
        argsrepr=request.summary(),
        producer=producer,
        queue=waiting_queue(settings),
        declare=[],
        headers=headers(request, handoff, settings),
        **options,
    )
