"""REAP expert scores against a per-token loop, pruning with them, and the router after pruning."""

import copy

import pytest
import torch
import torch.nn.functional as F

from moe_lab import DenseMoE, LanguageModelMoE, SwiGLUMoE, TopKMoE
from moe_lab.compress import EXPERT_SCORES, prune_experts, reap_scores, select_experts
from moe_lab.compress.recipes import normalize_recipe, parse_recipe


def slow_reap(layer, x):
    """Mean over each expert's routed tokens of gate * ||what it adds to the output||, token by token."""
    totals, counts = [0.0] * layer.num_experts, [0] * layer.num_experts
    with torch.no_grad():
        for token in x.double():
            logits = layer.router.double()(token)
            probs = torch.softmax(logits, 0)
            if layer.DENSE:
                chosen, gates = list(range(layer.num_experts)), probs
            else:
                order = sorted(range(layer.num_experts), key=lambda e: -float(logits[e]))[:layer.k]
                rule = layer.config.get("routing", "softmax_topk")
                if rule == "topk_softmax":
                    gates = torch.softmax(logits[order], 0)
                else:
                    gates = probs[order] / (probs[order].sum() if layer.config["normalize"] else 1)
                chosen = order
            for e, gate in zip(chosen, gates):
                expert = layer.expert_modules()[e].double()
                if isinstance(layer, SwiGLUMoE):
                    out = expert(token)
                else:  # the expert seen through the shared output projection (its bias cancels)
                    act = {"gelu": F.gelu, "relu": F.relu, None: lambda h: h}[layer.config["activation"]]
                    out = layer.output.weight.double() @ act(expert(token))
                totals[e] += float(gate * out.norm())
                counts[e] += 1
    return torch.tensor([t / c if c else 0.0 for t, c in zip(totals, counts)], dtype=torch.float64)


@pytest.mark.parametrize("make", [lambda: SwiGLUMoE(5, 12, 16, k=2, normalize=False),
                                  lambda: SwiGLUMoE(5, 12, 16, k=2, shared_expert_size=8),
                                  lambda: TopKMoE(5, 12, 16, 6, k=2, activation="gelu"),
                                  lambda: TopKMoE(5, 12, 16, 6, k=1, routing="softmax_topk", normalize=False),
                                  lambda: DenseMoE(4, 12, 16, 6, activation="relu")])
def test_reap_scores_match_a_per_token_loop(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(80, 12)
    reference = slow_reap(copy.deepcopy(layer), x)
    torch.testing.assert_close(reap_scores(layer, x), reference, rtol=1e-5, atol=1e-7)


def test_an_expert_no_token_reaches_scores_zero_and_goes_first():
    torch.manual_seed(0)
    layer = TopKMoE(4, 12, 16, 6, k=2)
    with torch.no_grad():
        layer.gating.bias[1] = -1e4
    x = torch.randn(60, 12)
    scores = reap_scores(layer, x)
    assert scores[1] == 0 and (scores[[0, 2, 3]] > 0).all()
    assert 1 not in select_experts(layer, x, 3, "reap")


def test_reap_prefers_large_outputs_over_frequent_use():
    torch.manual_seed(0)
    layer = SwiGLUMoE(4, 12, 16, k=1)
    x = torch.randn(400, 12)
    with torch.no_grad():
        busiest = int(layer.expert_load(x).counts.argmax())
        layer.experts[busiest].down_proj.weight.mul_(1e-3)  # used most, contributes almost nothing
    assert busiest in select_experts(layer, x, 3, "frequency")
    assert busiest not in select_experts(layer, x, 3, "reap")


def test_pruning_renormalises_the_router_over_the_kept_experts():
    torch.manual_seed(0)
    layer = TopKMoE(6, 12, 16, 6, k=2, routing="softmax_topk", normalize=False)  # raw softmax gates
    x = torch.randn(50, 12)
    keep = select_experts(layer, x, 4, "reap")
    pruned = prune_experts(layer, keep)
    with torch.no_grad():
        probs = torch.softmax(layer.gating(x), -1)[:, keep]
        routing = pruned.route(x)
    torch.testing.assert_close(routing.probs, probs / probs.sum(-1, keepdim=True))
    expected, _ = torch.sort(probs / probs.sum(-1, keepdim=True), descending=True)
    torch.testing.assert_close(routing.gates, expected[:, :2])


def test_reap_stage_and_recipe_on_a_language_model():
    torch.manual_seed(0)
    model = LanguageModelMoE(40, num_experts=4, expert_size=16, embedding_dim=16, num_layers=2, num_heads=2,
                             context_size=10).eval()
    tokens = torch.randint(0, 40, (12, 10))
    (stage,), _ = parse_recipe("prune-experts=0.25:reap")
    assert stage.score == "reap" and "reap" in EXPERT_SCORES
    assert normalize_recipe("prune-experts=.5:reap") == "prune-experts=0.5:reap"
    pruned = stage.apply(copy.deepcopy(model), tokens)
    assert [block.moe.num_experts for block in pruned.blocks] == [3, 3]
    first = model.blocks[0].moe
    inputs = []
    handle = first.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    kept = select_experts(first, inputs[0].reshape(-1, 16), 3, "reap")
    assert torch.equal(pruned.blocks[0].moe.gating.weight, first.gating.weight[kept])
