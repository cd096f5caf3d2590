import torch

from moe_lab.compress import quantize_tensor
from moe_lab.exercises.quantization import check_int8_per_channel


def float32_scales(weight):
    scales = weight.abs().amax(dim=1, keepdim=True) / 127  # (out, 1)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    return torch.round(weight / safe).clamp(-127, 127).to(torch.int8), scales


def test_accepts_reference_and_own_solutions(capsys):
    assert check_int8_per_channel(lambda w: quantize_tensor(w, bits=8))
    assert check_int8_per_channel(float32_scales)
    assert check_int8_per_channel(lambda w: (float32_scales(w)[0], float32_scales(w)[1].squeeze(1)))
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_int8_per_channel(None) is False
    assert "Hint" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def per_tensor(w):
        s = w.abs().max() / 127
        return torch.round(w / s).to(torch.int8), s.expand(w.shape[0])

    def truncates(w):
        v, s = float32_scales(w)
        return (w / torch.where(s == 0, torch.ones_like(s), s)).to(torch.int8), s

    def q_max_128(w):
        s = w.abs().amax(dim=1, keepdim=True) / 128
        safe = torch.where(s == 0, torch.ones_like(s), s)
        return torch.round(w / safe).clamp(-128, 127).to(torch.int8), s

    def per_column(w):
        s = w.abs().amax(dim=0, keepdim=True) / 127
        return torch.round(w / s).to(torch.int8), s

    def float_values(w):
        v, s = float32_scales(w)
        return v.float(), s

    def raises(w):
        raise RuntimeError("boom")

    for wrong in (per_tensor, truncates, q_max_128, per_column, float_values, raises,
                  lambda w: None, lambda w: float32_scales(w)[0]):
        assert check_int8_per_channel(wrong) is False, wrong
    assert check_int8_per_channel(42) is False
    out = capsys.readouterr().out
    assert "raised" in out and "truncates" in out and "one scale per output row" in out
