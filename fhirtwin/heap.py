"""Garbage-collector settings for fhirtwin's processes (workers, the MLLP listener, batch
conversion), not for a program that imports fhirtwin as a library.

A worker's heap is mostly objects that live as long as the process: the fhir.resources
model classes and their pydantic-core schemas, the compiled mapping rules, fastcheck's
tables. CPython's cyclic collector walks all of them at every full collection, and
conversion allocates so many short-lived dicts that collections are frequent: on the
HL7 v2 corpus mix one core converts 672 msg/s with the default settings and 870 settled
(``bench/hl7v2.py``, its "default GC" row against "validation off"). Reference counting
still frees what conversion makes; only cycles wait a little longer for the collector.
See docs/architecture.md.
"""

from __future__ import annotations

import gc

__all__ = ["enable", "settle"]

# A worker holds a whole batch (up to 500 messages' resources, ~300k objects) until Kafka
# acknowledges it, and the young-generation count grows with what stays alive: at 10,000 the
# collector ran dozens of times a batch over the same live objects. At 200,000 the stage cost
# (`taskset -c 1 bench/e2e.py --skip-pipeline --skip-update-cost --stage-n 3000`, validation
# off, two runs each) is 452 µs a message to normalize and 363–365 to assemble, against 470
# and 389–395 at 10,000; a scratch run at 1,000,000 gave no more. Garbage without cycles is
# freed by reference counting as before; only cycles wait longer.
YOUNG_THRESHOLD = 200_000
_enabled = False


def enable() -> None:
    """Let ``settle`` act: called by the ``fhirtwin`` command (and the benches), whose
    process is fhirtwin's own. In a program or test run that only imports fhirtwin,
    ``settle`` does nothing: objects frozen there could be garbage cycles later, which
    the collector would then never free."""
    global _enabled
    _enabled = True


def settle() -> None:
    """Move everything alive now out of the collector's sight (``gc.freeze``) and collect
    the young generation less often. Called once what lives for the whole process is
    loaded (rules compiled, models imported); again later is harmless. A no-op unless
    ``enable`` was called."""
    if not _enabled:
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
