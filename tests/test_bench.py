"""The benchmark script runs end to end (tiny sizes; the real run is `make bench`)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench" / "dispatch.py"


def test_dispatch_bench_smoke(tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(BENCH), "--tokens", "32", "--ks", "1", "2", "--repeats", "1",
                          "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "max |TopKMoE - deck|" in run.stdout
    assert json.loads(out.read_text())["config"]["tokens"] == [32]


def test_dispatch_bench_rejects_bad_arguments():
    run = subprocess.run([sys.executable, str(BENCH), "--ks", "9"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0 and "--ks must be in" in run.stderr


def test_hf_dispatch_bench_smoke():
    import pytest

    pytest.importorskip("transformers")
    script = Path(__file__).parents[1] / "bench" / "hf_dispatch.py"
    run = subprocess.run([sys.executable, str(script), "--tokens", "16", "--hidden", "32", "--inner", "64",
                          "--rounds", "1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "eager/ours" in run.stdout and "] moe_lab >= 1.1x the eager block" in run.stdout
    assert "eager/floor" in run.stdout


def test_compressed_bench_smoke(tmp_path):
    out = tmp_path / "c.json"
    script = Path(__file__).parents[1] / "bench" / "compressed.py"
    run = subprocess.run([sys.executable, str(script), "--size", "32", "48", "--tokens", "64",
                          "--rounds", "1",
                          "--threads", "1", "--vocab", "50", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert {r["layer"] for r in result["linears"]} >= {"int8", "int4", "int3", "int2", "sparse 50%"}
    assert all(r["ratio"] > 0 for r in result["moe"] + result["lm"])
    assert "WikiText LanguageModelMoE" in run.stdout and "x float (target <= 1.5)" in run.stdout
