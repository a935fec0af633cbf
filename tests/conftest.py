"""Test configuration: float64 available (torch's oracle runs in float64 and float32)."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


@pytest.fixture
def torch_float64_default():
    """torch with a float64 default dtype for the test, restored after: x64 (on in the tests) is JAX's
    analogue, and it decides the dtype of scalar state (``step``, NAdam's ``mu_product``, ASGD's
    ``eta``/``mu``: torch's ``_get_scalar_dtype()``)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.fixture
def reader_session(tmp_path, monkeypatch):
    """A docs page as a reader runs it: x64 off (their default), a scratch working directory;
    x64 restored afterwards."""
    monkeypatch.chdir(tmp_path)
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        yield tmp_path
    finally:
        jax.config.update("jax_enable_x64", before)
