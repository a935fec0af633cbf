"""One JAX process per host: 1, 2 and 4 local processes (jax.distributed, Gloo CPU collectives) on one global
mesh data 4 x model 2 -- training equals the 1-process run, ZeRO-1 divides each process's state bytes, Orbax
checkpoints save and restore across processes and process counts, and a process killed mid-save leaves the
previous checkpoint.

The processes run tests/multihost_worker.py (see its docstring for the scenarios and their output); each
launch runs several scenarios, so that a process count starts and compiles once.
"""

import json
import os
import signal
import time

import numpy as np
import pytest

from multihost_launch import check, launch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT = 240  # per launch, for a loaded 2-core machine (a launch takes 5-30 s on an idle one)
COUNTS = (1, 2, 4)
DATA = 4  # the worker's mesh: data 4 x model 2


def run(n: int, *scenarios, **kw):
    """Launch the worker as ``n`` processes; every one must exit 0."""
    return check(launch(WORKER, n, scenarios, timeout=TIMEOUT, **kw))


def results(procs) -> dict:
    """Process 0's RESULT lines, merged."""
    out = {}
    for line in procs[0].lines("RESULT"):
        out.update(json.loads(line))
    return out


def decode(entry) -> np.ndarray:
    dtype, shape, data = entry
    return np.frombuffer(bytes.fromhex(data), dtype=dtype).reshape(shape)


def rel(got: dict, want: dict) -> dict:
    """Per array: max|got - want| / max|want| (both ``{path: encoded array}`` with the same paths)."""
    assert got.keys() == want.keys()
    out = {}
    for k in want:
        a, b = decode(got[k]).astype(np.float64), decode(want[k]).astype(np.float64)
        out[k] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float32).tiny))
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-6) -> None:
    worst = rel(got, want)
    assert max(worst.values()) <= tol, {k: v for k, v in worst.items() if v > tol}


def assert_bit_identical(got: dict, want: dict) -> None:
    """Snapshots (params, optimizer arrays, host state) equal bit for bit."""
    assert got["params"] == want["params"]
    assert got["state"].keys() == want["state"].keys()
    assert [k for k in want["state"] if got["state"][k] != want["state"][k]] == []
    assert got["host"] == want["host"]
    assert got["lrs"] == want["lrs"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """One launch per process count: the training runs, ZeRO-1, and (1 and 2 processes) the checkpointed run;
    with 2 processes also the save/restore timing. Returns ``({n: procs}, {n: checkpoint directory})``."""
    base = tmp_path_factory.mktemp("multihost")
    procs, dirs = {}, {}
    for n in COUNTS:
        scenarios = ["train", "zero1"]
        if n in (1, 2):
            dirs[n] = str(base / f"saved_by_{n}")
            scenarios.append(f"ckpt_full={dirs[n]}")
        if n == 2:
            scenarios.append(f"timing={base / 'timing'}")
        procs[n] = run(n, *scenarios)
    return procs, dirs


@pytest.fixture(scope="module")
def resumed(launches):
    """Fresh 2-process launch restoring what 2 and what 1 process saved; fresh 1-process launch restoring what 2
    saved. Returns ``{(saved_by, restored_by): result}``."""
    _, dirs = launches
    out = {}
    for n, sources in ((2, (2, 1)), (1, (2,))):
        procs = run(n, *(f"ckpt_resume={dirs[s]}" for s in sources))
        lines = [json.loads(line)["ckpt_resume"] for line in procs[0].lines("RESULT")]
        for s, line in zip(sources, lines):
            assert line["directory"] == dirs[s]
            out[s, n] = line
    return out


def test_training_equals_one_process(launches):
    procs, _ = launches
    train = {n: results(procs[n])["train"] for n in COUNTS}
    ref = train[1]
    # the plateaus reduced the lrs at least once (the core's lrs change in no other way)
    assert ref["compat"]["reductions"] >= 1
    core = ref["core_plateau"]
    assert all(core["lrs"][g]["lr"] < core["initial_lrs"][g]["lr"] for g in core["lrs"]), core
    for n in COUNTS[1:]:
        for variant in ("compat", "core_plateau", "core_schedule"):
            got, want = train[n][variant], ref[variant]
            assert_close(got["params"], want["params"])
            assert got["lrs"] == want["lrs"], (n, variant)
    for n in COUNTS:
        assert train[n]["compat"]["num_compiles"] == 1


def test_zero1_divides_each_process_state_bytes(launches):
    procs, _ = launches
    for n in COUNTS:
        reports = [json.loads(p.lines("BYTES")[0]) for p in procs[n]]
        assert [r["process"] for r in reports] == list(range(n))
        for r in reports:
            # one copy of the float32 AdamW slots, and one ZeRO-1 shard of each (split where a dimension divides)
            whole = sum(int(np.prod(s)) * 4 for s in r["shapes"])
            shard = sum(int(np.prod(s)) * 4 // (DATA if any(d % DATA == 0 for d in s) else 1) for s in r["shapes"])
            assert r["local_devices"] == 8 // n
            assert r["plain"] == whole * r["local_devices"], r  # replicated: a whole copy on each of its devices
            assert r["zero1"] == shard * r["local_devices"], r
            assert r["plain"] == DATA * r["zero1"]
            # each array's row blocks held here are exactly the data rows of this process's devices
            assert all(held == r["rows"] for held in r["held"]), r
        rows = [set(r["rows"]) for r in reports]
        assert set().union(*rows) == set(range(DATA)) and sum(map(len, rows)) == DATA  # a partition of the blocks
        runs = results(procs[n])["zero1"]
        assert_close(runs["zero1"]["params"], runs["plain"]["params"])
        assert runs["zero1"]["num_compiles"] == runs["plain"]["num_compiles"] == 1


def test_resume_in_fresh_processes_is_bit_exact(launches, resumed):
    procs, _ = launches
    full = results(procs[2])["ckpt_full"]
    for name in ("compat", "core_plateau"):
        assert_bit_identical(resumed[2, 2][name]["restored"], full[name]["saved"])
        assert_bit_identical(resumed[2, 2][name]["final"], full[name]["final"])
    assert resumed[2, 2]["compat"]["final"]["num_compiles"] == 1


@pytest.mark.parametrize("saved_by,restored_by", [(2, 1), (1, 2)])
def test_restore_into_another_process_count(launches, resumed, saved_by, restored_by):
    procs, _ = launches
    full = results(procs[saved_by])["ckpt_full"]
    for name in ("compat", "core_plateau"):
        got, want = resumed[saved_by, restored_by][name], full[name]
        assert_bit_identical(got["restored"], want["saved"])
        assert_close(got["final"]["params"], want["final"]["params"])
        assert got["final"]["lrs"] == want["final"]["lrs"]


def test_save_and_restore_times_of_two_processes(launches):
    procs, _ = launches
    reports = [json.loads(p.lines("TIMING")[0]) for p in procs[2]]
    for r in reports:
        print("TIMING", r)
        assert r["bit_exact"] and r["processes"] == 2 and r["array_bytes"] >= 8 << 20


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    seen = []

    def kill_one_while_writing(popens):
        """SIGKILL process 1 once step 2's temporary directory holds shards being written."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and all(p.poll() is None for p in popens):
            names = os.listdir(directory) if os.path.isdir(directory) else []
            for tmp in (n for n in names if n.startswith("2.") and "tmp" in n):
                writing = [d for _, dirs, _ in os.walk(os.path.join(directory, tmp)) for d in dirs
                           if d.startswith("ocdbt.process_")]
                if writing:
                    os.killpg(popens[1].pid, signal.SIGKILL)
                    seen.append((sorted(names), writing))
                    return
            time.sleep(0.005)

    procs = launch(WORKER, 2, [f"killsave={directory}"], timeout=TIMEOUT, grace=5, on_start=kill_one_while_writing)
    assert seen, f"never saw step 2 being written: {os.listdir(directory)}; {procs[0].stderr[-2000:]}"
    assert "2" not in seen[0][0]
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].lines("WRITING") == ["2"] and not procs[0].lines("DONE")  # the survivor never finished step 2
    saved = json.loads(procs[0].lines("RESULT")[0])["killsave"]
    for n in (2, 1):
        check_ = results(run(n, f"killcheck={directory}"))["killcheck"]
        assert check_["steps"] == [1], check_["tmp"]
        assert_bit_identical(check_["restored"], saved)
