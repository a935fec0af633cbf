"""Every code block of README.md and docs/*.md runs as written, and prints what the page shows.

The convention (documented in docs/architecture.md, "Docs that run"):

* Each page runs top to bottom in one namespace, so a later block uses what an earlier one
  defined. Blocks titled ``torch`` (migration.md's left column) form a second script in a
  namespace of their own.
* A ```` ```python ```` block runs. One whose info string holds ``title="not run: <why>"`` does
  not, and is counted: ``NOT_RUN`` below lists how many each page has, so a block cannot quietly
  stop running. Blocks in other languages (```` ```sh ````, ```` ```text ````, plain ```` ``` ````)
  are text; shell commands carry the same ``not run`` title and are counted too.
* Output: a statement whose last line ends in ``# -> <text>`` must print ``<text>``; a
  ```` ```text ```` block right after a python block (blank lines between allowed) is what the
  whole block prints. Both are compared with doctest's checker: ``...`` matches anything, runs of
  whitespace are equal.
* Pages run with ``jax_enable_x64`` off, as a reader's session starts (the suite turns it on in
  conftest.py; it is restored after each page), in a temporary working directory (checkpoints
  the pages write land there), with the suite's 8 CPU devices.

Pages other engineers are writing now come with their own tests: ``OWN_TESTS``.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_TESTS = {"nnx_optimizer.md", "checkpoints.md", "from_torch.md"}  # tested by their own modules
PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if p.name not in OWN_TESTS)

# blocks marked title="not run: ..." per page (python and shell); a page not listed has none
NOT_RUN = {
    "README.md": 1,  # make demo / make test
    "docs/index.md": 1,  # make demo / make test
    "docs/multi_host.md": 2,  # launch recipes (shell); tests/test_multihost_docs.py runs the page as 2 processes
}

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<lang>[\w+-]*)(?P<info>[^\n`]*)$")
EXPECT = re.compile(r"#\s*->\s?(?P<want>.*)$")
CHECKER = doctest.OutputChecker()
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def parse_blocks(text: str) -> list[dict]:
    """Fenced blocks of a markdown page: ``lang``, ``info``, ``code`` (dedented), ``line`` (1-based),
    ``after`` (the index of the next block when only blank lines separate them)."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        if j == len(lines):
            raise AssertionError(f"line {i + 1}: unclosed code fence")
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:j]]
        blocks.append({"lang": m["lang"].lower(), "info": m["info"].strip(), "code": "\n".join(body) + "\n",
                       "line": i + 1, "end": j + 1})
        i = j + 1
    for k in range(len(blocks) - 1):
        gap = lines[blocks[k]["end"]:blocks[k + 1]["line"] - 1]
        blocks[k]["next_adjacent"] = all(not ln.strip() for ln in gap)
    if blocks:
        blocks[-1]["next_adjacent"] = False
    return blocks


def title(block) -> str:
    m = re.search(r'title="([^"]*)"', block["info"])
    return m[1] if m else ""


def is_not_run(block) -> bool:
    return title(block).startswith("not run:")


def check_output(got: str, want: str, where: str) -> None:
    if not CHECKER.check_output(want.strip() + "\n", got.strip() + "\n", FLAGS):
        raise AssertionError(f"{where}: printed\n{got}\nbut the page shows\n{want}")


def run_block(code: str, ns: dict, where: str) -> str:
    """Execute ``code`` statement by statement in ``ns``; check ``# ->`` expectations; return all stdout."""
    tree = ast.parse(code, filename=where)
    src = code.split("\n")
    everything = io.StringIO()
    for stmt in tree.body:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(ast.Module([stmt], type_ignores=[]), where, "exec"), ns)
        out = buf.getvalue()
        everything.write(out)
        m = EXPECT.search(src[stmt.end_lineno - 1])
        if m:
            check_output(out, m["want"], f"{where}, line {stmt.end_lineno}")
    return everything.getvalue()


def run_page(page: str) -> dict:
    """Run every block of ``page``; returns the counts and the main namespace."""
    blocks = parse_blocks((ROOT / page).read_text())
    namespaces: dict[str, dict] = {}
    counts = {"run": 0, "not run": 0, "outputs": 0}
    for k, b in enumerate(blocks):
        if is_not_run(b):
            counts["not run"] += 1
            continue
        if b["lang"] not in ("python", "py"):
            assert b["lang"] not in ("sh", "bash", "console", "shell"), (
                f"{page}:{b['line']}: shell commands carry title=\"not run: <why>\"")
            continue
        ns = namespaces.setdefault("torch" if title(b) == "torch" else "main", {"__name__": f"docs:{page}"})
        where = f"{page}:{b['line']}"
        printed = run_block(b["code"], ns, where)
        counts["run"] += 1
        if b["next_adjacent"] and blocks[k + 1]["lang"] == "text":
            check_output(printed, blocks[k + 1]["code"], where)
            counts["outputs"] += 1
    counts["ns"] = namespaces.get("main", {})
    return counts


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(page, reader_session):
    counts = run_page(page)
    assert counts["not run"] == NOT_RUN.get(page, 0), f"{page}: {counts['not run']} blocks marked not run"
    n_python = sum(b["lang"] in ("python", "py") for b in parse_blocks((ROOT / page).read_text()))
    assert counts["run"] + sum(is_not_run(b) and b["lang"] in ("python", "py")
                               for b in parse_blocks((ROOT / page).read_text())) == n_python
    if page == "docs/torch_extras.md":  # what the page says happened, checked
        import numpy as np

        ns = counts["ns"]
        embed = np.asarray(ns["sparse"].params["embed"])
        moved = np.flatnonzero(np.any(embed != np.asarray(ns["params"]["embed"]), axis=1))
        assert moved.tolist() == [1, 4, 7]
        assert ns["total"].shape == () and float(ns["total"]) > 0
        assert len(ns["per_group_norms"]) == 2
        assert ns["prediction"].shape == (8, 2)


def test_every_page_is_covered():
    """A new page under docs/ is either run here or one of the pages with their own tests."""
    on_disk = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {Path(p).name for p in PAGES if p.startswith("docs/")} == on_disk - OWN_TESTS
    assert {"index.md", "core.md", "compat.md", "migration.md", "distributed.md", "architecture.md",
            "torch_extras.md"} <= on_disk


def test_collector_catches_a_wrong_output():
    """The checker is not vacuous: a wrong ``# ->`` or output block fails, ``...`` matches."""
    ns: dict = {}
    run_block("print(1 + 1)  # -> 2\n", ns, "ok")
    run_block("print([1, 2, 3, 4])  # -> [1, ..., 4]\n", ns, "ellipsis")
    with pytest.raises(AssertionError, match="the page shows"):
        run_block("print(1 + 1)  # -> 3\n", ns, "wrong")
    blocks = parse_blocks("text\n\n```python\nprint('a')\n```\n\n```text\nb\n```\n")
    assert blocks[0]["next_adjacent"] and blocks[1]["lang"] == "text"
    with pytest.raises(AssertionError, match="the page shows"):
        check_output(run_block(blocks[0]["code"], ns, "block"), blocks[1]["code"], "block")
