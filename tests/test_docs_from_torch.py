"""docs/from_torch.md runs as written: its python blocks, top to bottom, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

PAGE = Path(__file__).resolve().parents[1] / "docs" / "from_torch.md"


def test_every_block_of_the_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 6
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)
    # what the page says happened, checked
    assert ns["sched"].last_epoch == 5 and ns["back_sched"].last_epoch == 5
    assert ns["back_opt"].param_groups[0]["lr"] == ns["opt"].param_groups[0]["lr"] == 0.0025
    np.testing.assert_array_equal(ns["back"].head.weight.detach().numpy(), np.asarray(ns["model"].head.kernel.get_value()).T)
    step = ns["back_opt"].state[ns["back"].head.weight]["step"]
    assert float(step) == 5.0
    assert [len(g["params"]) for g in ns["opt2"].param_groups] == [3, 10]
    assert [r.torch_name for r in ns["table"][:3]] == ["embed.weight", "attn.in_proj_weight", "attn.in_proj_bias"]
    assert ns["names"][:3] == ["attn/key/bias", "attn/key/kernel", "attn/out/bias"]
