"""What a long step says while it runs: a bar on a terminal, a line in a log.

Tokenising, loading a model and fetching one from the Hub each print a line when they start
and when they end (a log shows where the time went); on a terminal the long ones also draw a
bar. The libraries' own bars (transformers' "Loading weights", the Hub's downloads, datasets')
are turned off when the output is not a terminal, where they only fill logs with carriage
returns (``quiet_library_bars``, called once by the command line).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


def on_terminal() -> bool:
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """transformers', huggingface_hub's and datasets' progress bars off unless on a terminal."""
    if on_terminal():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def bar(total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar on a terminal; nothing (a disabled bar) in a log."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None)  # None: off off a terminal


def main_process() -> bool:
    """The first process of a launch (torchrun, accelerate: RANK), or the only one: the one
    that speaks, so that eight processes do not print every line eight times."""
    import os

    return os.environ.get("RANK", "0") == "0"


@contextmanager
def step(what: str, enabled: bool | None = None):
    """``what ...`` when it starts and ``what: done in 4.2 s`` when it ends (flushed: a log
    shows a long step while it runs); by default in the main process only."""
    if not (main_process() if enabled is None else enabled):
        yield
        return
    print(f"{what} ...", file=sys.stderr, flush=True)  # stderr: a command's output stays its result
    t0 = time.perf_counter()
    yield
    print(f"{what}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
