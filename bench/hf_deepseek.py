"""Benchmark: moe_lab's SwiGLUMoE with group-limited sigmoid routing against Hugging Face's
DeepSeek-V3 MoE block (``DeepseekV3MoE``) at equal shapes.

The block routes with sigmoid scores, a score-correction bias, group-limited top-k and a
routed scaling factor, and adds ungated shared experts. moe_lab's layer is
:func:`moe_lab.hf.from_hf` of the same block (same weights, same outputs). The Hugging Face
block runs with its ``eager`` experts (a loop over experts with a one-hot token mask) and with
``grouped_mm``; contenders are timed in interleaved rounds under ``torch.no_grad()`` and the
result is the ratio of medians, measured in one run. Run with ``make bench-hf``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import time_contenders  # noqa: E402

from moe_lab.hf import from_hf  # noqa: E402


def deepseek_block(args, implementation: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=args.hidden, moe_intermediate_size=args.inner,
                              n_routed_experts=args.experts, num_experts_per_tok=args.k, n_group=args.groups,
                              topk_group=args.topk_groups, n_shared_experts=1, routed_scaling_factor=2.5,
                              norm_topk_prob=True)
    config._experts_implementation = implementation
    block = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        block.gate.e_score_correction_bias.normal_(0, 0.01)
    return block


@torch.no_grad()
def bench(tokens: int, args) -> dict:
    torch.manual_seed(0)
    eager = deepseek_block(args, "eager")
    grouped = deepseek_block(args, "grouped_mm")
    grouped.load_state_dict(eager.state_dict())
    contenders = {"moe_lab": from_hf(eager), "hf eager": eager, "hf grouped_mm": grouped}
    x = torch.randn(1, tokens, args.hidden)
    reference = eager(x)
    diff = max(float((fn(x) - reference).abs().max()) for fn in contenders.values())
    median = time_contenders(contenders, x, args.rounds)
    return {"median_s": median, "max_abs_diff": diff,
            "eager_over_moe_lab": median["hf eager"] / median["moe_lab"],
            "grouped_over_moe_lab": median["hf grouped_mm"] / median["moe_lab"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inner", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--topk-groups", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    sizes = args.tokens + [args.hidden, args.inner, args.experts, args.k, args.groups, args.topk_groups,
                           args.threads, args.rounds]
    if min(sizes) < 1:
        parser.error("all sizes must be >= 1")
    if args.experts % args.groups or args.topk_groups > args.groups:
        parser.error("--groups must divide --experts and --topk-groups must be <= --groups")
    if args.k > args.experts // args.groups * args.topk_groups:
        parser.error("--k must be <= the experts in the chosen groups")
    torch.set_num_threads(args.threads)
    print(f"DeepSeek-V3 MoE block: H={args.hidden} I={args.inner} E={args.experts} k={args.k} "
          f"groups={args.groups} (top {args.topk_groups}), 1 shared expert, float32, {args.threads} threads, "
          f"torch {torch.__version__}; medians of {args.rounds} interleaved rounds")
    print(f"{'tokens':>7} | {'moe_lab ms':>10} {'eager ms':>9} {'grouped ms':>10} | {'eager/ours':>10} "
          f"{'grouped/ours':>12} | max |diff|")
    worst = None
    for tokens in args.tokens:
        r = bench(tokens, args)
        m = r["median_s"]
        print(f"{tokens:>7} | {1e3 * m['moe_lab']:>10.2f} {1e3 * m['hf eager']:>9.2f} "
              f"{1e3 * m['hf grouped_mm']:>10.2f} | {r['eager_over_moe_lab']:>10.2f} "
              f"{r['grouped_over_moe_lab']:>12.2f} | {r['max_abs_diff']:.1e}")
        worst = r["eager_over_moe_lab"] if worst is None else min(worst, r["eager_over_moe_lab"])
    status = "PASS" if worst >= 1.0 else "FAIL"
    print(f"\n[{status}] moe_lab at least as fast as the eager DeepSeek-V3 block at every size: "
          f"worst eager/ours = {worst:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
