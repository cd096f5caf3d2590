"""moe_lab.viz: graphs from live models, parameter breakdowns, routing matrices and heatmaps."""

import matplotlib
import matplotlib.pyplot as plt
import networkx as nx
import pytest
import torch
import torch.nn as nn

from moe_lab import DenseMoE, ImageClassifierMoE, LanguageModelMoE, SharedTrunkMoE, TopKMoE, param_count
from moe_lab.viz import (
    architecture_graph,
    draw_architecture,
    param_breakdown,
    routing_heatmap,
    routing_matrix,
)

matplotlib.use("Agg")


def small_models():
    return [DenseMoE(4, 16, 32, 4), TopKMoE(5, 16, 32, 4, k=2), TopKMoE(3, 8, 8, 2, k=1, noisy_gating=True),
            SharedTrunkMoE(3, 16, 32, 4, 8), DenseMoE(2, 4, 4, 4, activation="relu"),
            ImageClassifierMoE(num_experts=3, expert_size=16, channels=(4,), hidden_size=8),
            ImageClassifierMoE(num_experts=4, expert_size=8, channels=(4,), hidden_size=8, moe="topk"),
            LanguageModelMoE(50, num_experts=2, expert_size=16, embedding_dim=16, num_heads=2, num_layers=2),
            LanguageModelMoE(50, num_experts=2, expert_size=16, embedding_dim=16, num_heads=2,
                             num_layers=1, tie_weights=False, moe="soft")]


@pytest.mark.parametrize("model", small_models(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("expand", [True, False])
def test_graph_params_sum_to_param_count(model, expand):
    graph = architecture_graph(model, expand_moe=expand)
    assert isinstance(graph, nx.DiGraph)
    assert nx.is_directed_acyclic_graph(graph)
    assert sum(a["params"] for _, a in graph.nodes(data=True)) == param_count(model)
    assert sum(param_breakdown(graph).values()) == param_count(model)
    if expand:
        assert param_breakdown(model) == param_breakdown(graph)
    sources = [n for n in graph if graph.in_degree(n) == 0]
    sinks = [n for n in graph if graph.out_degree(n) == 0]
    assert sources == ["input"] and sinks == ["result"]
    for _, attrs in graph.nodes(data=True):
        for key in ("kind", "module_type", "path", "in_shape", "out_shape", "params", "label", "layer"):
            assert key in attrs
        assert (attrs["group"] is None) == (attrs["params"] == 0)


@pytest.mark.parametrize("num_experts", [1, 2, 4, 7])
def test_soft_graph_follows_num_experts(num_experts):
    layer = DenseMoE(num_experts, 6, 5, 3)
    graph = architecture_graph(layer)
    assert graph.number_of_nodes() == 2 * num_experts + 5
    experts = [n for n, a in graph.nodes(data=True) if a["kind"] == "expert"]
    assert len(experts) == num_experts
    for i, name in enumerate(experts):
        attrs = graph.nodes[name]
        assert attrs["module_type"] == "Linear" and attrs["params"] == 6 * 5 + 5
        assert attrs["in_shape"] == (6,) and attrs["out_shape"] == (5,)
        scale = f"scale.{i}"
        # the expert's output is multiplied by its gate, which comes from the router
        assert graph.has_edge(name, scale) and graph.edges[name, scale]["role"] == "data"
        assert graph.edges["gating", scale]["role"] == "gate"
        assert graph.has_edge(scale, "mix")
    assert not graph.has_edge("gating", "output") and not graph.has_edge("gating", "result")
    assert graph.nodes["gating"]["out_shape"] == (num_experts,)
    assert graph.nodes["output"]["in_shape"] == (5,) and graph.nodes["output"]["out_shape"] == (3,)


def test_topk_graph_has_topk_node_and_routed_edges():
    layer = TopKMoE(6, 8, 4, 2, k=2, noisy_gating=True, capacity_factor=1.5)
    graph = architecture_graph(layer)
    assert graph.number_of_nodes() == 2 * 6 + 7  # + top-k node + noise node
    assert graph.nodes["topk"]["out_shape"] == (2,)
    assert graph.has_edge("gating", "topk") and graph.has_edge("noise_gating", "gating")
    roles = {graph.edges["input", f"experts.{i}"]["role"] for i in range(6)}
    assert roles == {"routed"}
    assert all(graph.edges["topk", f"scale.{i}"]["role"] == "gate" for i in range(6))
    assert "capacity" in graph.nodes["topk"]["label"]


def test_shared_trunk_graph():
    layer = SharedTrunkMoE(3, 16, 32, 4, 8)
    graph = architecture_graph(layer)
    assert graph.has_edge("input", "shared_layer")
    assert all(graph.has_edge("shared_layer", f"expert_layers.{i}") for i in range(3))
    assert graph.nodes["expert_layers.0"]["in_shape"] == (8,)
    assert param_breakdown(graph)["shared trunk"] == 16 * 8 + 8


def test_models_expand_their_moe_layers():
    image = ImageClassifierMoE(num_experts=3, expert_size=16, channels=(4,), hidden_size=8)
    graph = architecture_graph(image)
    assert graph.has_edge("features", "moe.gating")
    assert sum(a["kind"] == "expert" for _, a in graph.nodes(data=True)) == 3
    assert graph.nodes["features"]["out_shape"] == (4 * 2 * 2,)
    lm = LanguageModelMoE(50, num_experts=2, expert_size=16, embedding_dim=16, num_heads=2, num_layers=3)
    graph = architecture_graph(lm)
    assert sum(a["kind"] == "expert" for _, a in graph.nodes(data=True)) == 3 * 2
    assert graph.nodes["output"]["tied"] is True and graph.nodes["output"]["params"] == 0
    collapsed = architecture_graph(lm, expand_moe=False)
    assert sum(a["kind"] == "moe" for _, a in collapsed.nodes(data=True)) == 3
    residual = [e for e in collapsed.edges(data="role") if e[2] == "residual"]
    assert len(residual) == 2 * 3


def test_param_breakdown_experts_dominate_a_wide_layer():
    breakdown = param_breakdown(DenseMoE(8, 64, 256, 64))
    assert list(breakdown)[0] == "experts"
    assert breakdown["experts"] == 8 * (64 * 256 + 256)
    assert breakdown["router"] == 64 * 8 + 8


def test_graph_bad_inputs():
    with pytest.raises(TypeError, match="model"):
        architecture_graph("not a model")
    with pytest.raises(TypeError, match="model"):
        architecture_graph(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="expand_moe"):
        architecture_graph(DenseMoE(2, 3, 3, 3), expand_moe="yes")
    with pytest.raises(TypeError, match="graph_or_model"):
        param_breakdown(3)
    with pytest.raises(TypeError, match="graph_or_model"):
        draw_architecture([1, 2])
    with pytest.raises(ValueError, match="graph_or_model"):
        draw_architecture(nx.DiGraph())


@pytest.mark.parametrize("model", [DenseMoE(3, 8, 8, 2), TopKMoE(4, 8, 8, 2),
                                   LanguageModelMoE(30, num_experts=2, expert_size=8, embedding_dim=8,
                                                    num_heads=2, num_layers=1)],
                         ids=lambda m: type(m).__name__)
def test_draw_architecture(model):
    ax = draw_architecture(model)
    graph = architecture_graph(model)
    assert len(ax.texts) == graph.number_of_nodes()
    assert f"{param_count(model):,}" in ax.get_title()
    assert ax.get_legend() is not None
    fig, ax2 = plt.subplots()
    assert draw_architecture(graph, ax=ax2, title="mine") is ax2
    assert ax2.get_title() == "mine"
    plt.close("all")


def test_routing_matrix_dense_rows_are_mean_gates():
    layer = DenseMoE(3, 4, 5, 2)
    x = torch.randn(2, 10, 4)  # (batch, time, d): 20 tokens
    groups = torch.arange(20) % 4
    matrix = routing_matrix(layer, x, groups)
    assert matrix.shape == (4, 3)
    assert torch.allclose(matrix.sum(1), torch.ones(4), atol=1e-6)
    gates = layer.gate_probs(x).reshape(20, 3)
    assert torch.allclose(matrix[1], gates[groups == 1].mean(0), atol=1e-6)
    shared = SharedTrunkMoE(3, 4, 5, 2, 2)
    assert torch.allclose(routing_matrix(shared, x, groups).sum(1), torch.ones(4), atol=1e-6)


def test_routing_matrix_topk_counts_routed_slots():
    layer = TopKMoE(4, 4, 5, 2, k=2, noisy_gating=True)
    layer.train()
    x = torch.randn(30, 4)
    groups = torch.arange(30) % 3
    matrix = routing_matrix(layer, x, groups, num_groups=3)
    assert layer.training  # mode restored
    routing = layer.eval().route(x)
    counts = torch.zeros(4)
    for row in routing.indices[groups == 2]:
        counts[row] += 1
    assert torch.allclose(matrix[2], counts / counts.sum())
    assert torch.allclose(matrix.sum(1), torch.ones(3))
    assert ((matrix * 20).round() == matrix * 20).all()  # 10 tokens x 2 slots per group


def test_routing_matrix_image_model():
    model = ImageClassifierMoE(num_experts=3, expert_size=8, channels=(4,), hidden_size=8)
    images = torch.randn(6, 3, 8, 8)
    matrix = routing_matrix(model, images, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert matrix.shape == (2, 3)
    assert torch.allclose(matrix.sum(1), torch.ones(2), atol=1e-6)


def test_routing_matrix_bad_inputs():
    layer = DenseMoE(3, 4, 5, 2)
    x = torch.randn(6, 4)
    with pytest.raises(TypeError, match="layer"):
        routing_matrix(nn.Linear(4, 3), x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="x"):
        routing_matrix(layer, [[0.0] * 4], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        routing_matrix(layer, x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="groups"):
        routing_matrix(layer, x, torch.zeros(6))
    with pytest.raises(ValueError, match="groups"):
        routing_matrix(layer, x, torch.tensor([0, 0, 2, 2, 0, 0]))  # group 1 is empty
    with pytest.raises(ValueError, match="groups"):
        routing_matrix(layer, x, -torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="num_groups"):
        routing_matrix(layer, x, torch.tensor([0, 1, 2, 0, 1, 2]), num_groups=2)
    with pytest.raises(ValueError, match="x"):
        routing_matrix(layer, torch.randn(0, 4), torch.zeros(0, dtype=torch.long))


def test_routing_heatmap():
    matrix = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    ax = routing_heatmap(matrix, ["a", "b", "c"], ["e0", "e1"], title="t")
    assert ax.get_title() == "t"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert len(ax.texts) == 6 and ax.texts[0].get_text() == "0.90"
    ax = routing_heatmap(matrix.numpy(), annotate=False)
    assert len(ax.texts) == 0
    with pytest.raises(ValueError, match="row_labels"):
        routing_heatmap(matrix, ["a"], ["e0", "e1"])
    with pytest.raises(ValueError, match="col_labels"):
        routing_heatmap(matrix, None, ["e0"])
    with pytest.raises(ValueError, match="matrix"):
        routing_heatmap(torch.ones(3))
    plt.close("all")


def test_import_sets_no_global_state():
    import importlib

    import moe_lab.viz as viz

    state = torch.random.get_rng_state()
    importlib.reload(viz)
    assert torch.equal(state, torch.random.get_rng_state())
