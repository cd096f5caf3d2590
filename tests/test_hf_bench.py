"""The DeepSeek-V3 benchmark runs end to end (tiny sizes; the real run is `make bench-hf`)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "bench" / "hf_deepseek.py"


def test_hf_deepseek_bench_smoke():
    pytest.importorskip("transformers")
    sizes = ["--tokens", "16", "--hidden", "32", "--inner", "16", "--experts", "8", "--k", "2",
             "--groups", "4", "--topk-groups", "2", "--rounds", "1", "--threads", "1"]
    run = subprocess.run([sys.executable, str(SCRIPT), *sizes], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "eager/ours" in run.stdout and "] moe_lab at least as fast as the eager DeepSeek-V3" in run.stdout
    rows = [line for line in run.stdout.splitlines() if line.strip().startswith("16 |")]
    diffs = [float(line.rsplit("|", 1)[1]) for line in rows]
    assert diffs and diffs[0] <= 1e-5


def test_hf_deepseek_bench_rejects_bad_groups():
    run = subprocess.run([sys.executable, str(SCRIPT), "--experts", "10", "--groups", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--groups must divide --experts" in run.stderr
