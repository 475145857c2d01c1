"""Protobuf requests as the idempotency tests vary them: the same request again under another
key, or another request under the same key."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def copy_of(req: M, **fields: object) -> M:
    """A copy of `req` with `fields` set (the same key unless `idempotency_key` is one of them)."""
    copy = type(req)()
    copy.CopyFrom(req)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy
