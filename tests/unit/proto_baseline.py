"""The released API (protos/ as other services call and consume it) recorded as a reviewable baseline.

`make proto-baseline` runs this module to write tests/unit/proto_baseline.json; test_proto_compat.py
holds protos/ to it. buf (the buf-bin package) compiles the protos as configured in buf.yaml, so
what is recorded is what `buf breaking` reads back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "tests" / "unit" / "proto_baseline.json"
# The venv's own buf, whichever interpreter path the venv was entered by.
BUF = shutil.which("buf", path=str(Path(sys.executable).parent)) or "buf"


def build_image(root: Path = REPO) -> dict[str, Any]:
    """The protos of the buf module at root as a descriptor set in JSON (imports in, comments out)."""
    # Imports in: buf breaking resolves google/protobuf/*.proto from the baseline itself.
    # Source info (comments, line numbers) out: editing a comment does not change the API.
    done = subprocess.run(
        [BUF, "build", "--exclude-source-info", "-o", "-#format=json"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"buf build failed in {root}:\n{done.stderr}")
    return json.loads(done.stdout)


def render(node: Any, indent: str = "") -> str:
    """JSON with each leaf object (a field, an enum value, an RPC) on one line, so a diff reads as the API change."""
    # buf's own JSON is one line (and Go's protojson varies its spacing on purpose): useless in a review.
    if isinstance(node, dict) and any(isinstance(v, dict | list) for v in node.values()):
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {render(v, inner)}" for k, v in node.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(node, list) and node and any(isinstance(v, dict | list) for v in node):
        inner = indent + " "
        return "[\n" + ",\n".join(inner + render(v, inner) for v in node) + "\n" + indent + "]"
    return json.dumps(node)


def main() -> None:
    """Record the current protos as the released API (a deliberate act: see README, Calling it)."""
    BASELINE.write_text(render(build_image()) + "\n")
    print(f"wrote {BASELINE.relative_to(REPO)}: review its diff, then commit it with the proto change")


if __name__ == "__main__":
    main()
