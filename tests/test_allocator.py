"""Freed memory stays in the process once ``retain_freed_memory`` is on: training-like steps stop faulting their
activations in again."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import resource, sys, torch
from custom.allocator import retain_freed_memory
if sys.argv[1] == "on":
    assert retain_freed_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.ConvTranspose3d(8, 8, 2, 2), torch.nn.ReLU(),
    torch.nn.Conv3d(8, 1, 1),
)
x = torch.randn(2, 1, 40, 40, 40)
def step():
    net(x).mean().backward()
step()  # the first step always faults its pages in
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def test_training_steps_reuse_freed_activations_instead_of_faulting_them_in_again():
    # fault counts also depend on the kernel's state (transparent huge pages available or not): the best of three
    # paired runs (a broken setting leaves every pair near 1:1; measured 119,848 -> 16,008 minor faults over 3
    # steps, and once 71,889 -> 34,009 right after a large pip install)
    pairs = []
    for _ in range(3):
        pairs.append((_faults("off"), _faults("on")))
        if pairs[-1][1] < pairs[-1][0] / 3:
            break
    assert any(on < off / 3 for off, on in pairs), pairs
