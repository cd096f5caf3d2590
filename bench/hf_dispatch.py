"""Benchmark: moe_lab's SwiGLUMoE against Hugging Face's Mixtral block at equal shapes.

The Hugging Face block runs with its ``eager`` experts implementation (a loop over experts
with a one-hot token mask) and with ``grouped_mm`` (one grouped matmul over all experts);
moe_lab's layer is :func:`moe_lab.hf.from_hf` of the same block (same weights, same
outputs). Contenders are timed in interleaved rounds under ``torch.no_grad()``; the result
is the ratio of medians, measured in one run. Run with ``make bench-hf``.

The floor is the experts' matmuls alone, at the row counts this routing gives each expert, on
preallocated tensors: nothing else of an MoE block. ``eager/floor`` is the largest speed-up over
the eager block that any dispatch could reach, so the target (>= 1.1x the eager block) is
physically out of reach where ``eager/floor`` is below 1.1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import time_contenders  # noqa: E402

from moe_lab.hf import from_hf  # noqa: E402

MIN_SPEEDUP = 1.1  # target: moe_lab's block against the eager one


def make_block(hidden: int, inner: int, experts: int, k: int, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inner, num_local_experts=experts,
                           num_experts_per_tok=k)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def bench(tokens: int, hidden: int, inner: int, experts: int, k: int, rounds: int) -> dict:
    torch.manual_seed(0)
    eager = make_block(hidden, inner, experts, k, "eager")
    grouped = make_block(hidden, inner, experts, k, "grouped_mm")
    grouped.load_state_dict(eager.state_dict())
    ours = from_hf(eager)
    x = torch.randn(1, tokens, hidden)
    counts = torch.bincount(ours.route(x).indices.reshape(-1), minlength=experts).tolist()
    gate_up, down = eager.experts.gate_up_proj.detach(), eager.experts.down_proj.detach()
    blocks = [(torch.randn(c, hidden), torch.randn(c, inner), gate_up[e], down[e])
              for e, c in enumerate(counts) if c]

    def floor(_):
        for rows, inner_rows, w_gate_up, w_down in blocks:
            F.linear(rows, w_gate_up)
            F.linear(inner_rows, w_down)

    contenders = {"moe_lab": ours, "hf eager": eager, "hf grouped_mm": grouped, "floor": floor}
    with torch.no_grad():
        reference = eager(x)
        diffs = {name: float((fn(x) - reference).abs().max()) for name, fn in contenders.items()
                 if name != "floor"}
        median = time_contenders(contenders, x, rounds)
    return {"tokens": tokens, "median_s": median, "max_abs_diff": diffs,
            "eager_over_moe_lab": median["hf eager"] / median["moe_lab"],
            "grouped_over_moe_lab": median["hf grouped_mm"] / median["moe_lab"],
            "eager_over_floor": median["hf eager"] / median["floor"],
            "efficiency": median["floor"] / median["moe_lab"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inner", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if min(args.tokens + [args.hidden, args.inner, args.experts, args.k, args.threads, args.rounds]) < 1:
        parser.error("all sizes must be >= 1")
    if args.k > args.experts:
        parser.error("--k must be <= --experts")
    torch.set_num_threads(args.threads)
    print(f"SwiGLU MoE block: H={args.hidden} I={args.inner} E={args.experts} k={args.k}, float32, "
          f"{args.threads} threads, torch {torch.__version__}; medians of {args.rounds} interleaved rounds")
    print(f"{'tokens':>7} | {'moe_lab ms':>10} {'eager ms':>9} {'grouped ms':>10} {'floor ms':>9} | "
          f"{'eager/ours':>10} {'grouped/ours':>12} {'eager/floor':>11} {'effic.':>6} | max |diff|")
    rows = []
    for tokens in args.tokens:
        r = bench(tokens, args.hidden, args.inner, args.experts, args.k, args.rounds)
        rows.append(r)
        m = r["median_s"]
        print(f"{tokens:>7} | {1e3 * m['moe_lab']:>10.2f} {1e3 * m['hf eager']:>9.2f} "
              f"{1e3 * m['hf grouped_mm']:>10.2f} {1e3 * m['floor']:>9.2f} | "
              f"{r['eager_over_moe_lab']:>10.2f} "
              f"{r['grouped_over_moe_lab']:>12.2f} {r['eager_over_floor']:>11.2f} {r['efficiency']:>6.2f} | "
              f"{max(r['max_abs_diff'].values()):.1e}")
    worst = min(rows, key=lambda r: r["eager_over_moe_lab"])
    status = "PASS" if worst["eager_over_moe_lab"] >= MIN_SPEEDUP else "FAIL"
    print("\nfloor: the experts' matmuls alone at this routing's row counts; effic. = floor / moe_lab; "
          "eager/floor = the most any dispatch can gain over the eager block")
    print(f"[{status}] moe_lab >= {MIN_SPEEDUP}x the eager block at every size: worst eager/ours = "
          f"{worst['eager_over_moe_lab']:.2f} at {worst['tokens']} tokens, where eager/floor = "
          f"{worst['eager_over_floor']:.2f}")
    if worst["eager_over_floor"] < MIN_SPEEDUP:
        print(f"       out of reach there: the eager block is within {worst['eager_over_floor']:.2f}x of its "
              f"own matmuls, so no dispatch can be {MIN_SPEEDUP}x faster than it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
