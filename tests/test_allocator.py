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
    off, on = _faults("off"), _faults("on")
    assert on < off / 3, (off, on)  # measured 119,848 -> 16,008 minor faults over 3 steps
