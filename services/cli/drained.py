"""`livegifts nats-drained`: whether the suite may leave a NATS deployment without losing events.

A producer's outbox row is deleted once JetStream acked its publish, so an event its consumers
have not applied yet lives only in the NATS it was published to. Services moved to another NATS
(a new JetStream cluster: NATS_URL changed) bind new durables there and never read the old
streams again: what the old durables still had pending (gifts' diamonds, clawbacks, leaderboard
counts) is lost, and the position check at bind sees nothing (the new durables delivered nothing).
The old NATS may be left once nothing more is stored there (its suite streams sealed: the relays
then keep new events in their outbox, for the next NATS) and every durable on those streams has
applied and acked all it holds, and each of the suite's own durables (services/common/consumers.py)
is there on every stream of its that holds events: one missing (`nats consumer rm`, or its service
never ran on that NATS) applied nothing there that JetStream can count (docs/sre.md, "Moving the
suite to another NATS").
"""

from __future__ import annotations

from dataclasses import dataclass

import nats
from nats.js.errors import NotFoundError

from services.common.bus import STREAMS, described
from services.common.consumers import reading


@dataclass(frozen=True)
class Durable:
    """One durable on a suite stream, as JetStream counts it."""

    name: str
    not_delivered: int  # events of its filter not yet delivered (num_pending)
    not_acked: int  # delivered, not yet acked (num_ack_pending)


@dataclass(frozen=True)
class StreamState:
    """One suite stream on a NATS: absent, or its seal, its size and its durables."""

    name: str
    present: bool
    sealed: bool = False
    messages: int = 0
    durables: tuple[Durable, ...] = ()


class Unreachable(nats.errors.Error):
    """No server of the URL could be connected to; says why the last try failed."""


async def read_streams(url: str, timeout_s: float) -> list[StreamState]:
    """The suite's streams on the NATS at `url` (a NATS_URL: servers separated by commas)."""
    errors: list[Exception] = []

    async def kept(exc: Exception) -> None:
        errors.append(exc)

    try:
        nc = await nats.connect(
            servers=url.split(","),
            connect_timeout=timeout_s,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # each server twice: nats-py tries them 60 times by default
            reconnect_time_wait=0.2,  # between tries of one server (2 s by default)
            error_cb=kept,  # its default prints a traceback per try
        )
    except nats.errors.NoServersError as exc:
        # Which alone said "no servers available for connection", not why (refused, no such host).
        why = f": the last try {described(errors[-1])}" if errors else ""
        raise Unreachable(f"{described(exc)}{why}") from exc
    try:
        js = nc.jetstream(timeout=timeout_s)
        states = []
        for name in STREAMS:
            try:
                info = await js.stream_info(name)
            except NotFoundError:
                states.append(StreamState(name, present=False))
                continue
            durables = tuple(
                Durable(c.name, c.num_pending or 0, c.num_ack_pending or 0)
                for c in sorted(await js.consumers_info(name), key=lambda c: c.name)
            )
            states.append(StreamState(name, True, bool(info.config.sealed), info.state.messages, durables))
        return states
    finally:
        await nc.close()


def missing(state: StreamState) -> dict[str, str]:
    """The suite's durables that read this stream and are not on it, each with its service."""
    if not state.present:
        return {}
    held = {d.name for d in state.durables}
    return {name: svc for name, svc in sorted(reading(state.name).items()) if name not in held}


def problems(states: list[StreamState]) -> list[str]:
    """Why the suite may not leave that NATS yet; none when it may."""
    if not any(s.present for s in states):
        # Nothing to lose there, but more likely a wrong URL than the NATS the suite ran on.
        return ["none of the suite's streams is on this NATS: is it the one the services used?"]
    found = []
    for s in states:
        if s.present and not s.sealed:
            found.append(f"stream {s.name} is not sealed: the relays still store events in it")
        for d in s.durables:
            if d.not_delivered or d.not_acked:
                found.append(
                    f"durable {d.name} on {s.name} has {d.not_delivered} events not yet delivered"
                    f" and {d.not_acked} not yet acked"
                )
        if s.messages:  # a stream that holds no event has nothing left to apply
            found += [
                f"durable {name} is missing on {s.name}, which holds {s.messages} events: whether {svc}"
                f" applied those it reads cannot be known; start {svc} on this NATS until its durable"
                " has caught up (a new one delivers the stream from its start; the inbox skips what was"
                " applied)"
                for name, svc in missing(s).items()
            ]
    return found
