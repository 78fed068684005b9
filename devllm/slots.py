"""Capacity: at most ``--slots`` chat completions served at once, as a real inference server.

Every chat completion that gets past validation (and is not answered an
error on demand by its model string) takes a :class:`Slot` before its answer
begins, streamed or not, and holds it until its answer ends or its client
leaves, whichever comes first. With ``--slots 0`` there is no limit, but the
slots are still counted, for ``in_flight`` and ``max_in_flight`` in ``/stats``.

When all slots are busy, ``--over`` decides, as each real server does:

``queue``
    The request waits for a slot, first come first served (llama.cpp's server,
    vLLM). A client that leaves while waiting leaves the queue at once.
``interrupt``
    The request takes the slot of the running stream that took its slot
    first; that stream sends ``data: [DONE]`` at its next step (no further
    content, no chunk with a ``finish_reason``, no usage chunk) and its body
    ends cleanly, as llama-cpp-python's server does with its default
    ``interrupt_requests=True``. Non-streamed answers are never cut (that server
    cuts only streams); if no stream holds a slot, the request waits as with
    ``queue``, and a waiting request cuts the first stream to hold a slot.
``503``
    Answered at once: 503 with an OpenAI error object (Ollama past its queue:
    "server busy, please try again").
``429``
    Answered at once: 429 with an OpenAI error object and the headers
    ``retry-after`` (seconds, ``--retry-after``) and ``retry-after-ms`` (TGI,
    OpenAI).

All requests run as greenlets of one thread, and :class:`Slots` never switches
greenlets while it hands slots over, so a freed slot goes to the first waiter
before any other request can see it free, and ``in_flight`` never exceeds
``--slots``.
"""

from __future__ import annotations

from collections import deque

from gevent.event import Event

from devllm.connection import ClientConnection
from devllm.settings import Over
from devllm.state import State


class Refused(Exception):
    """Every slot is busy and ``--over`` answers ``status`` at once."""

    def __init__(self, status: int, slots: int) -> None:
        super().__init__(f"all {slots} slots are busy")
        self.status = status


class Slot:
    """One request's hold on the server's capacity."""

    __slots__ = ("_slots", "cut", "granted", "stream")

    def __init__(self, slots: Slots, *, stream: bool) -> None:
        self._slots = slots
        self.stream = stream
        self.granted = Event()
        # Set when a newer request takes this slot (--over interrupt): the stream ends.
        self.cut = Event()

    def release(self) -> None:
        """Give the slot back; any later call, or one after a cut, does nothing."""
        self._slots.release(self)


class Slots:
    """The ``--slots`` of one server and the requests waiting for them."""

    def __init__(self, limit: int, over: Over, state: State) -> None:
        self.limit = limit
        self.over = over
        self._state = state
        # Insertion order is the order the holders took their slots: the oldest first.
        self._holders: dict[Slot, None] = {}
        self._waiters: deque[Slot] = deque()

    @property
    def _full(self) -> bool:
        return 0 < self.limit <= len(self._holders)

    def acquire(self, connection: ClientConnection, *, stream: bool) -> Slot | None:
        """A slot for one request, once there is one; None if its client left while waiting.

        Raises :class:`Refused` when all slots are busy and ``over`` is ``503`` or ``429``.
        """
        slot = Slot(self, stream=stream)
        if self._full and self.over in ("503", "429"):
            self._state.refused(int(self.over))
            raise Refused(int(self.over), self.limit)
        self._waiters.append(slot)
        self._fill()
        if slot.granted.is_set():
            return slot
        connection.pause(float("inf"), wake=slot.granted)
        if slot.granted.is_set():
            return slot
        self._waiters.remove(slot)
        self._state.count("requests_cancelled")
        self._update()
        return None

    def release(self, slot: Slot) -> None:
        if slot in self._holders:
            del self._holders[slot]
            self._fill()

    def _fill(self) -> None:
        """Give the waiters, first come first served, the free slots or cut streams' slots."""
        while self._waiters:
            if not self._full:
                self._grant(self._waiters.popleft())
            elif self.over == "interrupt" and (victim := self._oldest_stream()) is not None:
                del self._holders[victim]
                victim.cut.set()
                self._state.count("interrupted")
                self._grant(self._waiters.popleft())
            else:
                break
        self._update()

    def _grant(self, slot: Slot) -> None:
        self._holders[slot] = None
        slot.granted.set()

    def _oldest_stream(self) -> Slot | None:
        return next((slot for slot in self._holders if slot.stream), None)

    def _update(self) -> None:
        self._state.occupancy(len(self._holders), len(self._waiters))
