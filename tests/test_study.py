"""`python -m moe_lab study`: outputs, reuse of the base model, and clear failures."""

import json
import os
import subprocess
import sys

import pytest

from moe_lab import load


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moe_lab", "study", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    result = run("--task", "synthetic", "--recipe", "int8", "--recipe", "prune-experts=0.25,lowrank=0.5,int4",
                 "--profile", "ci", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_study_writes_report_models_and_pareto(study):
    report = json.loads((study / "report.json").read_text())
    assert report["task"] == "synthetic" and report["metric"] == "accuracy" and len(report["recipes"]) == 2
    first = report["recipes"][0]["stages"]
    assert [s["stage"] for s in first] == ["original", "int8 weights"]
    assert first[-1]["ratio"] > 3 and first[0]["latency_ms"] > 0 and 0 < first[-1]["metric"] <= 1
    assert (study / "pareto.png").stat().st_size > 1000
    for recipe in report["recipes"]:
        model = load(recipe["model"])
        assert model.num_experts in (6, 8)
    assert load(study / "base").num_experts == 8


def test_study_reuses_a_saved_base_model(study, tmp_path):
    result = run("--task", "synthetic", "--recipe", "int4-g32", "--profile", "ci", "--out", str(tmp_path),
                 "--base", str(study / "base"))
    assert result.returncode == 0, result.stderr
    assert "loaded base model" in result.stdout and "training" not in result.stdout
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_bad_recipe_exits_with_a_clear_message(tmp_path):
    result = run("--task", "synthetic", "--recipe", "quant3", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown recipe item 'quant3'" in result.stderr


def test_missing_data_exits_with_a_clear_message(tmp_path):
    result = run("--task", "cifar10", "--recipe", "int8", "--out", str(tmp_path / "out"),
                 "--data", str(tmp_path), env={"MOE_LAB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "MOE_LAB_DATA" in result.stderr and "Traceback" not in result.stderr
