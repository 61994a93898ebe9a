"""The child-process helper itself: the handshake holds the child, reads have deadlines, exit statuses are checked."""

from __future__ import annotations

import signal

import pytest

from tests.child_process import run_python, start_python

pytestmark = pytest.mark.lane_independent  # no transformers-version dependence: one lane runs it


def test_the_child_waits_for_go_and_the_output_comes_back():
    child = start_python("print('after go', flush=True)\nprint(input(), flush=True)", timeout=30)
    child.read_until("after go")
    child.send("echo")
    assert child.finish().splitlines()[-2:] == ["after go", "echo"]


def test_a_read_past_its_deadline_fails_and_kills_the_child():
    child = start_python("import sys\nsys.stdin.readline()", timeout=2)
    with pytest.raises(AssertionError, match="did not print 'never' within 2 s"):
        child.read_until("never")
    assert child.process.returncode == -signal.SIGKILL


def test_a_wrong_exit_status_fails_with_the_output():
    with pytest.raises(AssertionError, match=r"status 3, expected 0(.|\n)*last words"):
        run_python("print('last words')\nraise SystemExit(3)", timeout=30)
    assert "last words" in run_python("print('last words')\nraise SystemExit(3)", timeout=30, expected_returncode=3)


def test_a_child_that_outlives_its_timeout_is_killed():
    child = start_python("import threading\nthreading.Event().wait()", timeout=2)  # blocks, ignoring stdin
    with pytest.raises(AssertionError, match="did not finish within 2 s"):
        child.finish()
    assert child.process.returncode == -signal.SIGKILL
