"""What test_data.py's child processes run: a module of its own, so that a child imports rs_data, not the tests."""
import resource
import time
from pathlib import Path

import numpy as np
import torch

import rs_data


def run(q, target, args):
    try:
        q.put(("ok", target(*args)))
    except BaseException as e:  # noqa: B902 (reported to the parent)
        q.put(("raised", f"{type(e).__name__}: {e}"))


def potsdam_train(root: Path, cache: Path, **kw) -> np.ndarray:
    return rs_data.task_tiles("potsdam", root, "train", cache, **{"log": lambda m: None, **kw})


def limit_file_size(nbytes: int):
    """What a full disk does to a write, in this process only: writes past nbytes fail with EFBIG (Python
    ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def write_many(path: Path, byte: bytes, n: int):
    def write(tmp):
        with open(tmp, "wb") as f:
            for _ in range(8):  # slowly, in pieces: the other process writes at the same time
                f.write(byte * 4096)
                time.sleep(0.001)
    for _ in range(n):
        rs_data.atomic_write(path, write)
    return "done"


def write_under_limit(path: Path, how: str):
    limit_file_size(100_000)
    writers = {"text": lambda tmp: tmp.write_text("x" * 300_000),  # OSError EFBIG
               "numpy": lambda tmp: np.save(open(tmp, "wb"), np.zeros(100_000)),  # OSError without errno
               "torch": lambda tmp: torch.save({"w": torch.zeros(100_000)}, tmp)}  # RuntimeError of its writer
    rs_data.atomic_write(path, writers[how])


def build_under_limit(root: Path, cache: Path):
    limit_file_size(300_000)  # the train cache is 4 patches, 786 kB
    potsdam_train(root, cache)


def slow_build(root: Path, cache: Path, start):
    start.wait(timeout=60)  # both processes are in flight before either builds (one never takes both jobs)
    real = rs_data.read_rgb

    def slow(*a, **k):
        time.sleep(0.3)  # the other process starts while this one builds
        return real(*a, **k)

    rs_data.read_rgb = slow
    logs = []
    tiles = rs_data.task_tiles("potsdam", root, "train", cache, log=logs.append)
    return np.array(tiles), logs
