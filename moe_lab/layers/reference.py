"""Slow, obviously-correct references: the deck's layers, written out as the slides do.

They exist to be compared against. Tests check :class:`moe_lab.DenseMoE` and
:class:`moe_lab.TopKMoE` against them on the same weights, and ``bench/dispatch.py`` times
the per-token loop. Do not use them for real work: :class:`DeckConditionalMoE` runs one
Python call per token and expert slot, and :class:`DeckMoE` only handles ``(batch, d)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DeckMoE(nn.Module):
    """Slide 1's dense mixture, as written (inputs must be ``(batch, input_size)``)."""

    def __init__(self, num_experts, input_size, expert_size, output_size):
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList([nn.Linear(input_size, expert_size) for _ in range(num_experts)])
        self.gating = nn.Linear(input_size, num_experts)
        self.output = nn.Linear(expert_size, output_size)

    def forward(self, x):
        expert_outputs = torch.stack([expert(x) for expert in self.experts], dim=1)
        gates = torch.softmax(self.gating(x), dim=-1)
        mixed = torch.sum(gates.unsqueeze(-1) * expert_outputs, dim=1)
        return self.output(mixed)


class DeckConditionalMoE(nn.Module):
    """Slides 6 and 8's top-k layer, as written: a Python loop over tokens for each slot."""

    def __init__(self, num_experts, input_size, expert_size, output_size, k=2):
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.experts = nn.ModuleList([nn.Linear(input_size, expert_size) for _ in range(num_experts)])
        self.gating = nn.Linear(input_size, num_experts)
        self.output = nn.Linear(expert_size, output_size)

    def forward(self, x):
        gates = self.gating(x)
        top_k_gates, top_k_indices = torch.topk(gates, self.k, dim=-1)
        top_k_gates = torch.softmax(top_k_gates, dim=-1)
        mixed = torch.zeros(x.size(0), self.experts[0].out_features, device=x.device)
        for i in range(self.k):
            expert_idx = top_k_indices[:, i]
            expert_output = torch.stack([self.experts[int(idx)](x[j]) for j, idx in enumerate(expert_idx)])
            mixed += top_k_gates[:, i].unsqueeze(-1) * expert_output
        return self.output(mixed)
