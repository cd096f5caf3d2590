"""Benchmark: forward latency of compressed layers and models against their float originals.

Run with ``make bench-compressed`` (or ``.venv/bin/python bench/compressed.py --help``). Four tables,
all from one run, inference under ``torch.no_grad()``, each contender timed once per round in
interleaved rounds and reported as the median, so a busy machine slows every contender alike and
the *ratios* (time / float time) are the result:

1. every compact linear at ``--size IN OUT`` (default 1024 -> 4096) at one token and at a prefill of
   ``--tokens`` (default 4096): int8, int4/int3/int2 in groups of 128, 50% magnitude-pruned sparse,
   low-rank and base + delta, each low-rank one next to its ideal ratio (its multiply-adds / the
   dense ones: ``rank * (in + out) / (in * out)``);
2. fused integer kernels: what bytes buy when a kernel multiplies by the integers directly
   (``torch._weight_int8pack_mm`` and ``torch._weight_int4pack_mm_for_cpu``, bfloat16 activations),
   against dense float32 and bfloat16 at the same size;
3. a compressed MoE layer (``TopKMoE`` E=8, d=256, h=512, o=256, k=2, the size of ``make bench``);
4. the WikiText language model (``LanguageModelMoE`` at the default profile's sizes; the vocabulary of
   the WikiText-2 data if it is found, else ``--vocab``): tokens/s at one token (batch 1, decode-like)
   and at a prefill of ``--tokens`` tokens (``tokens / context`` sequences of ``context`` tokens).

Targets (issue 8): int8 and int4 layers and models within 1.5x of the float latency at both sizes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from moe_lab import LanguageModelMoE, TopKMoE  # noqa: E402
from moe_lab.compress import parse_recipe  # noqa: E402
from moe_lab.compress.lowrank import low_rank_from_linear  # noqa: E402
from moe_lab.layers.compact import BaseDeltaLinear, QuantizedLinear, SparseLinear  # noqa: E402
from moe_lab.profiles import get_profile  # noqa: E402

MAX_QUANTIZED_RATIO = 1.5
MOE_SIZE = dict(num_experts=8, input_size=256, expert_size=512, output_size=256, k=2)
MOE_RECIPES = ["int8", "int4-g128", "lowrank=128", "sparsity=0.5", "prune-experts=0.25,lowrank=0.5,int8"]
LM_RECIPES = ["int8", "int4-g32", "lowrank=0.5,int8"]


def time_interleaved(contenders: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each ``name -> fn()``, timed one after the other in each round."""
    times = {name: [] for name in contenders}
    with torch.no_grad():
        for fn in contenders.values():  # warm-up: allocations, lazy caches, first-call dispatch
            fn()
        for _ in range(rounds):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def rows_against_float(key: str, reference, variants: dict, inputs: list, rounds: int) -> list[dict]:
    """For each input: time ``reference`` and every variant on it; one row per variant, with its ratio."""
    rows = []
    for x in inputs:
        tokens = x.numel() if x.dtype == torch.long else x.shape[0]  # token ids, or (tokens, features)
        contenders = {"float": partial(reference, x), **{n: partial(m, x) for n, m in variants.items()}}
        median = time_interleaved(contenders, rounds if tokens == 1 else max(1, rounds // 2))
        for name in variants:
            rows.append({key: name, "tokens": tokens,
                         "shape": list(x.shape), "seconds": median[name], "float_seconds": median["float"],
                         "ratio": median[name] / median["float"]})
    return rows


def compact_linears(in_features: int, out_features: int) -> tuple[nn.Linear, dict, dict]:
    """The float layer, ``name -> compact layer`` and ``name -> ideal time ratio`` (low-rank ones)."""
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features).eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.weight[pruned.weight.abs() < pruned.weight.abs().median()] = 0.0
    group = 128 if in_features % 128 == 0 else None
    layers = {f"int{b}" + (f"-g{group}" if group and b < 8 else ""): QuantizedLinear.from_linear(
        dense, b, None if b == 8 else group) for b in (8, 4, 3, 2)}
    layers["sparse 50%"] = SparseLinear.from_linear(pruned)
    ideal = {}
    smallest = min(in_features, out_features)
    for rank in sorted({max(1, smallest // 16), max(1, smallest // 4)}):
        layers[f"low-rank r={rank}"] = low_rank_from_linear(dense, rank)
        ideal[f"low-rank r={rank}"] = rank * (in_features + out_features) / (in_features * out_features)
    rank = max(1, smallest // 16)
    base_delta = BaseDeltaLinear(in_features, out_features, rank)
    with torch.no_grad():
        for p in base_delta.parameters():
            p.normal_(0, 0.02)
    layers[f"base+delta r={rank}"] = base_delta
    ideal[f"base+delta r={rank}"] = 1 + rank * (in_features + out_features) / (in_features * out_features)
    return dense, {name: layer.eval() for name, layer in layers.items()}, ideal


def bench_linears(in_features: int, out_features: int, sizes: list[int], rounds: int) -> list[dict]:
    dense, layers, ideal = compact_linears(in_features, out_features)
    rows = rows_against_float("layer", dense, layers, [torch.randn(n, in_features) for n in sizes], rounds)
    return [r | {"ideal": ideal.get(r["layer"])} for r in rows]


def bench_kernels(in_features: int, out_features: int, sizes: list[int], rounds: int) -> list[dict]:
    """Fused int8 / int4 kernels with bfloat16 activations against dense float32 and bfloat16."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.02
    q8 = QuantizedLinear.from_linear(nn.Linear(in_features, out_features, bias=False), 8)
    scales8 = q8.scales.squeeze(1)
    group = 128 if in_features % 128 == 0 else None
    int4 = None
    if group and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale_zero = torch.stack([torch.rand(in_features // group, out_features),
                                  torch.zeros(in_features // group, out_features)], -1).bfloat16()
        int4 = (packed, scale_zero)
    weight_bytes = {"float32 dense": 4, "bfloat16 dense": 2, "int8 kernel (bf16 x)": 1,
                    "int4 kernel (bf16 x)": 0.5}
    rows = []
    for tokens in sizes:
        x = torch.randn(tokens, in_features)
        xb, wb = x.bfloat16(), weight.bfloat16()
        contenders = {"float32 dense": partial(F.linear, x, weight),
                      "bfloat16 dense": partial(F.linear, xb, wb)}
        if hasattr(torch, "_weight_int8pack_mm"):
            contenders["int8 kernel (bf16 x)"] = partial(torch._weight_int8pack_mm, xb, q8.qweight, scales8)
        if int4 is not None:
            contenders["int4 kernel (bf16 x)"] = partial(torch._weight_int4pack_mm_for_cpu, xb, int4[0],
                                                         group, int4[1])
        median = time_interleaved(contenders, rounds if tokens == 1 else max(1, rounds // 2))
        for name, seconds in median.items():  # weights read per second: the memory-bound rate at one token
            rate = weight_bytes[name] * in_features * out_features / seconds / 1e9 if tokens == 1 else None
            rows.append({"kernel": name, "tokens": tokens, "seconds": seconds,
                         "ratio": seconds / median["float32 dense"], "weight_gb_per_s": rate})
    return rows


def compressed_models(model: nn.Module, recipes: list[str], calibration: torch.Tensor) -> dict:
    variants = {}
    for recipe in recipes:
        compressed = copy.deepcopy(model)
        for stage in parse_recipe(recipe)[0]:
            compressed = stage.apply(compressed, calibration)
        variants[recipe] = compressed.eval()
    return variants


def bench_moe(sizes: list[int], rounds: int) -> list[dict]:
    torch.manual_seed(0)
    layer = TopKMoE(**MOE_SIZE).eval()
    variants = compressed_models(layer, MOE_RECIPES, torch.randn(512, MOE_SIZE["input_size"]))
    inputs = [torch.randn(n, MOE_SIZE["input_size"]) for n in sizes]
    return rows_against_float("model", layer, variants, inputs, rounds)


def wikitext_vocab(fallback: int) -> tuple[int, str]:
    try:
        from moe_lab.data.wikitext import load_wikitext2

        data = load_wikitext2(download=False, verbose=False)
        return len(data.vocab), f"WikiText-2 ({data.train_split} split) vocabulary"
    except Exception as error:  # no data here: any failure means "use the fallback size"
        return fallback, f"--vocab {fallback} (WikiText-2 not found: {type(error).__name__})"


def bench_lm(prefill: int, vocab: int, rounds: int) -> list[dict]:
    profile = get_profile("default")
    torch.manual_seed(0)
    model = LanguageModelMoE(vocab, profile.lm_num_experts, profile.lm_expert_size, profile.lm_embedding_dim,
                             num_layers=profile.lm_num_layers, num_heads=profile.lm_num_heads,
                             context_size=profile.lm_context).eval()
    context = profile.lm_context
    calibration = torch.randint(0, vocab, (8, context))
    variants = compressed_models(model, LM_RECIPES, calibration)
    batches = [torch.randint(0, vocab, (1, 1)),  # one token, batch 1: decoding-like
               torch.randint(0, vocab, (max(1, prefill // context), min(prefill, context)))]
    rows = rows_against_float("model", model, variants, batches, rounds)
    return [r | {"tokens_per_s": r["tokens"] / r["seconds"],
                 "float_tokens_per_s": r["tokens"] / r["float_seconds"]} for r in rows]


def _print_rows(rows: list[dict], key: str, width: int, label: str, extra=None) -> list[tuple[str, float]]:
    """One line per row (name, tokens, ms, float ms, ratio, then ``extra = (heading, row -> text)``);
    returns ``(label, ratio)`` for the int8 / int4 rows, the ones with a target."""
    heading = f"{key:<{width}} {'tokens':>6} | {'ms':>9} {'float ms':>9} | {'ratio':>6}"
    print(heading + (f" {extra[0]}" if extra else ""))
    checks = []
    for r in rows:
        line = (f"{r[key]:<{width}} {r['tokens']:>6} | {1e3 * r['seconds']:>9.3f} "
                f"{1e3 * r['float_seconds']:>9.3f} | {r['ratio']:>6.2f}")
        print(line + (f" {extra[1](r)}" if extra else ""))
        if r[key].startswith(("int8", "int4")):
            checks.append((f"{label} {r[key]}, {r['tokens']} token(s)", r["ratio"]))
    return checks


def report(results: dict) -> list[dict]:
    """Print the four tables; return the target checks."""
    print(f"\n1. compact linears {results['size'][0]} -> {results['size'][1]}: time / float time "
          "(ideal: the layer's multiply-adds / the dense layer's)")
    checks = _print_rows(results["linears"], "layer", 18, "linear", (
        f"{'ideal':>6}", lambda r: "" if r["ideal"] is None else f"{r['ideal']:>6.3f}"))
    if results["kernels"]:
        print("\n2. fused integer kernels (bfloat16 activations), time / float32 dense, and the weight bytes "
              "read per second at one token")
        print(f"{'kernel':<22} {'tokens':>6} | {'ms':>9} | {'ratio':>6} {'weight GB/s':>11}")
        for r in results["kernels"]:
            rate = "-" if r["weight_gb_per_s"] is None else f"{r['weight_gb_per_s']:.1f}"
            print(f"{r['kernel']:<22} {r['tokens']:>6} | {1e3 * r['seconds']:>9.3f} | {r['ratio']:>6.2f} "
                  f"{rate:>11}")
    size = ", ".join(f"{k}={v}" for k, v in MOE_SIZE.items())
    print(f"\n3. compressed TopKMoE ({size}): time / float time")
    checks += _print_rows(results["moe"], "model", 38, "MoE layer")
    print(f"\n4. WikiText LanguageModelMoE (default profile sizes, {results['vocab_source']})")

    def rates(r: dict) -> str:
        shape = "x".join(map(str, r["shape"]))
        return f"{shape:>8} {r['tokens_per_s']:>9.0f} {r['float_tokens_per_s']:>11.0f}"

    heading = f"{'batch':>8} {'tok/s':>9} {'float tok/s':>11}"
    checks += _print_rows(results["lm"], "model", 22, "LM", (heading, rates))
    print()
    targets = []
    for label, ratio in checks:
        status = "PASS" if ratio <= MAX_QUANTIZED_RATIO else "FAIL"
        targets.append({"target": f"{label} <= {MAX_QUANTIZED_RATIO}x float", "value": ratio,
                        "status": status})
        print(f"  [{status}] {label}: {ratio:.2f}x float (target <= {MAX_QUANTIZED_RATIO})")
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 4096], metavar=("IN", "OUT"),
                        help="the compact linears' input and output widths (default: 1024 4096)")
    parser.add_argument("--tokens", type=int, default=4096, help="prefill tokens (default: 4096)")
    parser.add_argument("--vocab", type=int, default=10_000,
                        help="LM vocabulary if the WikiText-2 data is not found (default: 10000)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--rounds", type=int, default=9,
                        help="timed rounds at one token (half as many at the prefill; default: 9)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if min(args.size + [args.tokens, args.vocab, args.threads, args.rounds]) < 1:
        parser.error("--size, --tokens, --vocab, --threads and --rounds must be >= 1")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"moe_lab compressed-layer bench: float32 inputs, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.machine()}; medians of interleaved rounds; "
          f"load average before: {load:.2f} on {os.cpu_count()} CPUs")
    start = time.perf_counter()
    vocab, source = wikitext_vocab(args.vocab)
    sizes = [1, args.tokens]
    results = {"size": args.size, "vocab": vocab, "vocab_source": source,
               "linears": bench_linears(*args.size, sizes, args.rounds),
               "kernels": bench_kernels(*args.size, sizes, args.rounds),
               "moe": bench_moe(sizes, args.rounds),
               "lm": bench_lm(args.tokens, vocab, args.rounds)}
    targets = report(results)
    after = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average after: {after:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": vars(args) | {"json": str(args.json)}, "torch": torch.__version__,
                   "load_average_before": load, "load_average_after": after, **results, "targets": targets}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
