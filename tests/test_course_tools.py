"""tools/course.py: the notebooks' cell conventions, student copies, the site builder and the timer."""

import re

import course
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = course.notebook_paths()


def _read(path):
    return nbformat.read(path, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


# ------------------------------------------------------------------------------------------ conventions

def test_there_are_fifteen_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 16)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_cells_meant_to_fail_carry_both_the_tag_and_the_nbval_comment(path):
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type == "code":
            marked, tagged = course.has_nbval_marker(cell.source), course.RAISES_TAG in course.tags(cell)
            assert marked == tagged, f"{path.name} cell {i}: the comment and the tag must go together"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_follows_the_course_conventions(path):
    assert course.problems(_read(path), path.name) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_solution_code_lives_only_in_solution_tagged_cells(path):
    def defines_a_solution(cell):
        return any(n.startswith("solution") for n in course._top_level_names(cell.source))

    code = _code(_read(path))
    tagged = [c for c in code if course.SOLUTION_TAG in course.tags(c)]
    assert tagged and all(defines_a_solution(c) for c in tagged)
    assert not any(defines_a_solution(c) for c in code if c not in tagged)


def _convention_notebook():
    nb = new_notebook()
    nb.cells = [new_markdown_cell("# 01 · Tiny\n\n**Learning goals**\n- Plot a line\n  over three points.\n"
                                  "- Fail on purpose.\n\nMore text."),
                new_code_cell("# State used below: x, plt (this cell).\nimport matplotlib.pyplot as plt\n"
                              "x = [1, 2, 3]", metadata={"tags": ["setup"]}),
                new_code_cell("# NBVAL_RAISES_EXCEPTION\n1 / 0", metadata={"tags": ["raises-exception"]}),
                new_code_cell("fig, ax = plt.subplots(figsize=(2, 2))\nax.plot(x);"),
                new_code_cell("def solution_f():\n    return len(x)", metadata={"tags": ["solution"]}),
                new_code_cell("assert solution_f() == 3")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_problems_accepts_a_notebook_that_follows_the_conventions():
    assert course.problems(_convention_notebook()) == []


@pytest.mark.parametrize("breakage, message", [
    (lambda nb: nb.cells[2].metadata.pop("tags"), "without the 'raises-exception' tag"),
    (lambda nb: setattr(nb.cells[2], "source", "1 / 0"), "tag without the '# NBVAL_RAISES_EXCEPTION'"),
    (lambda nb: nb.cells[1].metadata.pop("tags"), "must carry the 'setup' tag"),
    (lambda nb: nb.cells[3].metadata.update(tags=["setup"]), "must carry the 'setup' tag"),
    (lambda nb: setattr(nb.cells[1], "source", "x = 1"), "no '# State used below: ...' comment"),
    (lambda nb: setattr(nb.cells[1], "source", "# State used below: x, y.\nx = 1\nplt = 2"),
     "'y', which no cell"),
    (lambda nb: setattr(nb.cells[1], "source", "# State used below: x, z.\nx = 1\nz = 2\nplt = 3"),
     "'z', which no later cell uses"),
    (lambda nb: nb.cells[4].metadata.pop("tags"), "no cell carries the 'solution' tag"),
    (lambda nb: nb.cells[0].metadata.update(tags=["solution"]), "code cells only"),
])
def test_problems_reports_each_broken_convention(breakage, message):
    nb = _convention_notebook()
    breakage(nb)
    found = course.problems(nb)
    assert any(message in p for p in found), found


def test_state_names_reads_continuation_lines_and_ignores_notes():
    source = ("# State used below: profile (this cell); task, run() (section 2);\n"
              "#   histories (section 5).\nx = 1")
    assert course.state_names(source) == ["profile", "task", "run", "histories"]


def test_check_command_passes_on_the_committed_notebooks(capsys):
    assert course.main(["check"]) == 0
    assert "follow the conventions" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ student copies

def test_student_notebook_drops_solutions_and_the_statements_that_need_them():
    nb = new_notebook()
    nb.cells = [new_code_cell("import math\ndef check_f(f):\n    return f is not None"),
                new_code_cell("def my_f():\n    return None\n\ncheck_f(my_f)"),
                new_code_cell("def solution_f():\n    return 3", metadata={"tags": ["solution"]}),
                new_code_cell("assert check_f(solution_f)"),
                new_code_cell("a = 1\n# keep this note\nb = solution_f()\nc = b + 1\n@staticmethod\n"
                              "def g():\n    return c\nd = a + 1"),
                new_markdown_cell("Text stays.")]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="old output")]
    nb.cells[1].execution_count = 3
    student, removed, trimmed = course.student_notebook(nb)
    assert removed == [2, 3]
    assert [c.source for c in student.cells] == [nb.cells[0].source, nb.cells[1].source,
                                                 "a = 1\n# keep this note\nd = a + 1", "Text stays."]
    assert trimmed[4] == ["b = solution_f()", "c = b + 1", "@staticmethod\ndef g():\n    return c"]
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert nb.cells[2].source.startswith("def solution_f")        # the original is left alone


@pytest.fixture(scope="module")
def student_copies(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    return {c.path.name: c for c in course.write_student_copies(out)}


def _calls_checker(source):
    return re.search(r"\bcheck_\w+\(", source) is not None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_student_copy_has_no_solution_and_keeps_every_exercise(path, student_copies):
    original, copy = _read(path), _read(student_copies[path.name].path)
    solution_names = set().union(*(course._top_level_names(c.source) for c in _code(original)
                                   if course.SOLUTION_TAG in course.tags(c)))
    assert solution_names
    assert not any(course.SOLUTION_TAG in course.tags(c) for c in copy.cells)
    assert not any(course._used_names(c.source) & solution_names for c in _code(copy))
    assert all(c.outputs == [] and c.execution_count is None for c in _code(copy))
    assert [c.source for c in original.cells if c.cell_type == "markdown"] == \
        [c.source for c in copy.cells if c.cell_type == "markdown"]
    checkers = [c.source for c in _code(original) if _calls_checker(c.source)
                and not course._used_names(c.source) & solution_names]
    copied = [c.source for c in _code(copy)]
    assert checkers and all(source in copied for source in checkers), "an exercise stub or checker was lost"
    assert course.problems(copy, path.name) == [f"{path.name}: no cell carries the 'solution' tag"]


def test_student_copy_runs_all(student_copies):
    """A student's Run All does not stop where the solutions were taken out (06 loses a whole cell)."""
    copy = student_copies["06_conditional_computation.ipynb"]
    assert len(copy.removed_cells) > 2
    nb, _ = course.execute(copy.path, "ci")
    assert not any(o.output_type == "error" for c in _code(nb) if course.RAISES_TAG not in course.tags(c)
                   for o in c.outputs)


def test_student_command_writes_every_notebook(tmp_path, capsys):
    assert course.main(["student", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    assert "removed cells" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ site and timing

@pytest.fixture
def tiny_course(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    first = _convention_notebook()
    goals = "# 02 · Second\n\n**Learning goals**\n\n1. Print a number.\n2. Twice.\n\nMore."
    second = new_notebook(cells=[new_markdown_cell(goals),
                                 new_code_cell("# State used below: n (this cell).\nn = 2",
                                               metadata={"tags": ["setup"]}),
                                 new_code_cell("print(n * 21)")])
    second.metadata["kernelspec"] = first.metadata["kernelspec"]
    nbformat.write(first, folder / "01_tiny.ipynb")
    nbformat.write(second, folder / "02_second.ipynb")
    guide = tmp_path / "README.md"
    guide.write_text("# Instructor guide\n\n| notebook | minutes |\n| --- | --- |\n"
                     "| [01](01_tiny.ipynb) | 1 |\n")
    return folder, guide


def test_site_pages_index_and_guide(tiny_course, tmp_path):
    folder, guide = tiny_course
    out = tmp_path / "site"
    paths = course.notebook_paths(folder=folder)
    pages = course.build_site(out, "ci", paths, guide=guide, log=lambda *a: None)
    assert [p.html_name for p in pages] == ["01_tiny.html", "02_second.html"]
    assert pages[0].title == "01 · Tiny"
    assert [p.goals for p in pages] == [["Plot a line over three points.", "Fail on purpose."],
                                        ["Print a number.", "Twice."]]
    assert [p.figures for p in pages] == [1, 0]
    first = (out / "01_tiny.html").read_text()
    assert course.page_assets(first) == (1, [])
    assert "ZeroDivisionError" in first                      # the expected failure is shown, not hidden
    assert re.search(r'<details class="course-solution">.*?solution_f', first, re.S)
    assert 'href="02_second.html"' in first and 'href="notebooks/01_tiny.ipynb"' in first
    assert "42" in (out / "02_second.html").read_text()
    index = (out / "index.html").read_text()
    assert "Plot a line over three points." in index and 'href="01_tiny.html"' in index
    assert course.page_assets(index)[1] == []
    assert 'href="01_tiny.html"' in (out / "instructor_guide.html").read_text()
    assert (out / "notebooks" / "01_tiny.ipynb").read_bytes() == (folder / "01_tiny.ipynb").read_bytes()
    assert "| `02_second.ipynb` |" in (out / "timings.md").read_text()
    assert all(c.outputs == [] for c in _code(_read(folder / "01_tiny.ipynb")))   # never executed in place


def test_run_all_stops_at_an_untagged_error_and_requires_tagged_cells_to_fail(tiny_course):
    folder, _ = tiny_course
    nb = _read(folder / "01_tiny.ipynb")
    nb.cells[2].metadata["tags"] = []
    nbformat.write(nb, folder / "03_untagged.ipynb")
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        course.execute(folder / "03_untagged.ipynb", "ci")
    nb.cells[2].metadata["tags"] = ["raises-exception"]
    nb.cells[2].source = "# NBVAL_RAISES_EXCEPTION\n1 / 1"
    nbformat.write(nb, folder / "04_silent.ipynb")
    with pytest.raises(course.NotebookFailed, match=r"cells \[2\] are tagged"):
        course.execute(folder / "04_silent.ipynb", "ci")


def test_kernel_sees_the_profile_and_the_inline_backend(tiny_course):
    folder, _ = tiny_course
    nb = new_notebook(cells=[new_code_cell("import os, matplotlib\n"
                                           "print(os.environ['MOE_LAB_PROFILE'], matplotlib.get_backend())")])
    nbformat.write(nb, folder / "05_env.ipynb")
    executed, seconds = course.execute(folder / "05_env.ipynb", "ci")
    profile, backend = executed.cells[0].outputs[0].text.split()
    assert profile == "ci" and "inline" in backend
    assert seconds > 0


def test_site_command_refuses_to_replace_a_folder_that_is_not_a_site(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        course.main(["site", "--profile", "ci", "--out", str(tmp_path), "01"])
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert "refusing" in capsys.readouterr().err


def test_timing_table_and_time_command(tiny_course, capsys):
    folder, _ = tiny_course
    rows = course.time_notebooks(course.notebook_paths(["02"], folder=folder), "ci", log=lambda *a: None)
    assert [name for name, _ in rows] == ["02_second.ipynb"] and rows[0][1] > 0
    table = course.timing_table([("a.ipynb", 90.0), ("b.ipynb", 30.0)], "ci")
    assert table.splitlines() == ["| notebook | seconds (ci) | minutes (ci) |", "| --- | ---: | ---: |",
                                  "| `a.ipynb` | 90 | 1.5 |", "| `b.ipynb` | 30 | 0.5 |",
                                  "| total | 120 | 2.0 |"]
    with pytest.raises(ValueError, match="names"):
        course.notebook_paths(["99"], folder=folder)
