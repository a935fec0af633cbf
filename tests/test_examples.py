"""The examples run: the demo (short), both quick starts, and the README shows the quick starts verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(args, timeout=300):
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)  # the examples run on the plain CPU backend, as a user runs them
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def test_demo_short_run(tmp_path):
    out = _check(_run([EXAMPLES / "digits_groups.py", "--epochs", "3", "--out", tmp_path]))
    assert re.search(r"epoch\s+lr hidden\s+lr head\s+lr first\s+train loss\s+test acc", out), out
    assert "add_param_group" in out
    png = re.search(r"^lr plot: (.+)$", out, flags=re.M)
    assert png, out
    path = Path(png.group(1))
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.parent == tmp_path
    assert "resumed from" in out
    assert "are identical to the uninterrupted run's" in out, out
    assert (tmp_path / "checkpoint.pkl").is_file()
    acc = re.search(r"^final test accuracy: ([0-9.]+)$", out, flags=re.M)
    assert acc and 0.0 <= float(acc.group(1)) <= 1.0


@pytest.mark.parametrize("name", ["quickstart_functional.py", "quickstart_compat.py"])
def test_quickstart_runs(name):
    out = _check(_run([EXAMPLES / name]))
    assert out.startswith("lr per group:")


@pytest.mark.parametrize("name", ["quickstart_functional.py", "quickstart_compat.py"])
def test_readme_quickstart_is_the_example(name):
    source = (EXAMPLES / name).read_text()
    body = source.split('"""', 2)[2].lstrip("\n")  # drop the module docstring
    assert body in (ROOT / "README.md").read_text(), f"README's quick start differs from examples/{name}"
