"""docs/multi_host.md as its readers run it: the page's code as one script, in 2 processes (the page's own
local launch recipe: PROCESS_ID / NUM_PROCESSES / COORDINATOR, 4 CPU devices each) and in 1 process.
(tests/test_docs.py runs the page in the suite's own process too.)"""

from pathlib import Path

from multihost_launch import check, launch
from test_docs import parse_blocks, title

ROOT = Path(__file__).resolve().parents[1]


def test_the_multi_host_page_runs_as_two_processes_and_as_one(tmp_path):
    blocks = [b for b in parse_blocks((ROOT / "docs" / "multi_host.md").read_text())
              if b["lang"] == "python" and not title(b).startswith("not run")]
    script = tmp_path / "train.py"
    script.write_text("import os\nos.chdir(os.environ['WORKDIR'])\n" + "\n".join(b["code"] for b in blocks))
    runs = {}
    for n in (2, 1):
        work = tmp_path / f"run{n}"
        work.mkdir()

        def env(i, coordinator, n=n, work=work):
            out = {"WORKDIR": str(work)}
            if n > 1:
                out.update(PROCESS_ID=str(i), NUM_PROCESSES=str(n), COORDINATOR=coordinator)
            return out

        runs[n] = check(launch(str(script), n, env=env, timeout=300))
    for n, procs in runs.items():
        for p in procs:
            lines = p.stdout.splitlines()  # (Gloo's log lines come interleaved, in pieces: see multihost_launch.tagged)
            for want in ("[20] 1", "True", "20 20"):
                assert any(ln == want or ln.endswith(" " + want) for ln in lines), (n, p.index, want, lines)
    loss = {n: float(procs[0].lines("final")[0].split()[-1]) for n, procs in runs.items()}
    assert abs(loss[2] - loss[1]) <= 1e-5 * abs(loss[1]), loss
    assert not runs[2][1].lines("final")  # printed by process 0 only
