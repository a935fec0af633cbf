"""The shared conformance table: one row per elementwise optimizer.

Adding an optimizer to groupopt means one rule module, one compat class, and one row here:
every test that takes its cases from this table (non-finite numbers, state following each
parameter through list edits, user state entries, checkpoints, gradients checked at the door)
then runs for it against torch.

Each row: torch class, compat class, core factory, constructor kwargs, and per-group options
(the first group takes the defaults; the others turn the main options on).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

import groupopt
import groupopt.compat as optim


class Row(NamedTuple):
    torch_cls: type
    compat_cls: type
    factory: object
    kwargs: dict
    groups: list


TABLE: dict[str, Row] = {
    "SGD": Row(torch.optim.SGD, optim.SGD, groupopt.sgd, dict(lr=0.1), [
        {}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "dampening": 0.5},
        {"weight_decay": 0.1}, {"momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    ]),
    "Adam": Row(torch.optim.Adam, optim.Adam, groupopt.adam, dict(lr=0.1), [
        {}, {"amsgrad": True}, {"weight_decay": 0.1}, {"amsgrad": True, "weight_decay": 0.1, "maximize": True},
    ]),
    "AdamW": Row(torch.optim.AdamW, optim.AdamW, groupopt.adamw, dict(lr=0.1), [
        {}, {"weight_decay": 0.0}, {"amsgrad": True}, {"amsgrad": True, "weight_decay": 0.0, "maximize": True},
    ]),
    "RMSprop": Row(torch.optim.RMSprop, optim.RMSprop, groupopt.rmsprop, dict(lr=0.01), [
        {}, {"centered": True}, {"momentum": 0.9}, {"weight_decay": 0.1},
        {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    ]),
    "Adagrad": Row(torch.optim.Adagrad, optim.Adagrad, groupopt.adagrad, dict(lr=0.1), [
        {}, {"weight_decay": 0.1}, {"lr_decay": 0.1, "maximize": True},
    ]),
    "Adadelta": Row(torch.optim.Adadelta, optim.Adadelta, groupopt.adadelta, dict(), [
        {}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True},
    ]),
    "Adamax": Row(torch.optim.Adamax, optim.Adamax, groupopt.adamax, dict(lr=0.1), [
        {}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True},
    ]),
    "NAdam": Row(torch.optim.NAdam, optim.NAdam, groupopt.nadam, dict(lr=0.1), [
        {}, {"weight_decay": 0.1}, {"decoupled_weight_decay": True, "weight_decay": 0.1},
        {"decoupled_weight_decay": True, "maximize": True},
    ]),
    "RAdam": Row(torch.optim.RAdam, optim.RAdam, groupopt.radam, dict(lr=0.1), [
        {}, {"weight_decay": 0.1}, {"decoupled_weight_decay": True, "weight_decay": 0.1},
        {"decoupled_weight_decay": True, "maximize": True},
    ]),
    "Rprop": Row(torch.optim.Rprop, optim.Rprop, groupopt.rprop, dict(lr=0.1), [{}, {"maximize": True}]),
    "ASGD": Row(torch.optim.ASGD, optim.ASGD, groupopt.asgd, dict(lr=0.1), [
        {}, {"weight_decay": 0.1}, {"t0": 1.0, "lambd": 0.1, "maximize": True},
    ]),
}


# Optimizers whose per-parameter state is NOT shaped like the parameter and whose update is not
# elementwise. They are kept out of TABLE on purpose: tests/test_nonfinite.py reads every one of the
# core's slots from torch's state (Adafactor keeps row_var/col_var for a matrix and variance for a
# vector, and holds an empty placeholder for the others), and its problem has only 1-d parameters
# (the factored path would go untested). tests/test_optim_adafactor.py runs the TABLE tests of
# tests/test_conformance.py on these rows unchanged, and test_nonfinite's problem on the slots torch keeps.
FACTORED: dict[str, Row] = {
    "Adafactor": Row(torch.optim.Adafactor, optim.Adafactor, groupopt.adafactor, dict(lr=0.1), [
        {}, {"weight_decay": 0.1}, {"eps": (1e-6, 1e-3), "d": 1.5, "weight_decay": 0.1, "maximize": True},
    ]),
}


# Optimizers for 2-D parameters only (torch raises for any other rank): the shared tests' problems
# (tests/param_edits.py, tests/test_nonfinite.py) hold 1-D parameters, so these rows are kept out of
# TABLE on purpose. tests/test_optim_muon.py runs the same checks (list edits, user state entries,
# export/import, gradients checked at the door) on matrices, against torch.
MATRIX_ONLY: dict[str, Row] = {
    "Muon": Row(torch.optim.Muon, optim.Muon, groupopt.muon, dict(lr=0.02), [
        {}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw"}, {"momentum": 0.8, "weight_decay": 0.0},
    ]),
}


# SparseAdam (groupopt.compat.SparseAdam, groupopt.sparse_adam) has no row: every shared test feeds
# dense gradients, which SparseAdam refuses as torch does ("SparseAdam does not support dense
# gradients, please consider Adam instead"). tests/test_optim_sparse_adam.py runs its own checks
# against torch with sparse gradients (BCOO vs torch sparse COO): groups, maximize, duplicates, empty
# gradients, lr edits, state_dict round trips both ways, the dense-gradient refusal changing nothing.
