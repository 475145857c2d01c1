"""`livegifts`: the operator and developer CLI (services/cli/main.py); `entry_point` starts it.

Nothing here imports gRPC: GRPC_VERBOSITY must be set before it is imported to take effect.
"""

from __future__ import annotations

import os

# What `quiet_grpc` set for this process only: `run` starts the services without it.
CLI_ONLY_ENV: set[str] = set()


def quiet_grpc() -> None:
    """Keep gRPC's own log off the CLI's stderr, unless the user set GRPC_VERBOSITY (`debug` to
    troubleshoot a connection).

    Its C core logs some failures itself (a target it cannot parse, `--wallet-addr ""`: "E1207
    ... dns_resolver.cc:554] no server name supplied in dns URI" and three more lines) beside the
    one line the CLI prints for them. GRPC_VERBOSITY=NONE silences it; gRPC reads it once, when
    it is imported, so this runs before anything imports grpc.
    """
    if "GRPC_VERBOSITY" not in os.environ:
        os.environ["GRPC_VERBOSITY"] = "NONE"
        CLI_ONLY_ENV.add("GRPC_VERBOSITY")


def entry_point() -> None:
    """Entry point of the `livegifts` command (the console script, the image's, `python -m services.cli`)."""
    quiet_grpc()
    from services.cli.main import main

    main()
