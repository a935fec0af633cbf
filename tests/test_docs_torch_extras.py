"""docs/torch_extras.md runs as written: its python blocks, top to bottom, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "torch_extras.md"


def test_every_block_of_the_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 7
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)
    # what the page says happened, checked
    import numpy as np

    embed = np.asarray(ns["sparse"].params["embed"])
    moved = np.flatnonzero(np.any(embed != np.asarray(ns["params"]["embed"]), axis=1))
    assert moved.tolist() == [1, 4, 7]
    assert ns["total"].shape == () and float(ns["total"]) > 0
    assert len(ns["per_group_norms"]) == 2
    assert ns["prediction"].shape == (8, 2)
