"""Garbage-collector settings for processes that build many short-lived objects per batch.

A credit-service batch of 5,000 events allocates some 50,000 objects that all live until the batch is
committed. With CPython's default thresholds (700, 10, 10) that triggers dozens of young collections
per batch and, every hundred of them, a full one that walks every object the process holds, modules
included. None of it finds garbage: these objects hold no reference cycles and are freed by reference
counting. Measured on the credit service, that walking took a quarter of the consumer's CPU.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune_for_batches() -> None:
    """Collect less often, and never again walk what was loaded at start-up."""
    gc.collect()
    gc.freeze()  # start-up objects (modules, classes, settings) move out of the collector's reach
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
