"""A third-party-style variant for the crash-isolation tests, installed through the
`infermatrix.variants` entry point by tests/conftest.py (so that case processes,
which start fresh, find it too)."""

import os
import signal
import time
from dataclasses import dataclass

from infermatrix.variants import Variant, with_attention


@dataclass(frozen=True)
class Fault(Variant):
    axis = "graph"
    description = "test only: fails on purpose"
    kind: str = "raise"  # raise | segfault | hang | exit | exit_later (the first attention call after 0.3 s)

    def apply(self, model):
        if self.kind == "exit_later":  # dies mid-run, e.g. in an interleaved run's second round
            deadline, attention = time.monotonic() + 0.3, model.attention

            def dying(*args, **kwargs):
                if time.monotonic() > deadline:
                    os._exit(3)
                return attention(*args, **kwargs)

            return with_attention(model, dying)
        if self.kind == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif self.kind == "hang":
            time.sleep(3600)
        elif self.kind == "exit":
            os._exit(3)
        raise RuntimeError("injected failure")
