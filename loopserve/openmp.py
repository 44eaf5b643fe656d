"""How long OpenMP threads spin before they sleep, for ``loopserve serve``.

libgomp's default lets a thread that finished its share of a parallel region spin for up to
300,000 rounds (about a millisecond here) before it sleeps. A decode step runs a few hundred
parallel regions, and each ends at a barrier that waits for the team's slowest thread: beside a
busy neighbour process, a two-thread server on two cores spends its steps waiting for the
thread whose core the neighbour holds, while the other spins. Measured on the 2-core Xeon
(``benchmarks/shared_machine.py``, SmolLM2-135M bf16, c = 4): quiet 162 tok/s, one busy
neighbour 3.4 tok/s (47x slower). Spinning 3,000 rounds keeps most of the quiet speed (132) and
slows in proportion beside a neighbour (72); sleeping at once (``OMP_WAIT_POLICY=PASSIVE``)
costs a third of the quiet speed (98). A dedicated machine gets libgomp's behaviour back with
``GOMP_SPINCOUNT=300000`` or ``OMP_WAIT_POLICY=ACTIVE``.
"""

from __future__ import annotations

from collections.abc import MutableMapping

SERVE_SPINCOUNT = "3000"
USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def apply_serving_default(environ: MutableMapping[str, str]) -> bool:
    """Set ``GOMP_SPINCOUNT`` unless the user chose a wait policy; True if it was set. Must run
    before torch (and with it libgomp) is imported: libgomp reads it once, at load."""
    if any(k in environ for k in USER_KNOBS):
        return False
    environ["GOMP_SPINCOUNT"] = SERVE_SPINCOUNT
    return True
