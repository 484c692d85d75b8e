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
