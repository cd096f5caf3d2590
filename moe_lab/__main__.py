"""Command line: ``python -m moe_lab study --task synthetic --recipe prune-experts=0.25,int8 --out DIR``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from moe_lab.data import DataNotFoundError
    from moe_lab.study import TASKS, StudyError, run_study

    parser = argparse.ArgumentParser(prog="python -m moe_lab", description="moe_lab command line")
    commands = parser.add_subparsers(dest="command", required=True)
    study = commands.add_parser("study", help="train or load a base model, compress it, evaluate every stage",
                                description=__import__("moe_lab.study").study.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_argument("--task", choices=TASKS, required=True)
    study.add_argument("--recipe", action="append", required=True,
                       help="e.g. prune-experts=0.25,lowrank=0.5,int8,finetune=1 (repeat for several)")
    study.add_argument("--profile", choices=("ci", "default"), default=None,
                       help="sizes to use (default: $MOE_LAB_PROFILE or 'default')")
    study.add_argument("--out", required=True, help="folder for report.json, the models and pareto.png "
                                                    "(created; an earlier study's folder is replaced)")
    study.add_argument("--base", default=None, help="load the base model from this moe_lab artifact folder")
    study.add_argument("--data", default=None, help="data folder (default: $MOE_LAB_DATA, then data/)")
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        run_study(args.task, args.recipe, args.out, profile=args.profile, base=args.base, data_dir=args.data,
                  seed=args.seed, progress=not args.quiet)
    except (StudyError, DataNotFoundError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
