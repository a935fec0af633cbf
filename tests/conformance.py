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
