"""`python -m moe_lab study`: outputs, reuse of the base model, and one-line failures (exit 2)
that leave no partial output behind."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_lab import TopKMoE, load, save
from moe_lab.__main__ import main
from moe_lab.data import cifar


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moe_lab", "study", *args], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    result = run("--task", "synthetic", "--recipe", " int8", "--recipe", "prune-experts=.25,lowrank=0.5,int4",
                 "--profile", "ci", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def fails(capsys, *args) -> str:
    """Run the command in this process; it must exit 2 with exactly one line on stderr."""
    code = main(["study", "--task", "synthetic", "--profile", "ci", "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_study_writes_report_models_and_pareto(study):
    report = json.loads((study / "report.json").read_text())
    assert report["task"] == "synthetic" and report["metric"] == "accuracy" and len(report["recipes"]) == 2
    assert report["profile"] == "ci" and report["seed"] == 0
    assert report["torch_threads"] == torch.get_num_threads() or report["torch_threads"] >= 1
    assert set(report["versions"]) == {"python", "torch", "moe_lab", "transformers"}
    assert report["versions"]["torch"] == torch.__version__
    first = report["recipes"][0]
    assert first["recipe"] == "int8" and first["given"] == " int8" and first["folder"] == "int8"
    stages = first["stages"]
    assert [s["stage"] for s in stages] == ["original", "int8 weights"]
    assert stages[-1]["ratio"] > 3 and stages[0]["latency_ms"] > 0 and 0 < stages[-1]["metric"] <= 1
    # quantization removes no parameter: the logical count stays, the float parameters go to buffers
    assert stages[-1]["params_logical"] == stages[0]["params_logical"] == stages[0]["params"]
    assert stages[-1]["params"] < stages[0]["params"] and stages[-1]["params_stored"] > stages[-1]["params"]
    second = report["recipes"][1]
    assert second["recipe"] == "prune-experts=0.25,lowrank=0.5,int4"  # folders named by the normalised recipe
    assert second["stages"][-1]["params_logical"] < stages[0]["params_logical"]
    assert (study / "pareto.png").stat().st_size > 1000
    for recipe in report["recipes"]:
        assert load(recipe["model"]).num_experts in (6, 8)
        assert (study / recipe["folder"] / "model.safetensors").is_file()
    assert load(study / "base").num_experts == 8
    assert leftovers(study.parent) == []


def test_study_reuses_a_saved_base_model(study, tmp_path):
    result = run("--task", "synthetic", "--recipe", "int4-g32", "--profile", "ci",
                 "--out", str(tmp_path / "o"), "--base", str(study / "base"))
    assert result.returncode == 0, result.stderr
    assert "loaded base model" in result.stdout and "training" not in result.stdout
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "o" / "config.json").is_file()


def test_bad_recipe_exits_with_one_line():
    result = run("--task", "synthetic", "--recipe", "quant3", "--out", "/nonexistent/never/made")
    assert result.returncode == 2 and "unknown recipe item 'quant3'" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("recipe, words", [
    ("int4-g0", "group size"), ("int4-g7", "group_size (7) must divide"), ("merge=0", "'merge=0'"),
    ("merge=-3", "'merge=-3'"), ("sparsity=1.5", "sparsity"), ("sparsity=-0.2", "sparsity"),
    ("sparsity=nan", "finite"), ("lowrank=inf", "finite"), ("lowrank=1.5", "whole number"),
    ("int8,merge=2", "'merge=2' cannot come after 'int8'"), ("merge=9", "num_groups must be <="),
])
def test_recipes_are_refused_before_training(capsys, tmp_path, recipe, words):
    err = fails(capsys, "--recipe", "int8", "--recipe", recipe, "--out", str(tmp_path / "out"))
    assert words in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_two_spellings_of_one_recipe_are_refused(capsys, tmp_path):
    err = fails(capsys, "--recipe", "int8,prune-experts=.5", "--recipe", "int8, prune-experts=0.50",
                "--out", str(tmp_path / "out"))
    assert "same recipe (int8,prune-experts=0.5)" in err


def test_bad_output_folders(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in fails(capsys, "--recipe", "int8", "--out", str(tmp_path / "file"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "not a study's" in fails(capsys, "--recipe", "int8", "--out", str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert "cannot write" in fails(capsys, "--recipe", "int8", "--out", "/proc/moe_lab_study/out")
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder stops only other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert "cannot write" in fails(capsys, "--recipe", "int8", "--out", str(locked / "out"))


def test_bad_base_models(capsys, tmp_path, study):
    out = str(tmp_path / "out")
    assert "not a folder" in fails(capsys, "--recipe", "int8", "--base", str(tmp_path / "none"), "--out", out)
    damaged = tmp_path / "damaged"
    shutil.copytree(study / "base", damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-5] ^= 1
    (damaged / "model.safetensors").write_bytes(bytes(data))
    assert "sha256" in fails(capsys, "--recipe", "int8", "--base", str(damaged), "--out", out)
    save(TopKMoE(8, 16, 32, 4), tmp_path / "narrow")  # the synthetic task has 32 inputs
    assert "does not fit the synthetic task" in fails(capsys, "--recipe", "int8", "--base",
                                                      str(tmp_path / "narrow"), "--out", out)
    save(torch.nn.Linear(32, 4), tmp_path / "linear")
    assert "no mixture-of-experts layer" in fails(capsys, "--recipe", "int8",
                                                  "--base", str(tmp_path / "linear"), "--out", out)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_failing_rerun_leaves_the_old_result_untouched(capsys, study, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(study, old)
    before = snapshot(old)
    # the first recipe works, the second fails (as int4-g7 does on 32-wide experts): nothing is written
    fails(capsys, "--recipe", "int8", "--recipe", "int4-g7", "--base", str(study / "base"), "--out", str(old))
    assert snapshot(old) == before and leftovers(tmp_path) == []
    fails(capsys, "--recipe", "int8", "--recipe", "int4-g7", "--base", str(study / "base"),
          "--out", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_a_rerun_replaces_an_earlier_study(capsys, study, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(study, old)
    assert main(["study", "--task", "synthetic", "--profile", "ci", "--quiet", "--recipe", "int8",
                 "--base", str(study / "base"), "--out", str(old)]) == 0
    report = json.loads((old / "report.json").read_text())
    assert [r["recipe"] for r in report["recipes"]] == ["int8"]
    assert not (old / "pareto.png").exists() and not (old / "int8").exists()  # nothing of the old run is left
    assert (old / "model.safetensors").is_file() and leftovers(tmp_path) == []


def test_missing_data_exits_with_a_clear_message(tmp_path):
    result = run("--task", "cifar10", "--recipe", "int8", "--out", str(tmp_path / "out"),
                 "--data", str(tmp_path), env={"MOE_LAB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "MOE_LAB_DATA" in result.stderr and "Traceback" not in result.stderr


def test_corrupted_data_exits_with_a_clear_message(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LAB_OFFLINE", "1")
    with open(tmp_path / "cifar10-subset.npz", "wb") as handle:  # the course's name, other content
        np.savez(handle, x_train=np.zeros((10, 32, 32, 3), np.uint8), y_train=np.zeros(10, np.int64),
                 x_test=np.zeros((10, 32, 32, 3), np.uint8), y_test=np.zeros(10, np.int64),
                 classes=np.array(cifar.CIFAR_CLASSES))
    code = main(["study", "--task", "cifar10", "--recipe", "int8", "--data", str(tmp_path), "--quiet",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "sha256" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
