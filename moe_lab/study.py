"""A compression study without a notebook: ``python -m moe_lab study`` (or ``make study``).

Trains (or loads) the base model for a task, applies one or more recipes
(:mod:`moe_lab.compress.recipes`), evaluates every stage, prints the per-stage tables and writes to
the output folder:

* ``report.json``: per recipe (normalised) and stage, the metric, saved bytes, compression
  ratios, parameters (``params_logical``: the weights the model stands for, which quantization
  does not change; ``params_stored``: the numbers saved) and router fidelity against the base
  model (on 64 test inputs) and median CPU latency of one batch;
  with the task, profile, seed, torch's thread count and the versions of Python, torch,
  moe_lab and transformers (results differ with the thread count);
* ``base/``: the trained base model (``moe_lab.save`` format; ``--base`` loads it again);
* the compressed model (``model.safetensors`` + ``config.json``) in the folder itself for a
  single recipe, or in one sub-folder per recipe, named by the normalised recipe;
* ``pareto.png``: saved bytes against the metric, frontier marked, when several recipes run.

Every recipe is checked before training; everything is written to a temporary folder beside
the output folder and moved into place when complete (an earlier study's folder is replaced
only then). Problems with the inputs exit with status 2 and one line.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import uuid
from importlib import metadata
from pathlib import Path

import torch
import torch.nn as nn

import moe_lab
from moe_lab import artifact
from moe_lab.compress.pipeline import FineTune, compress
from moe_lab.compress.recipes import normalize_recipe, parse_recipe
from moe_lab.evaluation import pareto_front
from moe_lab.layers.base import mixture_layers
from moe_lab.measure import latency
from moe_lab.profiles import get_profile
from moe_lab.tasks import TASKS, Task, build_task, trained_model
from moe_lab.training import evaluate, seed_everything

StudyTask = Task  # the name before moe_lab.tasks existed


class StudyError(ValueError):
    """A problem with what the study was given (recipe, folders, data, base model): the command
    line prints it as one line and exits with status 2."""


def _slug(recipe: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", recipe)


def _recipes(recipes: list[str]) -> list[tuple[str, str, list, int]]:
    """``(given, normalised, stages, fine-tune epochs)`` per recipe, every one checked (items and
    their order) before anything is trained; two spellings of one recipe are refused."""
    if isinstance(recipes, str) or not recipes:
        raise StudyError("give at least one recipe (a list of strings such as ['int8'])")
    parsed, seen = [], {}
    for given in recipes:
        try:
            stages, finetune = parse_recipe(given)
            normal = normalize_recipe(given)
        except ValueError as error:
            raise StudyError(f"--recipe {given!r}: {error}") from None
        if normal in seen:
            raise StudyError(f"--recipe {seen[normal]!r} and --recipe {given!r} are the same recipe "
                             f"({normal}): give it once")
        clash = [n for n in seen if _slug(n) == _slug(normal)]
        if clash:
            raise StudyError(f"--recipe {clash[0]!r} and --recipe {given!r} would share the folder "
                             f"{_slug(normal)!r}: run them in separate studies")
        seen[normal] = given
        parsed.append((given, normal, stages, finetune))
    return parsed


def _destination(out: str | Path) -> Path:
    """``out`` as an absolute path, refused unless it can become the study's folder: missing, an
    empty folder, or an earlier study's folder (it holds report.json), which is replaced."""
    out = Path(out).expanduser().absolute()
    if out.parent == out:
        raise StudyError(f"--out {out}: give a folder to create, not the file system's root")
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise StudyError(f"--out {out} already holds files that are not a study's: give a new or empty "
                         f"folder (an earlier study's folder is replaced when the new one is complete)")
    return out


def _workspace(out: Path) -> Path:
    """A fresh temporary folder beside ``out``, where everything is written before it is moved into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        work.mkdir()
    except OSError as error:
        raise StudyError(f"--out {out}: cannot write in {out.parent} ({error.strerror or error})") from None
    return work


def _move_into_place(work: Path, out: Path) -> None:
    """Replace ``out`` (if any) by the complete ``work`` folder: two renames in one folder."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(work, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load_base(base: str | Path, task: StudyTask) -> nn.Module:
    """The ``--base`` model, checked to be a mixture model that takes this task's data."""
    try:
        model = artifact.load(base)
    except (FileNotFoundError, ValueError) as error:
        raise StudyError(f"--base {base}: {error}") from None
    if not mixture_layers(model):
        raise StudyError(f"--base {base}: the model ({type(model).__name__}) has no mixture-of-experts layer")
    inputs, targets = task.test_data
    try:
        evaluate(model, (inputs[:8], targets[:8]), task=task.kind)
    except Exception as error:  # noqa: BLE001  (any failure here means: not a model for this task)
        raise StudyError(f"--base {base}: the {type(model).__name__} it holds does not fit the "
                         f"{task.name} task ({type(error).__name__}: {error})") from None
    return model


def _versions() -> dict[str, str | None]:
    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = None
    return {"python": platform.python_version(), "torch": torch.__version__, "moe_lab": moe_lab.__version__,
            "transformers": transformers}


def run_study(task_name: str, recipes: list[str], out: str | Path, *, profile: str | None = None,
              base: str | Path | None = None, data_dir: str | None = None, seed: int = 0,
              progress: bool = True) -> dict:
    """Run the study and write its outputs to ``out``; return the report written as JSON.

    Every recipe is checked first (items, order, and a dry run of its stages on the untrained
    model, which catches sizes that do not fit such as ``int4-g7`` on 32-wide experts), then
    the base model is trained or loaded. Everything is written to a temporary folder beside
    ``out`` and moved into place only when complete, so a failed run leaves ``out`` as it was.
    A problem with the inputs raises :class:`StudyError`.
    """
    if task_name not in TASKS:
        raise StudyError(f"--task must be one of {TASKS}, got {task_name!r}")
    parsed = _recipes(recipes)
    try:
        prof = get_profile(profile)
    except ValueError as error:
        raise StudyError(str(error)) from None
    out = _destination(out)
    work = _workspace(out)
    say = print if progress else (lambda *args, **kwargs: None)
    try:
        try:
            task = build_task(task_name, prof, data_dir)
        except (OSError, ValueError) as error:  # missing data, a failed checksum
            raise StudyError(str(error)) from None
        if base is not None:
            model = _load_base(base, task)
            say(f"loaded base model from {base}")
        else:
            seed_everything(seed)
            for given, _, stages, _ in parsed:  # structure only: fails in seconds, not after training
                try:
                    compress(task.make_model(), stages, task.calibration)
                except (ValueError, TypeError) as error:
                    raise StudyError(f"--recipe {given!r} does not apply to the {task_name} model: "
                                     f"{error}") from None
            say(f"training the base model on {task_name} ({prof.name} profile) ...")
            base_model = trained_model(task, seed=seed, progress=progress)
            model = base_model.model.train()
            say(f"trained in {base_model.seconds:.0f} s" if base_model.source == "trained"
                else f"loaded the trained base model from {base_model.path}")
        report = _compress_all(model, task, parsed, work, out, say)
        report.update({"task": task_name, "profile": prof.name, "seed": seed, "base": None if base is None
                       else str(Path(base).absolute()), "torch_threads": torch.get_num_threads(),
                       "versions": _versions()})
        artifact.save(model, work / "base")
        (work / "report.json").write_text(json.dumps(report, indent=1))
        if len(parsed) > 1:
            _plot_pareto(report, work / "pareto.png")
        _move_into_place(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"\nwrote {out / 'report.json'}")
    return report


def _compress_all(model: nn.Module, task: StudyTask, parsed, work: Path, out: Path, say) -> dict:
    """Apply every recipe to ``model``, saving each compressed model under ``work``."""
    example = task.test_data[0][:64]

    def score(m: nn.Module) -> float:
        return evaluate(m, task.test_data, task=task.kind)[task.metric]

    report = {"metric": task.metric, "recipes": []}
    for given, recipe, stages, finetune in parsed:
        if finetune:
            options = {k: v for k, v in task.train_options.items() if k in ("lr", "batch_size", "max_steps")}
            options["lr"] = options.get("lr", 1e-3) / 3
            if "max_steps" in options:
                options["max_steps"] = max(1, options["max_steps"] // 5)
            stages = stages + [FineTune(task.train_data, epochs=finetune, task=task.kind, **options)]
        say(f"\nrecipe {recipe!r}:")
        try:
            result = compress(model, stages, task.calibration, evaluate=score,
                              fidelity_inputs=example)
        except (ValueError, TypeError) as error:
            raise StudyError(f"--recipe {given!r}: {error}") from None
        for record in result.records:
            record["latency_ms"] = None
        result.records[0]["latency_ms"] = 1e3 * latency(model, example, repeats=5)
        result.records[-1]["latency_ms"] = 1e3 * latency(result.model, example, repeats=5)
        say(result.table())
        folder = "." if len(parsed) == 1 else _slug(recipe)
        artifact.save(result.model, work / folder)
        report["recipes"].append({"recipe": recipe, "given": given, "model": str((out / folder).resolve()),
                                  "folder": folder, "stages": result.records})
    return report


def _plot_pareto(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = [(r["recipe"], r["stages"][-1]) for r in report["recipes"]]
    base = report["recipes"][0]["stages"][0]
    points = [("base", base)] + finals
    sizes = [p[1]["bytes"] for p in points]
    scores = [p[1]["metric"] for p in points]
    front = pareto_front(sizes, scores, higher_is_better=report["metric"] == "accuracy")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(sizes, scores, c=["tab:red" if i in front else "tab:gray" for i in range(len(points))])
    ax.plot([sizes[i] for i in front], [scores[i] for i in front], c="tab:red", label="Pareto frontier")
    for (label, _), x, y in zip(points, sizes, scores):
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="saved bytes (log scale)", ylabel=report["metric"],
           title=f"{report['task']}: size vs {report['metric']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
