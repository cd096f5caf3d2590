"""Every notebook is committed clean and follows the course's shape."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def test_there_are_notebooks_and_their_numbers_are_unique():
    assert NOTEBOOKS, "no notebooks found"
    numbers = [p.name[:3] for p in NOTEBOOKS]
    assert all(re.fullmatch(r"\d\d_", n) for n in numbers), numbers
    assert len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_well_formed(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec") == KERNELSPEC
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    for cell in code:
        assert cell.get("outputs") == [], f"{path.name} has stored outputs"
        assert cell.get("execution_count") is None, f"{path.name} has execution counts"
    assert cells[0]["cell_type"] == "markdown" and "Learning goals" in "".join(cells[0]["source"])
    sources = ["".join(c["source"]) for c in code]
    assert any("moe_lab" in s for s in sources), f"{path.name} does not use moe_lab"
    solutions = [c for c in code if "solution" in c["metadata"].get("tags", [])]
    assert solutions, f"{path.name} has no exercise solution cell"
    assert all(c["metadata"].get("jupyter", {}).get("source_hidden") for c in solutions)
    assert "assert " in sources[-1], f"{path.name} does not end with assert cells"
