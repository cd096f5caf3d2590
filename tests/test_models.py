"""The two case-study models: shapes, causality, options and bad input."""

import pytest
import torch

from moe_lab import DenseMoE, ImageClassifierMoE, LanguageModelMoE, TopKMoE


def test_image_classifier_shapes_and_moe_kinds():
    for kind, cls in [("soft", DenseMoE), ("topk", TopKMoE)]:
        model = ImageClassifierMoE(num_classes=7, num_experts=3, expert_size=16, channels=(8, 16),
                                   pool_size=2, hidden_size=12, moe=kind, k=2)
        assert isinstance(model.moe, cls)
        assert model.moe.config["input_size"] == 16 * 2 * 2
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 7)
        assert model.embed(torch.randn(4, 3, 32, 32)).shape == (4, 64)


def test_image_classifier_rejects_bad_input():
    model = ImageClassifierMoE(channels=(8,), expert_size=8, hidden_size=8)
    with pytest.raises(ValueError, match=r"images must be \(batch, 3, H, W\)"):
        model(torch.randn(4, 32, 32, 3))
    with pytest.raises(ValueError, match="moe must be one of"):
        ImageClassifierMoE(moe="dense")
    with pytest.raises(ValueError, match="only apply to moe='topk'"):
        ImageClassifierMoE(moe="soft", moe_options={"capacity_factor": 1.0})
    with pytest.raises(ValueError, match="channels"):
        ImageClassifierMoE(channels=())


def test_language_model_is_causal():
    torch.manual_seed(0)
    model = LanguageModelMoE(60, num_experts=3, expert_size=16, embedding_dim=16, num_heads=2,
                             num_layers=2, context_size=12).eval()
    tokens = torch.randint(0, 60, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 60
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 12, 60)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_language_model_uses_context():
    torch.manual_seed(0)
    model = LanguageModelMoE(60, num_experts=2, expert_size=16, embedding_dim=16, num_heads=2).eval()
    tokens = torch.randint(0, 60, (1, 6))
    other = tokens.clone()
    other[0, 0] = (other[0, 0] + 1) % 60
    with torch.no_grad():  # the last position's prediction depends on the first token
        assert not torch.allclose(model(tokens)[0, -1], model(other)[0, -1])


def test_language_model_rejects_bad_tokens():
    model = LanguageModelMoE(60, num_experts=2, expert_size=16, embedding_dim=16, num_heads=2,
                             context_size=8)
    with pytest.raises(TypeError, match="int64"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than context_size"):
        model(torch.randint(0, 60, (1, 9)))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        LanguageModelMoE(60, embedding_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        LanguageModelMoE(0)
