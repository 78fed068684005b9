"""The paced SSE stream of one answer, with the faults a model string asks for.

:func:`stream` is the WSGI body iterator: each frame is yielded as soon as it
is produced, and gevent.pywsgi writes it to the socket at once (chunked
encoding, no buffering). The stream holds its :class:`~devllm.slots.Slot` and
gives it back when it ends, however it ends.

A client leaving mid-stream is noticed at the next token at the latest (see
:meth:`devllm.connection.ClientConnection.pause`), or when a write fails and
the server closes the iterator (``GeneratorExit`` at the pending ``yield``).
Either way the stream counts as ``streams_cancelled``.

A stream whose slot a newer request takes (``--over interrupt``) sends
``data: [DONE]`` at its next step, with no further content, no chunk with a
``finish_reason`` and no usage chunk, and counts as ``streams_interrupted``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

from devllm.behaviour import Behaviour
from devllm.completions import DONE, MALFORMED, STREAMED_ERROR, Completion
from devllm.connection import ClientConnection
from devllm.slots import Slot
from devllm.state import Outcome, State

logger = logging.getLogger(__name__)

# Waits the given seconds; raises _Stop if the client leaves or the slot is cut meanwhile.
_Pause = Callable[[float], None]


class _Stop(Exception):
    """The wait before the next frame ended because the client left or the slot was cut."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def stream(
    completion: Completion,
    behaviour: Behaviour,
    *,
    delay: float,
    faulty: bool,
    include_usage: bool,
    connection: ClientConnection,
    slot: Slot,
    state: State,
) -> Iterator[bytes]:
    """Yield the frames of ``completion``, ``delay`` seconds apart, then ``[DONE]``."""
    outcome: Outcome = "cancelled"
    state.stream_started()
    logger.debug("%s: stream started (%d tokens)", completion.id, len(completion.tokens))

    def pause(seconds: float) -> None:
        woke = connection.pause(seconds, wake=slot.cut)
        if woke != "elapsed":
            raise _Stop("interrupted" if woke == "woken" else "cancelled")

    try:
        try:
            yield from _frames(
                completion,
                behaviour,
                delay=delay,
                faulty=faulty,
                include_usage=include_usage,
                connection=connection,
                pause=pause,
            )
            outcome = "completed"
        except _Fault:
            outcome = "faulted"
        except _Stop as stop:
            outcome = stop.outcome
            if outcome == "interrupted":
                logger.info("%s: cut by a newer request (--over interrupt)", completion.id)
                yield DONE
    finally:
        slot.release()
        state.stream_finished(outcome)
        if outcome == "cancelled":
            logger.info("%s: the client left mid-stream", completion.id)
        else:
            logger.debug("%s: stream %s", completion.id, outcome)


class _Fault(Exception):
    """The stream ended early on purpose (``fault=...``); its last frames are sent."""


def _frames(
    completion: Completion,
    behaviour: Behaviour,
    *,
    delay: float,
    faulty: bool,
    include_usage: bool,
    connection: ClientConnection,
    pause: _Pause,
) -> Iterator[bytes]:
    """The frames of a whole answer; raises :class:`_Fault` after a fault's last frame."""
    frames = completion.frames()
    fault = behaviour.fault if faulty else None
    fault_at = min(behaviour.at, len(completion.tokens))
    yield frames.role()
    pause(behaviour.first_delay)
    for index in range(len(completion.tokens) + 1):
        if index == fault_at and fault is not None:
            if fault == "disconnect":
                logger.info("%s: dropping the connection after %d chunks", completion.id, index)
                connection.drop()
                raise _Fault
            if fault == "stall":
                logger.info(
                    "%s: stalling %ss after %d chunks", completion.id, behaviour.stall, index
                )
                pause(behaviour.stall)
            elif fault == "malformed":
                logger.info("%s: sending a malformed chunk after %d chunks", completion.id, index)
                yield MALFORMED
            elif fault == "error":
                logger.info("%s: sending an error object after %d chunks", completion.id, index)
                yield b"data: " + json.dumps(STREAMED_ERROR).encode() + b"\n\n"
                yield DONE
                raise _Fault
            elif fault in ("truncate", "truncate_eof"):
                # A clean but early end: no finish_reason on any chunk, the
                # usage chunk if asked for, then [DONE] or just the end of the body.
                logger.info(
                    "%s: ending the stream early (%s) after %d chunks", completion.id, fault, index
                )
                if include_usage:
                    yield frames.usage()
                if fault == "truncate":
                    yield DONE
                raise _Fault
        if index == len(completion.tokens):
            break
        pause(delay)
        yield frames.token(completion.tokens[index])
    pause(0)  # a cut during the last write still ends the stream without a finish_reason
    yield frames.finish()
    if include_usage:
        yield frames.usage()
    yield DONE
