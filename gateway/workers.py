"""Several gateway worker processes on one port (``tokenflow serve --workers N``).

The parent forks N workers; each binds the port with SO_REUSEPORT (the kernel spreads new connections over
them) and runs a whole gateway: its own event loop, pacing clock and client writers, so one gateway uses every
core. Workers share state as replicas do, through the Redis session store (``gateway.cli.workers_problem``
says what is required): one scheduler per engine by the driver lease, every worker's streams published to it,
and any worker can resume any stream. The parent only forwards SIGINT/SIGTERM and, when one worker exits, stops
the others and exits with its status, so the supervisor (systemd, Kubernetes) restarts the whole gateway.
Workers die with the parent (``PR_SET_PDEATHSIG``), so killing the parent never leaves one holding the port.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable


def run_workers(n: int, run_one: Callable[[int], int]) -> int:
    """Fork ``n`` processes running ``run_one(index)``; return the first one's exit status to end."""
    sys.stdout.flush()
    sys.stderr.flush()
    children: list[int] = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                _die_with_parent()
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = run_one(i)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - report and exit: this process must not return
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for c in children:
            try:
                os.kill(c, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    alive = set(children)
    pid, status = os.wait()
    alive.discard(pid)
    code = os.waitstatus_to_exitcode(status)
    for c in alive:  # one worker is gone: stop the rest, the supervisor restarts the gateway whole
        try:
            os.kill(c, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for c in alive:
        os.waitpid(c, 0)
    return code if code >= 0 else 128 - code


def _die_with_parent() -> None:
    """Linux: this worker is killed when the parent dies (a supervisor's SIGKILL after its grace period reaches
    the workers too, rather than leaving them bound to the port)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass
