"""`run`'s children die with it (`suite._die_with`), even in the window between fork and exec.

The child of a fork keeps its parent's signal dispositions until exec, and `run` catches SIGTERM
(it stops the suite in order): the SIGTERM a child sent itself when `run` had died before the
prctl, or the death signal arriving before the exec, only set the stop flag of the child's copy of
`run`, and the child went on to exec a service that nobody would ever stop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

# A `run` that catches SIGTERM, starting a child whose parent (as `_die_with` is told) has gone.
_SCRIPT = textwrap.dedent(
    """
    import ctypes, functools, signal, subprocess, sys
    from services.cli.suite import _die_with

    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as `run` does (_StopRequested)
    proc = subprocess.Popen(
        [sys.executable, "-c", "print('started after its parent died')"],
        # Not our parent's pid: "the parent died before the prctl".
        preexec_fn=functools.partial(_die_with, 1, ctypes.CDLL(None, use_errno=True).prctl),
    )
    print(proc.wait())
    """
)


def test_a_child_whose_parent_died_before_the_prctl_never_starts() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    assert "started after its parent died" not in out.stdout, out.stdout
    assert out.stdout.strip() == str(-signal.SIGTERM), (out.stdout, out.stderr)
