"""Importing moe_lab sets no global state."""

import subprocess
import sys

CHECK = """
import random, warnings
import numpy as np, torch
torch.manual_seed(0); random.seed(0); np.random.seed(0)
before = (torch.get_num_threads(), torch.get_default_dtype(), torch.random.get_rng_state().clone(),
          random.getstate(), np.random.get_state()[1].copy(), list(warnings.filters))
import moe_lab, moe_lab.compress, moe_lab.data, moe_lab.evaluation, moe_lab.viz, moe_lab.study, moe_lab.hf
after = (torch.get_num_threads(), torch.get_default_dtype(), torch.random.get_rng_state(),
         random.getstate(), np.random.get_state()[1], list(warnings.filters))
assert before[0] == after[0] and before[1] == after[1]
assert torch.equal(before[2], after[2]) and before[3] == after[3] and (before[4] == after[4]).all()
assert before[5] == after[5], "warnings filters changed on import"
print("clean")
"""


def test_import_sets_no_global_state():
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "clean" in run.stdout
