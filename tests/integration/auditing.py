"""What the audit tests on a running suite share: the suite's three addresses, the `livegifts
audit` CLI run against them, and a ListAuditRecords read followed page by page."""

from __future__ import annotations

import os
import subprocess
import sys

from livegifts.common.v1 import audit_pb2
from services.cli.suite import Suite


def addrs(suite: Suite) -> tuple[str, str, str]:
    """The wallet's, gifting's and payout's addresses, in the order `collect` takes them."""
    return suite.addr("wallet"), suite.addr("gifting"), suite.addr("payout")


def audit_cli(suite: Suite, *args: str) -> subprocess.CompletedProcess[str]:
    """`livegifts audit *args` against the suite, as a process of its own (a wide terminal, so no
    line of the report wraps)."""
    wallet, gifting, payout = addrs(suite)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "audit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "LIVEGIFTS_WALLET_ADDR": wallet,
            "LIVEGIFTS_GIFTING_ADDR": gifting,
            "LIVEGIFTS_PAYOUT_ADDR": payout,
            "COLUMNS": "300",
        },
    )


def audit_pages(stub, request: audit_pb2.ListAuditRecordsRequest) -> list[audit_pb2.ListAuditRecordsResponse]:  # type: ignore[no-untyped-def]
    """Every page of a ListAuditRecords read, from `request`'s page token to the last page."""
    pages = []
    while True:
        page = stub.ListAuditRecords(request)
        pages.append(page)
        if not page.next_page_token:
            return pages
        following = audit_pb2.ListAuditRecordsRequest()
        following.CopyFrom(request)
        following.page_token = page.next_page_token
        request = following
