"""The allocator setting of CPU fine-tuning: freed tensors stay mapped for the next step."""

import json
import subprocess
import sys

# steps that each hold 8, 16 and 32 MiB of tensors at once, as a training step holds activations:
# the page faults of each of 30 steps after the first, and the peak resident set
_STEPS = """
import json, resource, sys, torch
from quantorder.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    a, b, c = torch.ones(2**21), torch.ones(2**22), torch.ones(2**23)
    return float(a[0] + b[0] + c[0])
step()
per_step = []
for _ in range(30):
    before = faults()
    step()
    per_step.append(faults() - before)
print(json.dumps({"faults": per_step, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_steps(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_tensors_are_reused_without_faulting_their_pages_in_again():
    default, kept = run_steps("default"), run_steps("keep")
    assert min(default["faults"][10:]) > 0, default  # by default the 32 MiB tensor is mapped anew every step
    # kept: the heap settles within a few steps, then steps reuse it (an odd step may still grow it)
    assert sum(kept["faults"][10:]) * 10 < sum(default["faults"][10:]), kept
    # reused, not piled up: 30 steps of 56 MiB each would be 1.6 GiB
    assert kept["peak_rss"] < 2 * default["peak_rss"], (kept, default)
