"""One node per state directory: the lock is exclusive, names its owner and frees on exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.state_lock import LOCK_FILE_NAME, StateDirectoryInUse, StateLock, running_node


def test_a_second_holder_is_refused_with_the_owner(tmp_path: Path) -> None:
    first = StateLock.acquire(tmp_path)
    with pytest.raises(StateDirectoryInUse, match=rf"in use by another lumbar-node \(pid {os.getpid()}\)"):
        StateLock.acquire(tmp_path)
    first.release()
    first.release()  # idempotent
    StateLock.acquire(tmp_path).release()  # free again
    assert (tmp_path / LOCK_FILE_NAME).stat().st_mode & 0o077 == 0


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from node.state_lock import StateLock; "
         f"StateLock.acquire(Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateDirectoryInUse, match=f"pid {holder.pid}"):
            StateLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    StateLock.acquire(tmp_path).release()  # SIGKILL left no stale lock


def test_running_node_tests_the_lock_without_taking_it(tmp_path: Path) -> None:
    assert running_node(tmp_path) is None  # no lock file: no node ever ran here
    held = StateLock.acquire(tmp_path)
    content = (tmp_path / LOCK_FILE_NAME).read_bytes()
    assert running_node(tmp_path) == str(os.getpid())
    assert (tmp_path / LOCK_FILE_NAME).read_bytes() == content  # nothing written
    held.release()
    assert running_node(tmp_path) is None  # a stale file from a stopped node
    StateLock.acquire(tmp_path).release()  # the test left no lock behind
