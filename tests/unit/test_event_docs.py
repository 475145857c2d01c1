"""README's "Events" section, the one page other teams consume the suite's events from, against
the code: every subject a service publishes is in its table with its stream and payload message
(the message events.proto names for it), and the headers, retention, duplicate window and durable
names it gives are the ones the services use. A subject added without its row, or a row left for a
subject gone, fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from services.common import bus
from services.common.config import STREAM_MAX_AGE_S, ServiceSettings
from services.common.consumers import CONSUMERS
from services.common.outbox import new_event_id

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SUBJECT = re.compile(r"(?:wallet|gifting|payout)\.[a-z_]+\.[a-z_]+")
HEADING = "\n## Events, for the teams that consume them\n"


def _section() -> str:
    assert HEADING in README, "README has no section on the events for their consumers"
    return README.split(HEADING, 1)[1].split("\n## ", 1)[0]


def _table() -> list[tuple[str, str, str]]:
    """The section's table as (stream, subject, payload message) rows."""
    rows = []
    for line in _section().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows.append((cells[0], cells[1], cells[2]))
    assert rows, "the events section has no table"
    return rows


def _published_subjects() -> set[str]:
    """Every subject literal in the services' code (what their outboxes write and consumers bind to)."""
    found = set()
    for path in (REPO / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SUBJECT.fullmatch(node.value):
                found.add(node.value)
    return found


def _proto_subjects() -> dict[str, str]:
    """subject -> the full name of the message events.proto's comment above it gives for it."""
    out: dict[str, str] = {}
    for path in sorted((REPO / "protos" / "livegifts").glob("*/v1/events.proto")):
        text = path.read_text()
        package = re.search(r"^package ([\w.]+);", text, re.M)
        assert package is not None, path
        comment: list[str] = []
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("//"):
                comment.append(stripped)
                continue
            match = re.match(r"message (\w+) \{", stripped)
            if match:
                for subject in SUBJECT.findall(" ".join(comment)):
                    out[subject] = f"{package.group(1)}.{match.group(1)}"
            comment = []
    return out


def test_the_events_table_names_exactly_the_subjects_the_services_publish() -> None:
    documented = [subject for _, subject, _ in _table()]
    assert len(documented) == len(set(documented)), "a subject has two rows"
    assert set(documented) == _published_subjects()


def test_each_row_gives_the_stream_that_holds_its_subject_and_the_message_events_proto_names() -> None:
    messages = _proto_subjects()
    assert set(messages) == _published_subjects(), "events.proto's comments name another set of subjects"
    for stream, subject, message in _table():
        assert stream == bus.stream_of(subject), (subject, stream)
        assert message == messages[subject], (subject, message)


def test_every_message_of_events_proto_is_a_payload_of_the_table() -> None:
    payloads = {message for _, _, message in _table()}
    for path in sorted((REPO / "protos" / "livegifts").glob("*/v1/events.proto")):
        text = path.read_text()
        package = re.search(r"^package ([\w.]+);", text, re.M)
        assert package is not None, path
        for name in re.findall(r"^message (\w+) \{", text, re.M):
            assert f"{package.group(1)}.{name}" in payloads, name


def test_the_headers_retention_and_durables_it_gives_are_the_suites() -> None:
    section = _section()
    relay = (REPO / "services" / "common" / "outbox.py").read_text()
    for header in set(re.findall(r"`(Nats-[A-Za-z-]+)`", section)):
        assert f'"{header}"' in relay, f"the relay sets no {header} header"
    assert f"{STREAM_MAX_AGE_S // 86400} days (`max_age`)" in section
    window = ServiceSettings.model_fields["nats_duplicate_window_s"].default
    assert f"`NATS_DUPLICATE_WINDOW_S` ({window:g} s)" in section
    inbox_days = ServiceSettings.model_fields["inbox_retention_days"].default
    assert f"`INBOX_RETENTION_DAYS`, {inbox_days:g} days" in section
    # The one list of the durables the services subscribe under (app.serve refuses a service
    # whose subscriptions differ from it), and the ack wait the inbox gives each.
    durables = {name for names in CONSUMERS.values() for name in names}
    bullet = section.split("**Durables**", 1)[1].split("\n- ", 1)[0]
    assert durables and durables == set(re.findall(r"`([a-z]+(?:-[a-z]+)+)`", bullet))
    ack_wait = re.search(r"^ACK_WAIT_S = (\d+)$", (REPO / "services" / "common" / "inbox.py").read_text(), re.M)
    assert ack_wait and f"{ack_wait[1]} s ack wait" in bullet


def test_the_units_paragraph_names_every_timestamp_field_of_the_payloads() -> None:
    """A consumer learns a timestamp's meaning from the Units paragraph: one it does not name
    (StreamEnded's `ended_at` was not) left them to guess when it was read."""
    units = _section().split("\nUnits: ", 1)[1].split("\n\n", 1)[0]
    fields = set()
    for path in sorted((REPO / "protos" / "livegifts").glob("*/v1/events.proto")):
        fields |= set(re.findall(r"google\.protobuf\.Timestamp (\w+) = \d+;", path.read_text()))
    assert fields, "events.proto has no timestamps"
    assert {f for f in fields if f"`{f}`" not in units} == set()


def test_the_event_ids_are_the_32_hex_digits_it_says() -> None:
    assert "(32 hex digits)" in _section()
    assert all(re.fullmatch(r"[0-9a-f]{32}", new_event_id()) for _ in range(100))


def test_the_totals_it_tells_a_consumer_to_rebuild_are_held_by_a_test() -> None:
    bullet = _section().split("**Rebuilding the books**", 1)[1].split("\n- ", 1)[0]
    held = re.search(r"`(tests/integration/\w+\.py)`", bullet)
    assert held and (REPO / held[1]).is_file()
    # Every payload field the bullet sums or joins on is one of events.proto's.
    protos = " ".join(p.read_text() for p in (REPO / "protos" / "livegifts").glob("*/v1/events.proto"))
    for message, name in re.findall(r"`(\w+)\.(\w+)`", bullet):
        assert re.search(rf"message {message} \{{[^}}]*\b{name} = \d+;", protos), f"{message}.{name}"


def test_the_sre_sections_it_sends_a_consumer_to_exist() -> None:
    """A consumer follows these to what repeats or holds back events: a renamed heading left them
    a dead reference."""
    headings = set(re.findall(r"^#+ (.+)$", (REPO / "docs" / "sre.md").read_text(), re.M))
    named = re.findall(r'docs/sre\.md(?:, | \(|, same section)?"([^"]+)"', _section())
    assert {"Restoring one service's database", "When JetStream refuses events"} <= set(named)
    assert set(named) <= headings
