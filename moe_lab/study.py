"""A compression study without a notebook: ``python -m moe_lab study`` (or ``make study``).

Trains (or loads) the base model for a task, applies one or more recipes
(:mod:`moe_lab.compress.recipes`), evaluates every stage, prints the per-stage tables and writes to
the output folder:

* ``report.json``: per recipe and stage, the metric, saved bytes, compression ratios and
  median CPU latency of one batch;
* ``base/``: the trained base model (``moe_lab.save`` format; ``--base`` loads it again);
* the compressed model (``model.safetensors`` + ``config.json``) in the folder itself for a
  single recipe, or in one sub-folder per recipe;
* ``pareto.png``: saved bytes against the metric, frontier marked, when several recipes run.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from moe_lab import artifact
from moe_lab.compress.pipeline import FineTune, compress
from moe_lab.compress.recipes import parse_recipe
from moe_lab.evaluation import pareto_front
from moe_lab.layers.topk import TopKMoE
from moe_lab.measure import latency
from moe_lab.models import build_image_classifier, build_language_model
from moe_lab.profiles import Profile, get_profile
from moe_lab.training import evaluate, seed_everything, train

TASKS = ("synthetic", "cifar10", "wikitext2")


@dataclass
class StudyTask:
    """Everything a study needs for one task."""

    name: str
    make_model: object
    train_data: tuple
    test_data: tuple
    calibration: torch.Tensor
    kind: str  # "classification" or "language_model"
    train_options: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "perplexity"


def build_task(name: str, profile: Profile, data_dir: str | None = None) -> StudyTask:
    """Data, model factory and training settings for ``name`` under ``profile``."""
    if name == "synthetic":
        from moe_lab.data import make_clustered_task

        task = make_clustered_task(profile.synthetic_train, profile.synthetic_test, input_size=32, seed=0)
        return StudyTask(name, lambda: TopKMoE(8, 32, 128, task.num_classes, k=2, activation="relu",
                                               balance_loss_weight=0.01),
                         task.train, task.test, task.x_train[:512], "classification",
                         profile.train_options("synthetic"))
    if name == "cifar10":
        from moe_lab.data import load_cifar10, to_image_tensor

        data = load_cifar10(data_dir, train_per_class=profile.cifar_train_per_class,
                            test_per_class=profile.cifar_test_per_class)
        x_train, x_test = to_image_tensor(data.x_train), to_image_tensor(data.x_test)
        y_train, y_test = torch.as_tensor(data.y_train), torch.as_tensor(data.y_test)
        return StudyTask(name, lambda: build_image_classifier(profile),
                         (x_train, y_train), (x_test, y_test), x_train[:256], "classification",
                         profile.train_options("cifar10"))
    if name == "wikitext2":
        from moe_lab.data import load_wikitext2, make_lm_blocks

        text = load_wikitext2(data_dir, **profile.wikitext_options())
        train_blocks = make_lm_blocks(text.train, profile.lm_context)
        test_blocks = make_lm_blocks(text.test, profile.lm_context)
        return StudyTask(name, lambda: build_language_model(profile, len(text.vocab)),
                         train_blocks, test_blocks, train_blocks[0][:64], "language_model",
                         profile.train_options("wikitext2"))
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


def _slug(recipe: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", recipe)


def run_study(task_name: str, recipes: list[str], out: str | Path, *, profile: str | None = None,
              base: str | Path | None = None, data_dir: str | None = None, seed: int = 0,
              progress: bool = True) -> dict:
    """Run the study and write its outputs to ``out``; return the report written as JSON."""
    parsed = [(recipe, *parse_recipe(recipe)) for recipe in recipes]  # fail on a bad recipe before training
    if not parsed:
        raise ValueError("give at least one recipe")
    prof = get_profile(profile)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *args, **kwargs: None)
    task = build_task(task_name, prof, data_dir)
    seed_everything(seed)
    if base is not None:
        model = artifact.load(base)
        say(f"loaded base model from {base}")
    else:
        model = task.make_model()
        say(f"training the base {type(model).__name__} on {task_name} ({prof.name} profile) ...")
        start = time.perf_counter()
        train(model, task.train_data, task=task.kind, progress=progress, seed=seed, **task.train_options)
        say(f"trained in {time.perf_counter() - start:.0f} s")
    artifact.save(model, out / "base")
    example = task.test_data[0][:64]

    def score(m: nn.Module) -> float:
        return evaluate(m, task.test_data, task=task.kind)[task.metric]

    report = {"task": task_name, "profile": prof.name, "metric": task.metric, "recipes": []}
    for recipe, stages, finetune in parsed:
        if finetune:
            options = {k: v for k, v in task.train_options.items() if k in ("lr", "batch_size", "max_steps")}
            options["lr"] = options.get("lr", 1e-3) / 3
            if "max_steps" in options:
                options["max_steps"] = max(1, options["max_steps"] // 5)
            stages = stages + [FineTune(task.train_data, epochs=finetune, task=task.kind, **options)]
        say(f"\nrecipe {recipe!r}:")
        result = compress(model, stages, task.calibration, evaluate=score)
        timings = []
        for record in result.records:
            record["latency_ms"] = None
            timings.append(record)
        timings[0]["latency_ms"] = 1e3 * latency(model, example, repeats=5)
        timings[-1]["latency_ms"] = 1e3 * latency(result.model, example, repeats=5)
        say(result.table())
        folder = out if len(parsed) == 1 else out / _slug(recipe)
        artifact.save(result.model, folder)
        report["recipes"].append({"recipe": recipe, "model": str(folder), "stages": result.records})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if len(parsed) > 1:
        _plot_pareto(report, out / "pareto.png")
    say(f"\nwrote {out / 'report.json'}")
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
