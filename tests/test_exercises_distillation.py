import torch
import torch.nn.functional as F

from moe_lab.compress.distill import distillation_loss
from moe_lab.exercises.distillation import check_distillation_loss


def right(student, teacher, targets, temperature, alpha):
    p_teacher = F.softmax(teacher / temperature, dim=1)
    log_p_student = F.log_softmax(student / temperature, dim=1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(1).mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(student, targets)


def test_accepts_reference_and_own_solution(capsys):
    assert check_distillation_loss(distillation_loss)
    assert check_distillation_loss(right)
    assert "Correct" in capsys.readouterr().out


def test_hint_on_none(capsys):
    assert check_distillation_loss(None) is False
    assert "Hint" in capsys.readouterr().out


def test_rejects_wrong_answers(capsys):
    def no_t_squared(s, t, y, T, a):
        return right(s, t, y, T, a) - a * (T ** 2 - 1) * right(s, t, y, T, 1.0) / T ** 2

    def deck_labels_ignored(s, t, y, T, a):
        return right(s, t, y, T, 1.0)

    def alpha_swapped(s, t, y, T, a):
        return right(s, t, y, T, 1 - a)

    def kl_mean_over_classes(s, t, y, T, a):
        kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="sum") / s.numel() * T ** 2
        return a * kl + (1 - a) * F.cross_entropy(s, y)

    def reversed_kl(s, t, y, T, a):
        return right(t, s, y, T, a) - (1 - a) * (F.cross_entropy(t, y) - F.cross_entropy(s, y))

    def teacher_not_softened(s, t, y, T, a):
        return right(s, t * T, y, T, a)

    def raises(s, t, y, T, a):
        raise RuntimeError("boom")

    for wrong in (no_t_squared, deck_labels_ignored, alpha_swapped, kl_mean_over_classes, reversed_kl,
                  teacher_not_softened, raises, lambda *args: torch.tensor(0.0)):
        assert check_distillation_loss(wrong) is False, wrong
    assert check_distillation_loss("loss") is False
    out = capsys.readouterr().out
    assert "expected" in out and "raised" in out and "Expected a function" in out


def test_hint_for_the_unedited_starter(capsys):
    def starter(student_logits, teacher_logits, targets, temperature, alpha):
        return None

    assert check_distillation_loss(starter) is False
    assert "Hint" in capsys.readouterr().out
