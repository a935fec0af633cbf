"""docs/checkpoints.md runs as written: its python blocks, top to bottom, in one namespace, with
``jax_enable_x64`` off (a reader's session) in a temporary working directory; every line marked
``# -> <text>`` prints ``<text>``."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path


PAGE = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"
EXPECT = re.compile(r"#\s*->\s?(.*)$")


def test_every_block_of_the_page_runs_and_prints_what_it_shows(reader_session):
    tmp_path = reader_session
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 7
    ns: dict = {}
    for i, block in enumerate(blocks):
        want = [m.group(1).strip() for line in block.splitlines() if (m := EXPECT.search(line))]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)
        got = [line.strip() for line in out.getvalue().splitlines()]
        assert got == want, f"block {i}"
    # checkpoints were written where the page says
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt_best", "ckpt_core", "ckpt_every2", "ckpt_nnx"]
