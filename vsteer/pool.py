"""Worker pools for jobs that run side by side on the CPU: spawned processes with pinned torch
threads (two processes of two threads each on two cores oversubscribe OpenMP and slow both far
more than 2x), quiet library logs, and an inline executor with the same interface for one worker.

Used by :mod:`vsteer.compare` (training runs) and :mod:`vsteer.run` (the main job's sections).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor


def init_worker(threads: int) -> None:
    """A worker process's set-up: ``threads`` torch threads, no progress bars, library logs at
    ERROR (the caller shows progress)."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("VSTEER_PROGRESS", "0")
    import logging

    for name in ("transformers", "trl", "datasets", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore")


class InlineExecutor:
    """Runs jobs in this process, one after another at ``threads`` torch threads (``workers: 1``)."""

    def __init__(self, threads: int):
        self.threads = threads

    def submit(self, fn, *args) -> Future:
        import torch

        f: Future = Future()
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            f.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            f.set_exception(err)
        finally:
            torch.set_num_threads(previous)
        return f

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def make_executor(workers: int, threads: int = 1):
    """``workers`` spawned processes of ``threads`` torch threads each (``workers`` 1: this
    process, one job after another)."""
    if workers <= 1:
        return InlineExecutor(threads)
    import multiprocessing as mp

    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=init_worker,
        initargs=(threads,),
    )
