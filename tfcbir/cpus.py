"""How many CPUs this process may use: the one count that sizes every thread pool.

Decoding pools (:mod:`datasets.pipeline`) and the metrics' ranking threads
(:mod:`retrieval.metrics`) each cap it at their own limit.
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask on Linux, else every CPU), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus)
