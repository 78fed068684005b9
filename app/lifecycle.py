"""The life of one request, and every piece of state it keeps, in one place.

A uid is followed from the input queue to ``[DONE]`` like this::

    SUBMITTED  a message on the input queue (a client's, or the web front's)
       | intake (app/consumer.py): parse, validate, route to an upstream,
       | declare response_<uid>; then, in ONE broker transaction, its task
       | message on <ns>.waiting and the input's ack
    WAITING    a task message on <ns>.waiting, stamped with an incarnation id
       |       (rid); the dispatcher holds it unacknowledged, in its place
       |       (app/waiting.py), and may tell it its place (``queue`` messages)
       |---> ended by the dispatcher, no LLM call: queue_timeout (an error
       |     object and [DONE]), or cancelled (its reader left)
       | the dispatcher (app/dispatcher.py), in ONE transaction: the task
       | message on <ns>.running, with a free slot of its upstream; the waiting
       | message and the free slot acknowledged
    HANDED_OFF a task message on <ns>.running
       | the task (tasks/chat.py) begins: Running.begin()
    STREAMING  the LLM is called; each payload goes to response_<uid> (or reply_to)
       |---> ANSWERED   [DONE] after the answer or an error object
       |---> CANCELLED  the reader left: Cancels holds this incarnation
       |---> DROPPED    another incarnation of the uid is streaming in this process
       |---> WAITING    its upstream is paused or saturated (a 429), or failed it
       |                and has a fallback: the same incarnation waits again
       |                (published, confirmed, before its task message ends)
       |---> HANDED_BACK the worker's warm shutdown ran out of grace: the task
       |                message is rejected back to the queue, unacknowledged, and
       |                another worker answers it again as below (app/shutdown.py)
       '---> (the worker died) the task message comes back: STREAMING again, as a
             restart of the same rid (``restart: true``, seq from 0)

    A task message that comes back (its connection was lost) while its stream
    still runs in the same process is ADOPTED: that stream goes on, writing
    again what it had written (``restart: true``, seq from 0), and the message
    is acknowledged when the stream ends (Running.follow).

Who holds a unit of capacity (a *slot* of an upstream) at each moment. A
slot is always exactly one message, so RabbitMQ keeps the count:

=====================================  ========================================
moment                                 the slot is
=====================================  ========================================
free                                   a message on ``<ns>.slots``, held
                                       unacknowledged by the dispatcher (or
                                       ready, while no worker dispatches)
the dispatcher starts a request        the same transaction acknowledges the
                                       free slot and publishes the task
                                       message with the slot's number: the
                                       slot *is* that task message now
the task message waits for a worker,   the task message on ``<ns>.running``
or is being answered                   (ready, or unacknowledged by its worker)
the worker is SIGKILLed, or loses      RabbitMQ puts the unacknowledged task
its connection                         message back on ``<ns>.running`` the
                                       moment it sees the connection gone:
                                       still the same slot; another worker
                                       (or the same, which goes on) answers it
the broker restarts                    the task message is durable: still on
                                       ``<ns>.running``, still the slot; a
                                       stream that goes on keeps it
                                       (tasks/chat.py: carry on, follow)
warm shutdown hands a stream back      rejected with requeue: still the slot
the task ends (answered, failed,       rejected without requeue, and
cancelled, waits again)                ``<ns>.running`` dead-letters it to
                                       ``<ns>.slots``: free again, in the same
                                       broker operation
the dispatcher is killed               what it held unacknowledged (free
                                       slots, waiting requests) goes back to
                                       its queues; the next worker in line for
                                       the baton takes them over
=====================================  ========================================

Each piece of state has one owner and one lifetime, and a check that cannot
find its state refuses:

============================  ===========================  ===========================
piece                         where it lives               how long
============================  ===========================  ===========================
who may read the answer       the uid itself: the web      as long as the uid; no
                              front's uids carry an HMAC   lookup, nothing to expire
                              of their random part under
                              the caller's API key
whether the uid is answered   the task message: exactly    while the task runs; a
                              one per accepted request,    copy that came back to the
                              since each hand-off is one   same process is adopted by
                              broker transaction (intake,  the stream still running
                              dispatcher)                  there (:class:`Running`)
whether it was cancelled      :class:`Cancels`, per        until its incarnation
                              worker process, keyed by     ends, at most
                              (uid, rid), or by uid for    RESPONSE_QUEUE_TTL
                              incarnations handed off
                              before the cancel
its response queue            ``response_<uid>`` on the    until read (the reader
                              broker, ``x-expires``        deletes it) or TTL
============================  ===========================  ===========================

The broker work per request is the contract's one queue (``response_<uid>``),
none on the ``reply_to`` path: no claim queue, no lookup on a read.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class State(StrEnum):
    SUBMITTED = "submitted"
    # On <ns>.waiting, for a slot of its upstream (app/dispatcher.py); a task
    # whose upstream is paused, saturated or failed it sends it back there.
    WAITING = "waiting"
    # Its queue_timeout passed while it waited: no LLM call.
    TIMED_OUT = "timed_out"
    HANDED_OFF = "handed_off"
    STREAMING = "streaming"
    ANSWERED = "answered"
    CANCELLED = "cancelled"
    DROPPED = "dropped"
    HANDED_BACK = "handed_back"
    # A task message that came back while its incarnation streams on in this
    # process: that stream goes on, acknowledged with it (Running.follow).
    ADOPTED = "adopted"


# Allowed transitions; anything else is a bug (:class:`IllegalTransition`).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.SUBMITTED: frozenset({State.WAITING}),
    State.WAITING: frozenset({State.HANDED_OFF, State.TIMED_OUT, State.CANCELLED}),
    State.TIMED_OUT: frozenset(),
    State.HANDED_OFF: frozenset(
        {State.STREAMING, State.DROPPED, State.CANCELLED, State.HANDED_BACK, State.ADOPTED}
    ),
    # STREAMING -> STREAMING: the worker died and the task came back (restart).
    State.STREAMING: frozenset(
        {
            State.STREAMING,
            State.ANSWERED,
            State.CANCELLED,
            State.DROPPED,
            State.HANDED_BACK,
            State.WAITING,
        }
    ),
    State.ANSWERED: frozenset(),
    State.CANCELLED: frozenset(),
    State.DROPPED: frozenset(),
    # In this process; the task message it gave back is another worker's now.
    State.HANDED_BACK: frozenset(),
    State.ADOPTED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A request was moved to a state its current one does not lead to."""


def check_transition(old: State, new: State) -> State:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a request cannot go from {old} to {new}")
    return new


# --- who may read: uids that carry their owner -----------------------------------------------

TAG_HEX = 32  # 128 bits of HMAC-SHA256


def _tag(key: str, random_part: str) -> str:
    digest = hmac.new(key.encode("utf-8"), random_part.encode("ascii"), hashlib.sha256)
    return digest.hexdigest()[:TAG_HEX]


def new_uid(key: str | None = None) -> str:
    """A fresh uid; with ``key``, one that only that API key may read."""
    random_part = uuid.uuid4().hex
    return f"{random_part}.{_tag(key, random_part)}" if key else random_part


_ISSUED = re.compile(rf"[0-9a-f]{{32}}(\.[0-9a-f]{{{TAG_HEX}}})?")


def looks_issued(uid: str) -> bool:
    """Whether ``uid`` has the form of the uids :func:`new_uid` makes (the web
    front's): its response queue may not be declared yet, as the worker
    declares it when it accepts the request."""
    return _ISSUED.fullmatch(uid) is not None


def owned_by(uid: str, key: str) -> bool:
    """Whether ``uid`` was issued to ``key``. Fails closed: a uid that carries no
    tag, or another key's, is nobody's."""
    random_part, dot, tag = uid.rpartition(".")
    if not dot or not random_part or len(tag) != TAG_HEX:
        return False
    try:
        random_part.encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(_tag(key, random_part), tag)


# --- one incarnation of a request --------------------------------------------------------------


def new_rid() -> str:
    """The id of one hand-off (an incarnation): a task that comes back after its
    worker died keeps it; a request sent again gets a new one."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Incarnation:
    uid: str
    rid: str
    handed_off_at: float  # the intake's wall clock, seconds since the epoch


# --- whether an incarnation was cancelled ------------------------------------------------------


class Cancels:
    """The cancels one worker process has heard of (the web front's readers that left).

    A cancel names the incarnation it saw (``rid``). A reader that left before
    the first message saw none: its cancel names the uid and the time, and
    applies to incarnations handed off before it, never to a request sent
    again with the same uid afterwards. Each is forgotten after ``keep``
    seconds (RESPONSE_QUEUE_TTL: an answer nobody reads is gone by then).
    Wall clocks of different hosts are compared here: they are assumed to
    agree within a second or so (NTP).
    """

    def __init__(self, keep: float, limit: int = 100_000) -> None:
        self._keep = keep
        self._limit = limit
        self._by_rid: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._by_uid: OrderedDict[str, float] = OrderedDict()
        # What other worker processes said of incarnations whose task message
        # went with a lost connection (tasks/cancel.py, Notices), each when
        # it was heard: the task message came back there and is answered
        # there (:meth:`take`); a stream of it goes on there and waits for
        # its task message (:meth:`heard_holding`); the task message came
        # back there and waits for that stream (:meth:`heard_following`);
        # that stream ended so (:meth:`heard_ended`).
        self._taken: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._holding: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._following: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._ended: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, uid: str, rid: str | None, at: float) -> None:
        now = time.monotonic()
        with self._lock:
            if rid:
                self._by_rid[(uid, rid)] = now
                self._by_rid.move_to_end((uid, rid))
            else:
                self._by_uid[uid] = max(at, self._by_uid.get(uid, 0.0))
                self._by_uid.move_to_end(uid)
            self._prune(now)

    def take(self, uid: str, rid: str) -> None:
        """Another worker process took the task message of incarnation
        (``uid``, ``rid``): it came back there after a lost connection, and is
        answered there. A stream of it here waits for it no longer."""
        self._heard(self._taken, uid, rid, time.monotonic())

    def taken(self, incarnation: Incarnation) -> bool:
        return (incarnation.uid, incarnation.rid) in self._taken

    def heard_holding(self, uid: str, rid: str) -> None:
        """Another worker process streams (``uid``, ``rid``) on, its task message lost."""
        self._heard(self._holding, uid, rid, time.monotonic())

    def holding_heard_at(self, incarnation: Incarnation) -> float | None:
        """When another process last said it streams ``incarnation`` on (monotonic)."""
        return self._holding.get((incarnation.uid, incarnation.rid))

    def heard_following(self, uid: str, rid: str) -> None:
        """The task message of (``uid``, ``rid``) came back to another worker
        process, which waits for this process's stream of it to end."""
        self._heard(self._following, uid, rid, time.monotonic())

    def followed(self, incarnation: Incarnation) -> bool:
        return (incarnation.uid, incarnation.rid) in self._following

    def heard_ended(self, uid: str, rid: str, outcome: str) -> None:
        """The stream another process went on with ended so (``answered``,
        ``cancelled`` or ``handed_back``)."""
        self._heard(self._ended, uid, rid, (time.monotonic(), outcome))

    def ended(self, incarnation: Incarnation) -> str | None:
        found = self._ended.get((incarnation.uid, incarnation.rid))
        return None if found is None else found[1]

    def _heard(
        self, heard: OrderedDict[tuple[str, str], Any], uid: str, rid: str, what: Any
    ) -> None:
        with self._lock:
            heard[(uid, rid)] = what
            heard.move_to_end((uid, rid))
            self._prune(time.monotonic())

    def _prune(self, now: float) -> None:
        for by_rid in (self._by_rid, self._taken, self._holding, self._following):
            while by_rid and (
                len(by_rid) > self._limit or next(iter(by_rid.values())) < now - self._keep
            ):
                by_rid.popitem(last=False)
        while self._ended and (
            len(self._ended) > self._limit or next(iter(self._ended.values()))[0] < now - self._keep
        ):
            self._ended.popitem(last=False)
        wall = time.time()
        while self._by_uid and (
            len(self._by_uid) > self._limit or next(iter(self._by_uid.values())) < wall - self._keep
        ):
            self._by_uid.popitem(last=False)

    def cancelled(self, incarnation: Incarnation) -> bool:
        if (incarnation.uid, incarnation.rid) in self._by_rid:
            return True
        at = self._by_uid.get(incarnation.uid)
        return at is not None and at >= incarnation.handed_off_at

    def forget(self, incarnation: Incarnation) -> None:
        with self._lock:
            self._by_rid.pop((incarnation.uid, incarnation.rid), None)


# --- whether the uid is being answered (in this process) ---------------------------------------


class Verdict(StrEnum):
    ANSWER = "answer"  # go on
    DUPLICATE = "duplicate"  # another incarnation of the uid is streaming here
    ANSWERED = "answered"  # this incarnation's answer is already out
    BUSY = "busy"  # a superseded copy of this incarnation has not stopped yet: try later
    ADOPT = "adopt"  # this incarnation streams here on another task message: follow it


@dataclass(eq=False)
class TaskMessage:
    """One delivery of an incarnation's task message: the one its stream is
    acknowledged with. ``link`` is the connection it came on
    (:class:`~app.shutdown.TaskLink`); ``outcome``, once the stream it
    carried ended: ``answered``, ``cancelled`` or ``handed_back``."""

    link: Any = None
    outcome: str | None = None


class Running:
    """The incarnations this process is streaming, and those it finished lately.

    Across processes, a request has one task message (its hand-off and the
    input's ack are one transaction), so two copies of one incarnation only
    meet when a task message comes back while its first copy still runs here
    (the connection dropped) or after its answer went out (the ack was
    lost). A task message that came back for a stream running here is
    adopted (:meth:`begin` with ``message``, :meth:`copy_for`,
    :meth:`follow`): the stream goes on, to be acknowledged with it. A
    stream that waited for it in vain is closed to adoption: a copy that
    comes late supersedes it (it stops at its next chunk,
    :meth:`superseded`) and answers again once it has stopped. A second
    request that reuses a uid still streaming here is a duplicate. A uid
    whose answer is out is free again.
    """

    def __init__(
        self, keep: float, limit: int = 100_000, losses: Callable[[], int] = lambda: 0
    ) -> None:
        self._keep = keep
        self._limit = limit
        # The count of connections lost (app.shutdown.losses): an answer
        # begun before a loss may have lost its last messages with it.
        self._losses = losses
        self._streaming: dict[str, Incarnation] = {}
        # (uid, rid) -> when it finished, and the losses when it began.
        self._finished: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        self._superseded: set[tuple[str, str]] = set()
        # Streaming incarnations -> the task message that came back for them
        # (:meth:`begin`); those that no longer take one (:meth:`copy_for`).
        self._copies: dict[tuple[str, str], TaskMessage] = {}
        self._closed: set[tuple[str, str]] = set()
        self._ended = threading.Condition()

    def begin(
        self,
        incarnation: Incarnation,
        cancels: Cancels | None = None,
        wait: float = 10.0,
        message: TaskMessage | None = None,
    ) -> Verdict:
        """Whether to answer ``incarnation``. One whose uid is held by a cancelled
        incarnation (about to stop at its next chunk) takes the uid over. A
        task ``message`` that came back for an incarnation streaming here is
        adopted: the stream goes on, to be acknowledged with it (:meth:`follow`)."""
        uid, rid = incarnation.uid, incarnation.rid
        deadline = time.monotonic() + wait
        with self._ended:
            self._prune()
            if self._rid_of(uid) == rid:
                # A copy of this very incarnation still runs here, on a task
                # message that came back: it goes on under this one, or, closed
                # to adoption (it waited in vain), it stops; then take over.
                if message is not None and (uid, rid) not in self._closed:
                    self._copies[(uid, rid)] = message
                    self._ended.notify_all()
                    return Verdict.ADOPT
                self._superseded.add((uid, rid))
                while self._rid_of(uid) == rid and time.monotonic() < deadline:
                    self._ended.wait(timeout=0.1)
                if self._rid_of(uid) == rid:
                    return Verdict.BUSY
            finished = self._finished.get((uid, rid))
            if finished is not None:
                if finished[1] == self._losses():
                    return Verdict.ANSWERED
                # A connection was lost since its last messages were written:
                # with no confirm, they may have gone with it. Answer again.
                del self._finished[(uid, rid)]
            holder = self._streaming.get(uid)
            if holder is not None and not (cancels is not None and cancels.cancelled(holder)):
                return Verdict.DUPLICATE
            self._streaming[uid] = incarnation
            return Verdict.ANSWER

    def streams(self, incarnation: Incarnation) -> bool:
        """Whether ``incarnation`` streams in this process."""
        return self._rid_of(incarnation.uid) == incarnation.rid

    def superseded(self, incarnation: Incarnation) -> bool:
        """Whether a copy of ``incarnation`` that came back waits for this one to stop."""
        return (incarnation.uid, incarnation.rid) in self._superseded

    def newer(self, incarnation: Incarnation, message: TaskMessage) -> bool:
        """Whether a task message of ``incarnation`` came back since ``message``."""
        return self._copies.get((incarnation.uid, incarnation.rid)) not in (None, message)

    def copy_for(
        self,
        incarnation: Incarnation,
        message: TaskMessage,
        wait: float,
        elsewhere: Callable[[], bool] = lambda: False,
    ) -> TaskMessage | None:
        """The task message that came back for ``incarnation`` since ``message``
        (the stream's went with a lost connection), waiting ``wait`` seconds at
        most, or until ``elsewhere()`` says another worker took it; None if
        none came: then none is adopted any more (it went to another worker,
        which answers it again)."""
        key = (incarnation.uid, incarnation.rid)
        deadline = time.monotonic() + wait
        with self._ended:
            while (copy := self._copies.get(key)) in (None, message):
                left = deadline - time.monotonic()
                if left <= 0 or elsewhere():
                    self._closed.add(key)
                    return None
                self._ended.wait(timeout=min(left, 1.0))
            return copy

    def follow(
        self, incarnation: Incarnation, message: TaskMessage, alive: Callable[[], bool]
    ) -> str:
        """Wait while ``incarnation`` streams here under the adopted ``message``:
        its outcome (``answered``, ``cancelled``, ``handed_back``), ``replaced``
        once a newer task message came back for it, or ``lost`` once
        ``alive()`` says the connection ``message`` came on is gone."""
        key = (incarnation.uid, incarnation.rid)
        with self._ended:
            while message.outcome is None:
                if self._copies.get(key) is not message:
                    return "replaced"
                if not alive():
                    return "lost"
                self._ended.wait(timeout=1.0)
            return message.outcome

    def _rid_of(self, uid: str) -> str | None:
        holder = self._streaming.get(uid)
        return None if holder is None else holder.rid

    def end(
        self,
        incarnation: Incarnation,
        *,
        finished: bool,
        lost: int | None = None,
        outcome: str = "",
    ) -> None:
        """``lost``: the count of connections lost when the incarnation began
        (any loss after it may have taken its unconfirmed last messages);
        ``outcome``: for the task message it adopted, if any (:meth:`follow`)."""
        key = (incarnation.uid, incarnation.rid)
        with self._ended:
            if self._streaming.get(incarnation.uid) == incarnation:
                del self._streaming[incarnation.uid]
                self._superseded.discard(key)
                self._closed.discard(key)
                adopted = self._copies.pop(key, None)
                if adopted is not None:
                    # An answer that ended before a loss may have lost its last
                    # messages with it (below): its message is given back, and
                    # answered again.
                    safe = lost is None or lost == self._losses()
                    adopted.outcome = outcome or (
                        "answered" if finished and safe else "handed_back"
                    )
            if finished:
                self._finished[(incarnation.uid, incarnation.rid)] = (
                    time.monotonic(),
                    self._losses() if lost is None else lost,
                )
            self._ended.notify_all()

    def _prune(self) -> None:
        cutoff = time.monotonic() - self._keep
        while self._finished and (
            len(self._finished) > self._limit or next(iter(self._finished.values()))[0] < cutoff
        ):
            self._finished.popitem(last=False)
