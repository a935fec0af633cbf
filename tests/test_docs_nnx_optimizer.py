"""docs/nnx_optimizer.md runs as written: its python blocks, top to bottom, in one namespace.

As a reader runs it: ``jax_enable_x64`` off (the suite turns it on in conftest.py; restored after).
"""

from __future__ import annotations

import math
import re
from pathlib import Path


PAGE = Path(__file__).resolve().parents[1] / "docs" / "nnx_optimizer.md"


def test_every_block_of_the_page_runs(reader_session, capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 6
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)
    out = capsys.readouterr().out
    # what the page says happened, checked
    assert ns["traces"] == 1  # three lr edits by name between nnx.jit calls: one trace
    assert ns["linen_traces"] == 1
    assert math.isclose(float(ns["used"]), 5e-4, rel_tol=1e-6)
    assert math.isclose(float(ns["logs"]["head/lr"]), 2.5e-3, rel_tol=1e-6)
    assert math.isclose(float(ns["groupopt"].get_hyperparams(ns["state"], "head", tx=ns["grouped"])["lr"]), 2e-3,
                        rel_tol=1e-6)
    # every "# -> <text>" the page shows is printed
    for want in re.findall(r"#\s*->\s?(.*)$", PAGE.read_text(), flags=re.M):
        pattern = ".*".join(re.escape(part) for part in want.strip().split("..."))
        assert re.search(pattern, out), f"the page shows {want!r}; printed:\n{out}"
