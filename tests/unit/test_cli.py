"""The gpuserve console script's own surface (running apps is an integration test)."""

import subprocess
import sys

import pytest

from serving import __version__
from serving.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"gpuserve {__version__}"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "run" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "serving.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"gpuserve {__version__}"


def test_drain_waits_until_the_replicas_left_or_the_deadline_with_a_fake_clock():
    from serving._private.drain import wait_until_gone

    now = [0.0]

    def sleep(s):
        now[0] += s

    left = iter([2, 2, 1, 0])
    assert wait_until_gone(lambda: next(left), 60, clock=lambda: now[0], sleep=sleep, poll_s=5) == (0, 15.0)
    # Replicas that never leave: the wait ends at the deadline, never past it.
    assert wait_until_gone(lambda: 3, 12, clock=lambda: now[0], sleep=sleep, poll_s=5) == (3, 12.0)
