"""The paced SSE stream of one answer, with the faults a model string asks for.

:func:`stream` is the WSGI body iterator: each frame is yielded as soon as it
is produced, and gevent.pywsgi writes it to the socket at once (chunked
encoding, no buffering). A client leaving mid-stream is noticed two ways:
the server's write fails and it closes the iterator, which raises
``GeneratorExit`` at the pending ``yield``; or a long pause (``first_delay``,
``fault=stall``) sees the socket become readable with EOF. Either way the
stream counts as ``streams_cancelled``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from devllm.behaviour import Behaviour
from devllm.completions import DONE, MALFORMED, STREAMED_ERROR, Completion
from devllm.connection import ClientConnection
from devllm.state import Outcome, State

logger = logging.getLogger(__name__)


def stream(
    completion: Completion,
    behaviour: Behaviour,
    *,
    delay: float,
    faulty: bool,
    include_usage: bool,
    connection: ClientConnection,
    state: State,
) -> Iterator[bytes]:
    """Yield the frames of ``completion``, ``delay`` seconds apart, then ``[DONE]``."""
    frames = completion.frames()
    fault = behaviour.fault if faulty else None
    fault_at = min(behaviour.at, len(completion.tokens))
    outcome: Outcome = "cancelled"
    state.stream_started()
    logger.debug("%s: stream started (%d tokens)", completion.id, len(completion.tokens))
    try:
        yield frames.role()
        if connection.pause(behaviour.first_delay):
            return
        for index in range(len(completion.tokens) + 1):
            if index == fault_at and fault is not None:
                if fault == "disconnect":
                    logger.info("%s: dropping the connection after %d chunks", completion.id, index)
                    outcome = "faulted"
                    connection.drop()
                    return
                if fault == "stall":
                    logger.info(
                        "%s: stalling %ss after %d chunks", completion.id, behaviour.stall, index
                    )
                    if connection.pause(behaviour.stall):
                        return
                elif fault == "malformed":
                    logger.info(
                        "%s: sending a malformed chunk after %d chunks", completion.id, index
                    )
                    yield MALFORMED
                elif fault == "error":
                    logger.info("%s: sending an error object after %d chunks", completion.id, index)
                    outcome = "faulted"
                    yield b"data: " + json.dumps(STREAMED_ERROR).encode() + b"\n\n"
                    yield DONE
                    return
                elif fault in ("truncate", "truncate_eof"):
                    # A clean but early end: no finish_reason on any chunk, the
                    # usage chunk if asked for, then [DONE] or just the end of the body.
                    logger.info(
                        "%s: ending the stream early (%s) after %d chunks",
                        completion.id,
                        fault,
                        index,
                    )
                    outcome = "faulted"
                    if include_usage:
                        yield frames.usage()
                    if fault == "truncate":
                        yield DONE
                    return
            if index == len(completion.tokens):
                break
            if connection.pause(delay):
                return
            yield frames.token(completion.tokens[index])
        yield frames.finish()
        if include_usage:
            yield frames.usage()
        yield DONE
        outcome = "completed"
    finally:
        state.stream_finished(outcome)
        if outcome == "cancelled":
            logger.info("%s: the client left mid-stream", completion.id)
        else:
            logger.debug("%s: stream %s", completion.id, outcome)
