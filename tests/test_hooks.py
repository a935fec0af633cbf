"""torch's optimizer hooks: order, argument rewriting, errors, removal, state_dict hooks; against torch."""

import jax.numpy as jnp
import numpy as np
import pytest
import importlib

import torch

import groupopt.compat as optim


def pair():
    ours = optim.SGD({"w": jnp.ones(3)}, lr=0.1, momentum=0.9)
    t = torch.ones(3, requires_grad=True)
    theirs = torch.optim.SGD([t], lr=0.1, momentum=0.9)
    t.grad = torch.ones(3)
    return ours, theirs


def record_order(opt, glob_pre, glob_post, log):
    handles = [
        glob_pre(lambda o, a, k: log.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: log.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: log.append("post")),
        glob_post(lambda o, a, k: log.append("global post")),
    ]
    return handles


def test_step_hook_order_args_and_removal_match_torch():
    ours, theirs = pair()
    logs = {"ours": [], "torch": []}
    h_ours = record_order(ours, optim.register_optimizer_step_pre_hook, optim.register_optimizer_step_post_hook, logs["ours"])
    torch_optimizer = importlib.import_module("torch.optim.optimizer")  # shadowed as an attribute by torch
    h_torch = record_order(theirs, torch_optimizer.register_optimizer_step_pre_hook,
                           torch_optimizer.register_optimizer_step_post_hook, logs["torch"])
    try:
        ours.step({"w": jnp.ones(3)})
        theirs.step()
        assert logs["ours"] == logs["torch"] == ["global pre", "pre", "post", "global post"]
        for h in h_ours + h_torch:
            h.remove()
        ours.step({"w": jnp.ones(3)})
        theirs.step()
        assert logs["ours"] == logs["torch"] == ["global pre", "pre", "post", "global post"]
    finally:
        for h in h_ours + h_torch:
            h.remove()


def test_pre_hook_rewrites_arguments_and_bad_return_is_torch_error():
    ours, theirs = pair()
    seen = []
    # args starts with the optimizer itself, as in torch; replace the gradients by zeros
    ours.register_step_pre_hook(lambda o, a, k: ((a[0], {"w": jnp.zeros(3)}), k))
    ours.register_step_post_hook(lambda o, a, k: seen.append(np.asarray(a[1]["w"]).tolist()))
    ours.step({"w": jnp.ones(3)})
    np.testing.assert_array_equal(ours.params["w"], np.ones(3))  # zero gradient: no move
    assert seen == [[0.0, 0.0, 0.0]]
    bad_ours, bad_torch = pair()
    bad_ours.register_step_pre_hook(lambda o, a, k: 3)
    bad_torch.register_step_pre_hook(lambda o, a, k: 3)
    with pytest.raises(RuntimeError) as e_torch:
        bad_torch.step()
    with pytest.raises(RuntimeError) as e_ours:
        bad_ours.step({"w": jnp.ones(3)})
    assert str(e_ours.value).endswith("must return None or a tuple of (new_args, new_kwargs), but got 3.")
    assert str(e_torch.value).endswith("must return None or a tuple of (new_args, new_kwargs), but got 3.")


def test_state_dict_hooks_run_once_in_torch_order_even_through_subclass_super_calls():
    ours = optim.AdamW({"w": jnp.ones(3)}, lr=0.1)  # AdamW.load_state_dict calls Adam's (super)
    log = []
    ours.register_state_dict_pre_hook(lambda o: log.append("sd pre"))
    ours.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    ours.register_state_dict_post_hook(lambda o, sd: log.append(("sd post", sd["extra"])), prepend=False)
    ours.register_load_state_dict_pre_hook(lambda o, sd: log.append("load pre"))
    ours.register_load_state_dict_post_hook(lambda o: log.append("load post"))
    sd = ours.state_dict()
    assert sd["extra"] == 1
    ours.load_state_dict(sd)
    assert log == ["sd pre", ("sd post", 1), "load pre", "load post"]
