"""NATS JetStream: connection, the streams of the suite, created idempotently at start."""

from __future__ import annotations

import asyncio
import json
import logging

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError

from services.common.config import STREAM_MAX_AGE_S, ServiceSettings
from services.common.errors import StartupError, check
from services.common.loops import sleep_unless_stopped
from services.common.metrics import STREAM_PURGES, STREAMS_RECREATED
from services.common.throttle import LogThrottle

log = logging.getLogger(__name__)

# One stream per producing service; subjects <svc>.<noun>.<verb>.
STREAMS: dict[str, list[str]] = {
    "WALLET": ["wallet.>"],
    "GIFTING": ["gifting.>"],
    "PAYOUT": ["payout.>"],
}
# STREAM_MAX_AGE_S (config.py): a month of replay for consumers that were down.
JETSTREAM_TIMEOUT_S = 5.0  # how long a JetStream API call or publish waits for its answer
ERR_STREAM_NOT_FOUND = 10059  # JetStream's API error for a stream that does not exist
# The most bytes one event may count against the NATS servers' max_payload (payload and headers:
# `message_bytes`), which a service checks when it connects. The largest the fields' limits allow,
# as the relay sends it, is 12.7 KB (tests/unit/test_event_size.py builds each kind):
# headers 8.4 KB: tracestate up to 8,192 characters (OpenTelemetry drops a caller's longer one; no
# baggage, telemetry.PROPAGATOR), traceparent, Nats-Msg-Id and the atomic batch's three; payload at
# most 4.3 KB, a tip's GiftSent: a 500-character message (TIP_MESSAGE_CHARS_MAX's ceiling) and four
# ids of ID_MAX (128) characters, 4 UTF-8 bytes each at worst. 16 KiB leaves room for a new field;
# nats-server's default max_payload is 1 MiB.
EVENT_BYTES_MAX = 16 * 1024
# At most one "NATS error" line this often: while NATS is down, the client calls its error
# callback at every reconnect attempt (each 0.5 s), which logged two lines a second per service.
# The first error of an outage is logged at once; the next line counts those not logged.
NATS_ERROR_LOG_INTERVAL_S = 5.0
# JetStream's audit advisory of each API call of the account (nats-server sends them to whoever
# listens): how a purge (`nats stream purge`) or a message deleted by hand (`nats stream rmm`) is
# seen. Either loses the events consumers had not applied yet, and left no trace in the services.
API_AUDIT_SUBJECT = "$JS.EVENT.ADVISORY.API"
# A stream update (`nats stream edit`) that sets a limit below the suite's: the stream drops its
# oldest events beyond it at once, consumed or not (discard `old`), as a purge does. NATS's users
# may update their streams (each service re-applies its configuration at connect, operators seal
# them), so no permission refuses it; the audit advisory shows it.
LIMITS_LOWERED = "limits lowered"
REMOVAL_APIS = {
    "$JS.API.STREAM.PURGE.": "purged",
    "$JS.API.STREAM.MSG.DELETE.": "message deleted",
    "$JS.API.STREAM.UPDATE.": LIMITS_LOWERED,
}
# The limits a stream update can lower, as JetStream's API writes them (max_age in nanoseconds);
# -1, 0 or none: unlimited.
STREAM_LIMITS = ("max_msgs", "max_bytes", "max_age", "max_msgs_per_subject")
AUDITED_APIS = [api.encode() for api in REMOVAL_APIS]  # the fast path's bytes check


def stream_of(subject: str) -> str | None:
    """The suite's stream that holds `subject`, or None."""
    for name, subjects in STREAMS.items():
        if any(subject.startswith(f.removesuffix(">")) for f in subjects):
            return name
    return None


def lowered_limits(config: dict[str, object], ours: dict[str, object]) -> dict[str, int]:
    """The limits of a stream's `config` tighter than `ours` (both as JetStream's API writes them)."""
    lowered: dict[str, int] = {}
    for key in STREAM_LIMITS:
        theirs, mine = config.get(key), ours.get(key)
        if isinstance(theirs, int) and theirs > 0 and not (isinstance(mine, int) and 0 < mine <= theirs):
            lowered[key] = theirs
    return lowered


def message_bytes(payload: bytes, headers: dict[str, str] | None) -> int:
    """What a publish of `payload` with `headers` counts against the server's max_payload: the
    payload and the header block as nats-py writes it ("NATS/1.0\r\n", "Key: Value\r\n" each,
    "\r\n"). nats-py itself checks the payload alone; a message over the limit with its headers
    made the server close the connection (every publish in flight on it failed)."""
    if not headers:
        return len(payload)
    return len(payload) + 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def described(exc: BaseException) -> str:
    """A NATS error as the logs show it. nats-py's repr() of JetStream's refusals is the class
    alone (`ServiceUnavailableError()`, `APIError()`), the same for a full stream, a full store,
    JetStream off or a server shutting down; their str() carries the server's code, err_code and
    description (`... err_code=10077 description='maximum messages exceeded'`), which say which."""
    if isinstance(exc, nats.errors.Error) and str(exc):
        return str(exc)
    return repr(exc)


def is_stream_missing(exc: BaseException) -> bool:
    """Whether `exc` says a stream does not exist: a JetStream API call on it (10059), or a
    publish no stream took (nats-py's NoStreamResponseError: no stream listens on the subject)."""
    if isinstance(exc, NoStreamResponseError):
        return True
    return isinstance(exc, NotFoundError) and exc.err_code == ERR_STREAM_NOT_FOUND


class _Client(Client):
    """nats-py's client, but a request whose publish fails leaves nothing behind.

    `request` puts the future of its answer in `_resp_map`, under the reply subject's token,
    before it publishes, and removes it only once the future is done (answered, or timed out).
    A publish that raises (OutboundBufferLimitError while NATS is down and the reconnect buffer
    is full, ConnectionClosedError, a cancellation) left the future there for as long as the
    connection lives, which is the process's: the relay, which publishes each row of a batch
    every backoff of an outage, left about one a row (256 every 5 s), and JetStream API calls
    (a consumer binding again) one each. Measured on a gifting service taking tips through a
    5.5-minute NATS outage: from about 3.5 minutes in (the 2 MB buffer full), 51 a second, and
    8,483 still held after NATS was back and the outbox drained; with this, none.
    """

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """`Client.publish`; if it raises, the request waiting on `reply` (if any) is forgotten."""
        try:
            await super().publish(subject, payload, reply, headers)
        except BaseException:
            # nats-py 2.16's internals, read with getattr: a release without them loses nothing
            # here but this cleanup (tests/integration/test_bus_requests.py then says so).
            prefix_bytes = getattr(self, "_resp_sub_prefix", None)
            prefix = bytes(prefix_bytes).decode() if prefix_bytes else ""
            if prefix and reply.startswith(prefix):
                waiting = getattr(self, "_resp_map", {}).pop(reply[len(prefix) :], None)
                if waiting is not None:
                    waiting.cancel()  # nobody awaits it: the request raises this error
            raise


class Bus:
    """A NATS connection with JetStream; reconnects forever once connected."""

    def __init__(self, settings: ServiceSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.connected = asyncio.Event()
        # Streams that take atomic batch publishes (nats-server >= 2.12, allow_atomic), by name.
        self.atomic_streams: set[str] = set()
        self._closing = False  # close() called: the disconnect that follows is ours, not news
        self._restoring = asyncio.Lock()  # one re-creation at a time (the relay and consumers may all see it)
        self._error_log = LogThrottle(NATS_ERROR_LOG_INTERVAL_S)
        self._watched: set[str] = set()  # the streams whose purges this service reports

    async def connect(self, stop: asyncio.Event, streams: list[str]) -> None:
        """Connect (retrying with backoff until `stop`), then ensure `streams` exist."""
        delay = 0.2
        while not stop.is_set():
            try:
                nc = _Client()
                await nc.connect(
                    servers=self.settings.nats_url.split(","),
                    name=self.name,
                    # Its own inboxes (API answers, PubAcks, pulled deliveries): NATS's users may
                    # each subscribe to their service's alone (deploy/k8s/nats/auth.conf), not read
                    # another's deliveries off `_INBOX.>`.
                    inbox_prefix=f"_INBOX.{self.name}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                )
                self.nc = nc
                self._check_max_payload()
                self.js = self.nc.jetstream(timeout=JETSTREAM_TIMEOUT_S)
                for stream in streams:
                    await self.ensure_stream(stream)
                self._watched = set(streams)
                await self.nc.subscribe(API_AUDIT_SUBJECT, cb=self._on_api_audit)
                self.connected.set()
                # As at a reconnect (the client calls no reconnect callback for its first
                # connect): the start's errors counted here, the next outage's first logged at once.
                log.info(
                    "connected to NATS",
                    extra={"streams": ",".join(streams), "errors_not_logged": self._error_log.reset()},
                )
                return
            except StartupError:
                await self._close_quietly()
                raise
            except Exception as exc:  # noqa: BLE001 - keep trying; the outbox holds events meanwhile
                log.warning("NATS not reachable, retrying", extra={"error": described(exc), "retry_in_s": delay})
                if self.nc is not None:
                    await self._close_quietly()
                await sleep_unless_stopped(stop, delay)
                delay = min(delay * 2, 5.0)

    def _check_max_payload(self) -> None:
        """Refuse a server that takes smaller messages than our events (its INFO's max_payload):
        each event over it would wait in the outbox for good (OutboxRelay holds it)."""
        check(self.nc is not None, "self.nc is not None")
        if self.nc.max_payload < EVENT_BYTES_MAX:
            # Host and port only: a URL's user and password stay out of the message.
            url = self.nc.connected_url
            server = f"{url.hostname}:{url.port}" if url is not None else "the NATS server"
            raise StartupError(
                f"NATS at {server} takes messages of at most {self.nc.max_payload} bytes (its max_payload), "
                f"fewer than the {EVENT_BYTES_MAX} bytes an event of the suite may take: raise max_payload in "
                "the nats-server configuration (1 MiB by default)"
            )

    async def ensure_stream(self, name: str) -> None:
        """Create the stream, or update it to this configuration (idempotent).

        It asks for atomic batch publishes (the outbox relay stores a batch of events with one
        request, `OutboxRelay`); a server that cannot (before 2.12) gets the stream without, and
        the relay publishes one event at a time there.
        """
        config = self.stream_config(name)
        try:
            info = await self._create_or_update(config)
        except APIError as exc:
            log.warning("stream refused atomic batches; relaying one event at a time", extra={"error": repr(exc)})
            config.allow_atomic = None
            info = await self._create_or_update(config)
        if info.config.allow_atomic:
            self.atomic_streams.add(name)
        else:
            self.atomic_streams.discard(name)

    def stream_config(self, name: str) -> StreamConfig:
        """The configuration the suite gives stream `name` (`ensure_stream`)."""
        return StreamConfig(
            name=name,
            subjects=STREAMS[name],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            duplicate_window=self.settings.nats_duplicate_window_s,
            num_replicas=self.settings.nats_stream_replicas,
            max_age=STREAM_MAX_AGE_S,
            allow_atomic=True,
        )

    async def restore_stream(self, name: str) -> bool:
        """Create `name` again after a publish or a consumer found it missing, or set its subjects
        back when they no longer take the suite's; True if this call did either.

        The streams are made at connect only: one deleted while the service ran (an operator's
        mistake, `nats stream rm`) stayed gone until a restart, the relay refusing every event
        (they waited in the outbox) and the consumers binding in vain. Its events that were stored
        and not yet consumed went with it; what is still in the outboxes is published into the new
        stream, and each consumer's durable is made again from the start of it (DeliverPolicy.ALL).
        """
        check(self.js is not None, "self.js is not None")
        async with self._restoring:
            try:
                subjects: list[str] | None = list((await self.js.stream_info(name)).config.subjects or ())
            except NotFoundError:
                subjects = None
            if subjects is not None and set(STREAMS[name]) <= set(subjects):
                return False  # another task (or replica) made it meanwhile
            # Missing, or there with its subjects edited (`nats stream edit`) so that it no longer
            # takes ours: the same "no response from stream", until a restart.
            await self.ensure_stream(name)
        STREAMS_RECREATED.inc()
        if subjects is None:
            log.error(
                "stream was missing (deleted?); created it again: its events not yet consumed are lost, run the audit",
                extra={"stream": name},
            )
        else:
            log.error(
                "stream no longer took the suite's subjects (edited?); set them back",
                extra={"stream": name, "subjects": subjects},
            )
        return True

    async def _on_api_audit(self, msg: Msg) -> None:
        """Report what removed events from one of our streams and succeeded: a purge, a message
        deleted, or an update that set a limit below the suite's."""
        if not any(api in msg.data for api in AUDITED_APIS):
            return  # every other API call of the account (stream and consumer info, get_msg): not parsed
        try:
            audit = json.loads(msg.data)
            subject = str(audit.get("subject", ""))
            what, stream = next(
                ((w, subject[len(p) :]) for p, w in REMOVAL_APIS.items() if subject.startswith(p)), ("", "")
            )
            if stream not in self._watched:
                return
            response = json.loads(audit.get("response") or "{}")
            if what == LIMITS_LOWERED:
                # The answer holds the stream's configuration after the update (none if refused):
                # the suite's own at connect, or an operator's seal, sets no limit below ours.
                lowered = lowered_limits(response.get("config") or {}, self.stream_config(stream).as_dict())
                if not lowered:
                    return
                line = (
                    "stream limits lowered by hand: its events beyond them are dropped, consumed or not, run the audit"
                )
                # max_age in seconds, as `nats stream edit` and the suite's configuration give it
                limits = (f"{k}={v / 1e9:.9g}s" if k == "max_age" else f"{k}={v}" for k, v in lowered.items())
                detail: dict[str, object] = {"limits": ", ".join(limits)}
            elif response.get("success"):
                line = "stream purged by hand: its events not yet consumed are lost, run the audit"
                detail = {"purged": response.get("purged", 1), "request": str(audit.get("request", ""))[:200]}
            else:
                return
            client = audit.get("client") or {}
        except (ValueError, TypeError, AttributeError):
            return  # not an audit advisory as we know it: nothing to report
        STREAM_PURGES.inc()
        log.error(
            line,
            extra={
                "stream": stream,
                "removal": what,
                **detail,
                # Who asked, as the server knew the connection (an operator's `nats` CLI: its host and user).
                "client_host": str(client.get("host", "")),
                "client_user": str(client.get("user", "")),
                "client_name": str(client.get("name", "")),
            },
        )

    async def _create_or_update(self, config: StreamConfig) -> StreamInfo:
        """Create the stream, or update it to `config`; one an operator sealed is left as it is.

        A sealed stream stores no new event (the relays keep them in their outbox) while its
        durables still deliver and take acks: how the suite leaves a NATS deployment for another
        without losing what the old one holds (docs/sre.md, "Moving the suite to another NATS").
        JetStream refuses to unseal one, so its update failed every connect: a pod started
        meanwhile (a crash, a scale-up) never connected, and its consumers did not drain it.
        """
        check(self.js is not None, "self.js is not None")
        try:
            return await self.js.add_stream(config)
        except BadRequestError:
            info = await self.js.stream_info(config.name)
            if info.config.sealed:
                log.warning(
                    "stream is sealed (the suite moving to another NATS?): it takes no new events,"
                    " which wait in the outbox; its consumers read what it holds",
                    extra={"stream": config.name},
                )
                return info
            return await self.js.update_stream(config)

    def atomic_stream_of(self, subjects: set[str]) -> str | None:
        """The stream holding every one of `subjects` if it takes atomic batches, else None."""
        for name in self.atomic_streams:
            prefixes = [f.removesuffix(">") for f in STREAMS[name]]
            if all(any(s.startswith(p) for p in prefixes) for s in subjects):
                return name
        return None

    async def close(self) -> None:
        """Flush and close the connection."""
        if self.nc is None or self.nc.is_closed:
            return
        self._closing = True
        if not self.nc.is_connected:
            await self._close_quietly()  # nothing to drain through: the server is gone
            return
        try:
            await asyncio.wait_for(self.nc.drain(), 5)
        except Exception:  # noqa: BLE001 - closing anyway
            await self._close_quietly()

    async def _close_quietly(self) -> None:
        try:
            if self.nc is not None:
                await self.nc.close()
        except Exception:  # noqa: BLE001
            pass

    async def _on_error(self, exc: Exception) -> None:
        errors = self._error_log.occurred()  # since the previous such line, this one included
        if errors:
            log.warning("NATS error", extra={"error": repr(exc), "errors_not_logged": errors - 1})

    async def _on_disconnect(self) -> None:
        if self._closing:
            log.info("NATS connection closed")
            return
        log.warning("NATS disconnected")

    async def _on_reconnect(self) -> None:
        # The next outage's first error is logged at once; this one's last errors are counted here.
        log.info("NATS reconnected", extra={"errors_not_logged": self._error_log.reset()})
