"""Host-side agreement across processes (groupopt.multihost): processes that disagree raise on every one, naming
the difference, before anything changes; a process that goes elsewhere does not leave the others hanging.

Two processes x 4 CPU devices (tests/multihost_launch.py), every scenario of tests/multihost_agree_worker.py in
one launch."""

import re

import numpy as np
import pytest

import groupopt
from groupopt import multihost
from multihost_launch import check, launch, tagged

TIMEOUT_S = 10  # the workers' agreement timeout (one_process_elsewhere waits it out once)
SCENARIOS = ["lr_on_one_process", "scheduler_on_process_0", "plateau_local_metric", "add_group_on_process_1",
             "core_groups_differ", "core_set_hyperparams", "checkpoint_other_step", "load_state_dict_differs",
             "agreeing", "one_process_elsewhere"]  # the last one leaves process 1 behind: last


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("agree") / "ckpt"
    procs = check(launch("tests/multihost_agree_worker.py", 2, [",".join(SCENARIOS), TIMEOUT_S, directory], timeout=400))
    out = []
    for p in procs:
        per: dict = {}
        current = None
        for line in p.stdout.splitlines():
            if tagged([line], "SCENARIO"):
                current = per.setdefault(tagged([line], "SCENARIO")[0], [])
            elif current is not None:
                current.append(line)
        out.append(per)
    return out


def lines(outcome, tag):
    return tagged(outcome, tag)


def raised_on_both(outcomes, name):
    msgs = [lines(o[name], "RAISED") for o in outcomes]
    assert all(len(m) == 1 for m in msgs), (name, outcomes[0][name], outcomes[1][name])
    return [m[0] for m in msgs]


def test_an_lr_edited_on_one_process_is_caught_at_the_next_step_before_it(outcomes):
    msgs = raised_on_both(outcomes, "lr_on_one_process")
    for m in msgs:
        assert "the processes disagree" in m and "'AdamW.step'" in m
        assert "hparams[2].lr.value: 0.009999999776482582 on process 0, 0.5 on process 1" in m
        assert "Nothing was changed" in m
    assert [lines(o["lr_on_one_process"], "UNCHANGED") for o in outcomes] == [["True"], ["True"]]


def test_a_scheduler_stepped_on_one_process_is_caught(outcomes):
    for m in raised_on_both(outcomes, "scheduler_on_process_0"):
        # StepLR(gamma=0.5) once more on process 0: every group's lr is half of process 1's
        found = re.findall(r"hparams\[(\d)\]\.lr\.value: ([0-9.e-]+) on process 0, ([0-9.e-]+) on process 1", m)
        assert [g for g, _, _ in found] == ["0", "1", "2"], m
        for _, a, b in found:
            assert np.float32(b) == np.float32(2 * np.float32(a))
    assert all(lines(o["scheduler_on_process_0"], "UNCHANGED") == ["True"] for o in outcomes)


def test_a_plateau_fed_a_per_process_metric_is_caught_before_it_changes(outcomes):
    for o, m in zip(outcomes, raised_on_both(outcomes, "plateau_local_metric")):
        assert "'ReduceLROnPlateau.step'" in m and "metric:" in m and "per-process metric" in m
        a, b = map(float, re.search(r"metric: ([0-9.e-]+) on process 0, ([0-9.e-]+) on process 1", m).groups())
        assert b == pytest.approx(a + 1)
        assert lines(o["plateau_local_metric"], "EPOCH") == ["0"]  # the scheduler did not count the step


def test_a_group_added_on_one_process_is_caught_before_any_device_work(outcomes):
    msgs = raised_on_both(outcomes, "add_group_on_process_1")
    for m in msgs:
        assert "process 0 is at 'AdamW.step', process 1 at 'AdamW.add_param_group'" in m
    assert all(lines(o["add_group_on_process_1"], "UNCHANGED") == ["True"] for o in outcomes)


def test_core_groups_built_differently_are_caught_at_init(outcomes):
    for m in raised_on_both(outcomes, "core_groups_differ"):
        assert "'grouped transformation: init'" in m
        assert "groups[0].spec.lr: 0.001 on process 0, 0.002 on process 1" in m


def test_core_set_hyperparams_with_per_process_values_changes_nothing(outcomes):
    for m in raised_on_both(outcomes, "core_set_hyperparams"):
        assert "'set_hyperparams'" in m and "values.lr: 0.1 on process 0, 0.2 on process 1" in m
    assert all(lines(o["core_set_hyperparams"], "UNCHANGED") == ["True"] for o in outcomes)


def test_checkpoints_saved_under_different_steps_are_refused_before_writing(outcomes):
    for m in raised_on_both(outcomes, "checkpoint_other_step"):
        assert "process 0 is at 'Checkpointer.save(step 1)', process 1 at 'Checkpointer.save(step 2)'" in m
    assert all(lines(o["checkpoint_other_step"], "STEPS") == ["[]"] for o in outcomes)  # nothing written


def test_a_state_dict_that_differs_between_processes_is_not_loaded(outcomes):
    for m in raised_on_both(outcomes, "load_state_dict_differs"):
        assert "'AdamW.load_state_dict'" in m and "param_groups[1].lr: 0.001 on process 0, 0.002 on process 1" in m
    assert all(lines(o["load_state_dict_differs"], "UNCHANGED") == ["True"] for o in outcomes)


def test_agreeing_processes_check_and_pass(outcomes):
    for o in outcomes:
        assert any(ln.endswith("DONE") for ln in o["agreeing"]) and not lines(o["agreeing"], "RAISED")
        # 3 add_param_group (construction) + 4 steps (check_every=1) + 4 plateau steps + a core tx's init + set_hyperparams
        assert lines(o["agreeing"], "CHECKS") == ["13"]


def test_a_process_that_never_arrives_makes_the_other_raise_not_hang(outcomes):
    first, second = (o["one_process_elsewhere"] for o in outcomes)
    (m,) = lines(first, "RAISED")
    assert "processes [1] did not reach check" in m and f"within {TIMEOUT_S} s" in m and "'AdamW.step'" in m
    assert lines(first, "UNCHANGED") == ["True"]
    assert any(ln.endswith("DONE") for ln in second) and not lines(second, "RAISED")


# ------------------------------------------------------------------ one process: no cost, and the building blocks


def test_one_process_checks_nothing_and_returns_at_once():
    assert not multihost.active()
    before = multihost.checks_made()
    multihost.agree("anything", {"x": object()})
    assert multihost.checks_made() == before


def test_canonical_configs_hold_no_addresses_and_exact_floats():
    def schedule(count):
        return count

    a = multihost.canonical({"lr": np.float32(0.1), "fn": schedule, "obj": object(), "t": (1, float("nan")),
                             "rule": groupopt.AdamWRule()})
    assert a["lr"] == {"dtype": "float32", "value": float(np.float32(0.1))}
    assert a["fn"] == f"{__name__}.test_canonical_configs_hold_no_addresses_and_exact_floats.<locals>.schedule"
    assert a["obj"] == "object" and a["t"] == [1, "nan"]
    assert a["rule"]["__class__"] == "AdamWRule"
    assert "0x" not in repr(a)
    assert multihost.fingerprint({"a": 1.0, "b": [1, 2]}) == multihost.fingerprint({"b": (1, 2), "a": 1.0})
    assert multihost.fingerprint({"a": 1.0}) != multihost.fingerprint({"a": float(np.nextafter(1.0, 2.0))})


def test_configure_checks_its_values_and_restores():
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        multihost.configure(timeout_s=0)
    with pytest.raises(ValueError, match="check_every"):
        multihost.configure(check_every=-1)
    before = multihost.settings()
    with multihost.configured(check_every=0, timeout_s=5):
        assert multihost.settings().check_every == 0 and multihost.settings().timeout_s == 5
    assert multihost.settings() == before


def test_four_processes_all_raise_naming_each_process_that_differs(tmp_path):
    """4 processes x 2 devices: every process raises, and the message lists each process that differs from process 0."""
    scenarios = ["scheduler_on_process_0", "add_group_on_process_1", "checkpoint_other_step", "agreeing"]
    procs = check(launch("tests/multihost_agree_worker.py", 4, [",".join(scenarios), TIMEOUT_S, tmp_path / "ckpt"],
                         timeout=400))
    for p in procs:
        raised = p.lines("RAISED")
        assert len(raised) == 3, (p.index, raised)
        sched, group, save = raised
        # the scheduler stepped on process 0 only: processes 1, 2 and 3 each differ from it
        assert [int(x) for x in re.findall(r"process (\d) differs from process 0", sched)] == [1, 2, 3]
        assert "process 0 is at 'AdamW.step', process 1 at 'AdamW.add_param_group'" in group
        assert all(f"process {k} at 'Checkpointer.save(step {k + 1})'" in save for k in (1, 2, 3))
        assert p.lines("UNCHANGED") == ["True", "True"] and p.lines("CHECKS") == ["13"]
