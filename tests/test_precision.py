"""Mixed precision by name: the named dtype reaches the computation, None runs in full precision, a wrong name is
refused with the choices."""

from __future__ import annotations

import pytest
import torch

from custom.precision import autocast, check_autocast_dtype


def test_the_named_dtype_reaches_the_computation_and_none_keeps_full_precision():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    cpu = torch.device("cpu")
    with autocast(cpu, "bfloat16"):
        low = a @ b
    with autocast(cpu, None):
        full = a @ b
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(low.float(), a @ b, rtol=2e-2, atol=5e-2)  # bfloat16 keeps ~3 significant digits
    assert not torch.equal(low.float(), full)  # rounded, so the autocast really ran


def test_a_wrong_name_is_refused_with_the_choices():
    assert check_autocast_dtype(None) is None and check_autocast_dtype("float16") == "float16"
    for wrong in ("fp16", "bf16", "float32"):
        with pytest.raises(ValueError, match=r"autocast_dtype must be one of \['bfloat16', 'float16'\] or None"):
            check_autocast_dtype(wrong)
        with pytest.raises(ValueError, match=repr(wrong)):
            autocast(torch.device("cpu"), wrong)
