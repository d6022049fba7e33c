"""The one seeding rule: a draw depends on its seed and keys only, and a string key the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from custom.seeding import seed_value, seeded_generator


def test_a_draw_depends_on_its_seed_and_keys_and_nothing_else():
    # (a use passes the same number of keys each time: (1, k) and (0, 1, k) are the same value by design)
    draw = lambda *args: torch.rand(4, generator=seeded_generator(*args)).tolist()  # noqa: E731
    assert draw(0, 5) == draw(0, 5)
    torch.rand(100)  # the global generator's use changes nothing
    assert draw(0, 5) == draw(0, 5)
    assert len({tuple(draw(*args)) for args in [(0, 5), (1, 5), (0, 6), (0, 5, 1), (0, 5, 2), (0, "a/1")]}) == 6


def test_a_string_key_has_the_same_value_in_every_process():
    code = "from custom.seeding import seed_value; print(seed_value(7, 'hippocampus_322/1', 3))"
    values = {
        subprocess.run(
            [sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=str(h)), capture_output=True, text=True
        ).stdout.strip()
        for h in (1, 2)
    }
    assert values == {str(seed_value(7, "hippocampus_322/1", 3))}
