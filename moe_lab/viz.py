"""Pictures drawn from live models: architecture graphs, parameter breakdowns, routing heatmaps.

The deck's ``visualize_moe_architecture`` draws the same hard-coded picture whatever model
you have. Here :func:`architecture_graph` walks a real model instance and returns a
``networkx.DiGraph`` whose nodes are the model's modules (with their type, per-token shapes
and parameter counts) and whose edges follow the data: each expert's output is multiplied
by its gate (a ``"gate"`` edge from the router) before the weighted sum.

Node attributes: ``kind``, ``module_type``, ``path`` (module name in ``named_modules``, or
the op's place), ``in_shape``, ``out_shape`` (per token, tuples; symbolic dims as strings),
``params`` (parameters owned by that node; tied weights counted once), ``group`` (for
:func:`param_breakdown`), ``label`` and ``layer`` (column in the drawing).
Edge attribute ``role``: ``"data"``, ``"gate"`` (gate multiplies an expert's output),
``"routed"`` (only the tokens routed to that expert flow) or ``"residual"``.

matplotlib and networkx are imported when a function needs them, not on import.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_lab.layers.base import MixtureLayer
from moe_lab.layers.dense import DenseMoE, SharedTrunkMoE
from moe_lab.layers.topk import TopKMoE
from moe_lab.models import ImageClassifierMoE, LanguageModelMoE

MOE_LAYERS = (DenseMoE, SharedTrunkMoE, TopKMoE)
SUPPORTED = MOE_LAYERS + (ImageClassifierMoE, LanguageModelMoE)

_COLORS = {"input": "#e0e0e0", "output": "#e0e0e0", "expert": "#9ecae1", "router": "#fdae6b",
           "topk": "#fdd0a2", "scale": "#fee6ce", "sum": "#f0f0f0", "projection": "#a1d99b",
           "shared": "#c7e9c0", "moe": "#9ecae1", "features": "#dadaeb", "classifier": "#a1d99b",
           "embedding": "#dadaeb", "attention": "#bcbddc", "norm": "#f0f0f0", "add": "#f0f0f0",
           "activation": "#f0f0f0"}
_EDGE_STYLE = {"data": ("#555555", "solid"), "gate": ("#e6550d", "dashed"),
               "routed": ("#3182bd", "dotted"), "residual": ("#999999", "dashdot")}
_EDGE_LEGEND = {"data": "data", "gate": "gate (multiplies the expert output)",
                "routed": "routed tokens only", "residual": "residual"}


def _own(module: nn.Module, seen: set[int]) -> int:
    """Parameters of ``module`` not already counted in ``seen`` (tied weights count once)."""
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


class _Builder:
    def __init__(self):
        import networkx as nx

        self.graph = nx.DiGraph()
        self.seen: set[int] = set()

    def node(self, name: str, kind: str, label: str, *, module: nn.Module | None = None,
             in_shape: tuple = (), out_shape: tuple = (), group: str | None = None,
             path: str = "", **extra) -> str:
        params = _own(module, self.seen) if module is not None else 0
        module_type = type(module).__name__ if module is not None else "op"
        text = label + (f"\n{params:,} params" if params else "")
        self.graph.add_node(name, kind=kind, module_type=module_type, path=path or name,
                            in_shape=tuple(in_shape), out_shape=tuple(out_shape), params=params,
                            group=group if params else None, label=text, **extra)
        return name

    def edge(self, src: str, dst: str, role: str = "data") -> None:
        self.graph.add_edge(src, dst, role=role)

    def moe(self, layer: nn.Module, prefix: str, source: str, expand: bool) -> str:
        """Add ``layer`` fed by ``source``; return the node holding its output."""
        cfg = layer.config
        E, d, h, o = cfg["num_experts"], cfg["input_size"], cfg["expert_size"], cfg["output_size"]
        p = prefix + "." if prefix else ""
        if not expand:
            kind_name = type(layer).__name__
            extra = f", top-{layer.k}" if isinstance(layer, TopKMoE) else ""
            name = self.node(prefix or "moe", "moe", f"{kind_name}\n{E} experts{extra}",
                             module=layer, in_shape=(d,), out_shape=(o,), group="MoE layers",
                             path=prefix)
            self.edge(source, name)
            return name
        act = f" + {cfg['activation']}" if cfg.get("activation") else ""
        top = isinstance(layer, TopKMoE)
        router = self.node(p + "gating", "router",
                           f"router\nLinear {d}→{E}" + ("" if top else " + softmax"),
                           module=layer.gating, in_shape=(d,), out_shape=(E,), group="router")
        self.edge(source, router)
        gate_source, expert_role = router, "data"
        if top:
            if cfg["noisy_gating"]:
                noise = self.node(p + "noise_gating", "router", f"noise scale\nLinear {d}→{E}",
                                  module=layer.noise_gating, in_shape=(d,), out_shape=(E,),
                                  group="router")
                self.edge(source, noise)
                self.edge(noise, router)
            cap = cfg["capacity_factor"]
            text = f"top-{layer.k} of {E}\n{cfg['routing']}" + (f"\ncapacity x{cap}" if cap else "")
            gate_source = self.node(p + "topk", "topk", text, in_shape=(E,), out_shape=(layer.k,))
            self.edge(router, gate_source)
            expert_role = "routed"
        expert_in, experts = source, layer.expert_modules()
        expert_path = layer.EXPERTS
        width = d
        if isinstance(layer, SharedTrunkMoE):
            width = cfg["shared_size"]
            expert_in = self.node(p + "shared_layer", "shared", f"shared trunk\nLinear {d}→{width}",
                                  module=layer.shared_layer, in_shape=(d,), out_shape=(width,),
                                  group="shared trunk")
            self.edge(source, expert_in)
        scales = []
        for i, expert in enumerate(experts):
            name = self.node(f"{p}{expert_path}.{i}", "expert", f"expert {i}\nLinear {width}→{h}{act}",
                             module=expert, in_shape=(width,), out_shape=(h,), group="experts",
                             expert=i)
            self.edge(expert_in, name, expert_role)
            scale = self.node(f"{p}scale.{i}", "scale", f"× g{i}", in_shape=(h,), out_shape=(h,),
                              expert=i)
            self.edge(name, scale)
            self.edge(gate_source, scale, "gate")
            scales.append(scale)
        total = self.node(p + "mix", "sum", f"Σ over {E} experts", in_shape=(E, h), out_shape=(h,))
        for scale in scales:
            self.edge(scale, total)
        out = self.node(p + "output", "projection", f"output projection\nLinear {h}→{o}",
                        module=layer.output, in_shape=(h,), out_shape=(o,), group="output projection")
        self.edge(total, out)
        return out


def _check_graph_arg(graph_or_model):
    import networkx as nx

    if isinstance(graph_or_model, nx.DiGraph):
        return graph_or_model
    if isinstance(graph_or_model, nn.Module):
        return architecture_graph(graph_or_model)
    raise TypeError(f"graph_or_model must be a networkx.DiGraph or an nn.Module, "
                    f"got {type(graph_or_model).__name__}")


def architecture_graph(model: nn.Module, *, expand_moe: bool = True):
    """Data-flow graph of a live ``model`` as a ``networkx.DiGraph`` (see the module docstring).

    Supports :class:`~moe_lab.DenseMoE`, :class:`~moe_lab.TopKMoE`, :class:`~moe_lab.SharedTrunkMoE`
    and the models :class:`~moe_lab.ImageClassifierMoE` and :class:`~moe_lab.LanguageModelMoE`.
    With ``expand_moe=True`` every mixture layer shows its router, each expert, the gate
    multiplications and the sum; with ``False`` each mixture layer is one node.
    A :class:`~moe_lab.DenseMoE` with ``E`` experts gives ``2E + 5`` nodes. The ``params``
    attributes sum to :func:`moe_lab.param_count` of the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(model, SUPPORTED):
        names = ", ".join(cls.__name__ for cls in SUPPORTED)
        raise TypeError(f"model must be one of {names}; got {type(model).__name__}")
    if not isinstance(expand_moe, bool):
        raise TypeError(f"expand_moe must be a bool, got {type(expand_moe).__name__}")
    b = _Builder()
    if isinstance(model, MOE_LAYERS):
        d, o = model.config["input_size"], model.config["output_size"]
        src = b.node("input", "input", f"input x\n{_fmt((d,))} per token", out_shape=(d,))
        last = b.moe(model, "", src, expand_moe)
        b.edge(last, b.node("result", "output", f"output\n{_fmt((o,))} per token", in_shape=(o,)))
    elif isinstance(model, ImageClassifierMoE):
        cfg = model.config
        feat = cfg["channels"][-1] * cfg["pool_size"] ** 2
        src = b.node("input", "input", "images\n(3, H, W)", out_shape=(3, "H", "W"))
        blocks = len(cfg["channels"])
        f = b.node("features", "features", f"conv features\n{blocks} blocks → pool → flatten {feat}",
                   module=model.features, in_shape=(3, "H", "W"), out_shape=(feat,), group="features")
        b.edge(src, f)
        last = b.moe(model.moe, "moe", f, expand_moe)
        hidden = cfg["hidden_size"]
        act = b.node("relu_dropout", "activation", "ReLU, dropout", in_shape=(hidden,),
                     out_shape=(hidden,))
        b.edge(last, act)
        n = cfg["num_classes"]
        c = b.node("classifier", "classifier", f"classifier\nLinear {hidden}→{n}",
                   module=model.classifier, in_shape=(hidden,), out_shape=(n,), group="classifier")
        b.edge(act, c)
        b.edge(c, b.node("result", "output", f"logits\n({n},)", in_shape=(n,)))
    else:
        cfg = model.config
        V, D = cfg["vocab_size"], cfg["embedding_dim"]
        src = b.node("input", "input", "token ids\n(T,)", out_shape=("T",))
        tok = b.node("embedding", "embedding", f"token embedding\n{V}×{D}", module=model.embedding,
                     in_shape=("T",), out_shape=("T", D), group="embeddings")
        pos = b.node("position", "embedding", f"position embedding\n{cfg['context_size']}×{D}",
                     module=model.position, in_shape=("T",), out_shape=("T", D), group="embeddings")
        b.edge(src, tok)
        b.edge(src, pos)
        x = b.node("embed_add", "add", "+", in_shape=("T", D), out_shape=("T", D))
        b.edge(tok, x)
        b.edge(pos, x)
        for i, block in enumerate(model.blocks):
            p = f"blocks.{i}"
            ln1 = b.node(f"{p}.ln_attn", "norm", "LayerNorm", module=block.ln_attn,
                         in_shape=(D,), out_shape=(D,), group="norms")
            att = b.node(f"{p}.attn", "attention", f"attention {i}\n{cfg['num_heads']} heads, causal",
                         module=block.attn, in_shape=("T", D), out_shape=("T", D), group="attention")
            add1 = b.node(f"{p}.add_attn", "add", "+", in_shape=("T", D), out_shape=("T", D))
            b.edge(x, ln1)
            b.edge(ln1, att)
            b.edge(att, add1)
            b.edge(x, add1, "residual")
            ln2 = b.node(f"{p}.ln_moe", "norm", "LayerNorm", module=block.ln_moe,
                         in_shape=(D,), out_shape=(D,), group="norms")
            b.edge(add1, ln2)
            last = b.moe(block.moe, f"{p}.moe", ln2, expand_moe)
            x = b.node(f"{p}.add_moe", "add", "+", in_shape=("T", D), out_shape=("T", D))
            b.edge(last, x)
            b.edge(add1, x, "residual")
        norm = b.node("norm", "norm", "LayerNorm", module=model.norm, in_shape=(D,), out_shape=(D,),
                      group="norms")
        b.edge(x, norm)
        tied = model.output.weight is model.embedding.weight
        head = b.node("output", "classifier", "LM head" + (" (tied)" if tied else "") + f"\nLinear {D}→{V}",
                      module=model.output, in_shape=(D,), out_shape=(V,), group="LM head", tied=tied)
        b.edge(norm, head)
        b.edge(head, b.node("result", "output", f"logits\n(T, {V})", in_shape=("T", V)))
    _assign_layers(b.graph)
    return b.graph


def _assign_layers(graph) -> None:
    """Column of each node: length of the longest path from a source (residuals ignored)."""
    import networkx as nx

    for node in nx.topological_sort(graph):
        preds = [u for u in graph.predecessors(node) if graph.edges[u, node]["role"] != "residual"]
        graph.nodes[node]["layer"] = max((graph.nodes[u]["layer"] + 1 for u in preds), default=0)


def param_breakdown(graph_or_model) -> dict[str, int]:
    """Parameters per component group (``"experts"``, ``"router"``, ...), largest first.

    Takes a graph from :func:`architecture_graph` or a supported model. The values sum to
    :func:`moe_lab.param_count` of the model.
    """
    graph = _check_graph_arg(graph_or_model)
    totals: dict[str, int] = {}
    for _, attrs in graph.nodes(data=True):
        if attrs.get("params"):
            totals[attrs["group"]] = totals.get(attrs["group"], 0) + attrs["params"]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def draw_architecture(graph_or_model, ax=None, *, title: str | None = None, fontsize: float = 7.5):
    """Draw an architecture graph left to right on ``ax`` (a new figure if ``None``); return ``ax``.

    Boxes are coloured by kind and show the module, its shapes and its parameter count
    (``fontsize`` sets their text). Edge styles: solid data flow, dashed orange gate (the gate
    multiplies that expert's output), dotted blue routed (only the tokens routed there),
    dash-dot residual.
    """
    import matplotlib.pyplot as plt
    import networkx as nx
    from matplotlib.lines import Line2D

    graph = _check_graph_arg(graph_or_model)
    if graph.number_of_nodes() == 0:
        raise ValueError("graph_or_model: the graph has no nodes")
    if any("layer" not in attrs for _, attrs in graph.nodes(data=True)):
        _assign_layers(graph)
    columns: dict[int, list] = {}
    for node, attrs in graph.nodes(data=True):
        columns.setdefault(attrs["layer"], []).append(node)
    tallest = max(len(nodes) for nodes in columns.values())
    pos = {}
    for x, nodes in columns.items():
        for j, node in enumerate(nodes):
            pos[node] = (x * 2.2, (len(nodes) - 1) / 2 - j)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 2.1 * len(columns)), max(3.0, 1.1 * tallest + 1)))
    for node, attrs in graph.nodes(data=True):  # a lone router / top-k box sits on the top row
        if attrs["kind"] in ("router", "topk") and len(columns[attrs["layer"]]) == 1:
            pos[node] = (pos[node][0], (tallest - 1) / 2)
    for role, (color, style) in _EDGE_STYLE.items():
        edges = [(u, v) for u, v, r in graph.edges(data="role") if r == role]
        if edges:
            bend = -0.35 if role == "residual" else 0.0
            nx.draw_networkx_edges(graph, pos, edgelist=edges, ax=ax, edge_color=color, style=style,
                                   arrows=True, arrowstyle="-|>", arrowsize=12, node_size=2600,
                                   connectionstyle=f"arc3,rad={bend}")
    for node, attrs in graph.nodes(data=True):
        ax.text(*pos[node], attrs["label"], ha="center", va="center", fontsize=fontsize, zorder=3,
                bbox=dict(boxstyle="round,pad=0.3", fc=_COLORS.get(attrs["kind"], "white"), ec="#444444"))
    used = {role for _, _, role in graph.edges(data="role")}
    handles = [Line2D([], [], color=c, linestyle=s, label=_EDGE_LEGEND[r])
               for r, (c, s) in _EDGE_STYLE.items() if r in used]
    ax.legend(handles=handles, loc="lower right", fontsize=7, title="edge", title_fontsize=7)
    total = sum(attrs["params"] for _, attrs in graph.nodes(data=True))
    ax.set_title(title or f"Architecture from the live model ({total:,} parameters)")
    ys = [y for _, y in pos.values()]
    xs = [x for x, _ in pos.values()]
    ax.set_xlim(min(xs) - 1.2, max(xs) + 1.2)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.axis("off")
    return ax


def _groups_tensor(groups, n: int) -> torch.Tensor:
    groups = torch.as_tensor(groups)
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise TypeError(f"groups must hold integer group ids, got dtype {groups.dtype}")
    groups = groups.reshape(-1).long()
    if groups.numel() != n:
        raise ValueError(f"groups must have one id per token ({n}), got {groups.numel()}")
    if n and groups.min() < 0:
        raise ValueError("groups must be non-negative ids")
    return groups


@torch.no_grad()
def routing_matrix(layer: nn.Module, x: torch.Tensor, groups, num_groups: int | None = None
                   ) -> torch.Tensor:
    """Share of each group's routing that goes to each expert: a ``(G, E)`` float tensor.

    ``x`` is ``(..., d)`` (``n`` tokens once flattened) and ``groups`` holds ``n`` integer ids
    in ``[0, G)`` (e.g. the synthetic task's cluster ids). For a dense layer
    (:class:`~moe_lab.DenseMoE`, :class:`~moe_lab.SharedTrunkMoE`) a row is the group's mean
    gate probabilities; for :class:`~moe_lab.TopKMoE` it is the fraction of the group's
    ``n_g * k`` routing slots that chose each expert. Each row sums to one. An
    :class:`~moe_lab.ImageClassifierMoE` is accepted too (its ``moe`` layer on ``embed(x)``).
    Runs in eval mode (no routing noise) and restores the previous mode.
    """
    if isinstance(layer, ImageClassifierMoE):
        was = layer.training
        layer.eval()
        x = layer.embed(x)
        layer.train(was)
        layer = layer.moe
    if not isinstance(layer, MixtureLayer):
        raise TypeError(f"layer must be a mixture layer or an ImageClassifierMoE, "
                        f"got {type(layer).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    n = x[..., 0].numel() if x.dim() else 0
    groups = _groups_tensor(groups, n)
    if n == 0:
        raise ValueError("x must hold at least one token")
    size = int(groups.max()) + 1
    if num_groups is not None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < size:
            raise ValueError(f"num_groups must be an int >= the largest group id + 1 ({size}), "
                             f"got {num_groups!r}")
        size = num_groups
    was = layer.training
    layer.eval()
    try:
        E = layer.num_experts
        routing = layer.route(x)
        if layer.DENSE:
            weights = routing.probs.float()
        else:
            weights = torch.zeros(n, E, device=x.device).scatter_add_(
                1, routing.indices, torch.ones_like(routing.gates, dtype=torch.float32)) / layer.k
    finally:
        layer.train(was)
    groups = groups.to(weights.device)
    sums = torch.zeros(size, E, device=weights.device).index_add_(0, groups, weights)
    counts = torch.bincount(groups, minlength=size).float()
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"groups: no token has group id(s) {empty}; pass a smaller num_groups")
    return sums / counts.unsqueeze(1)


def routing_heatmap(matrix, row_labels=None, col_labels=None, ax=None, *,
                    title: str = "Routing: share of each group sent to each expert",
                    annotate: bool = True, xlabel: str = "expert", ylabel: str = "group"):
    """Draw a ``(G, E)`` routing matrix (e.g. from :func:`routing_matrix`) as a heatmap; return ``ax``.

    Cells are coloured on a fixed 0..1 scale so that two heatmaps compare at a glance;
    with ``annotate`` each cell prints its value.
    """
    import matplotlib.pyplot as plt

    values = torch.as_tensor(matrix, dtype=torch.float64)
    if values.dim() != 2 or 0 in values.shape:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    row_labels = [f"{ylabel} {i}" for i in range(rows)] if row_labels is None else list(row_labels)
    col_labels = [f"{xlabel} {j}" for j in range(cols)] if col_labels is None else list(col_labels)
    if len(row_labels) != rows:
        raise ValueError(f"row_labels must have {rows} entries, got {len(row_labels)}")
    if len(col_labels) != cols:
        raise ValueError(f"col_labels must have {cols} entries, got {len(col_labels)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.9 * cols, 0.9 + 0.6 * rows))
    image = ax.imshow(values.cpu().numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(cols), col_labels)
    ax.set_yticks(range(rows), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if annotate:
        for i in range(rows):
            for j in range(cols):
                v = float(values[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v > 0.6 else "black")
    return ax
