"""Every notebook runs the way JupyterLab's Restart & Run All runs it, and the course site shows it.

Each notebook is executed from a copy with nbclient, without ``allow_errors``, in the profile that
``MOE_LAB_PROFILE`` names (``make test`` sets ``ci``): a failing cell stops it unless the cell carries the
``raises-exception`` tag, and every tagged cell must really fail. The executed copy becomes a page of the
course site (tools/course.py) in a temporary folder; the last test adds the index and the instructor guide
and checks the whole site. Under ``--dist loadfile`` the module runs in one worker, so each notebook
executes once.
"""

import html
import os
import re

import course
import nbformat
import pytest
from nbconvert.filters.markdown_mistune import markdown2html_mistune

NOTEBOOKS = course.notebook_paths()
PROFILE = os.environ.get("MOE_LAB_PROFILE", "ci")


class LazySite:
    """Pages of the course site, each built (executed and rendered) the first time it is asked for."""

    def __init__(self, out):
        self.out, self.pages = out, {}

    def page(self, path):
        if path not in self.pages:
            i = NOTEBOOKS.index(path)
            self.pages[path] = course.build_page(path, self.out, PROFILE, course.nav_links(NOTEBOOKS, i))
        return self.pages[path]


def _plain(markup):
    """The text of some HTML, entities decoded and whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", markup)).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return LazySite(tmp_path_factory.mktemp("site"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_runs_all_and_renders(path, site):
    committed = path.read_bytes()
    page = site.page(path)          # raises at the first unexpected error, or if a tagged cell did not fail
    assert path.read_bytes() == committed, "executing must never write outputs into the committed notebook"

    images, external = course.page_assets((site.out / page.html_name).read_text(encoding="utf-8"))
    assert images == page.figures, f"{path.name}: {page.figures} figures executed, {images} on the page"
    drawing_cells = course.figure_cells(nbformat.read(path, as_version=4))
    assert page.figures >= drawing_cells, f"{path.name}: {drawing_cells} cells draw, {page.figures} figures"
    assert external == [], f"{path.name}: the page loads {external} from the network"
    assert page.title.startswith(path.name[:2]) and page.goals, f"{path.name}: no title or learning goals"


def test_site_has_every_page_an_index_and_the_guide(site):
    pages = [site.page(path) for path in NOTEBOOKS]
    course.finish_site(site.out, pages, PROFILE)
    index = (site.out / "index.html").read_text(encoding="utf-8")
    links = set(re.findall(r'href="([^"#:]+)"', index))
    text = _plain(index)
    for page in pages:
        assert page.html_name in links and f"notebooks/{page.source.name}" in links, page.source.name
        assert _plain(page.title) in text, page.title
        for goal in page.goals:
            assert _plain(markdown2html_mistune(goal))[:60] in text, goal
    for link in links:
        assert (site.out / link).is_file(), f"index.html links to a missing {link}"
    guide = (site.out / "instructor_guide.html").read_text(encoding="utf-8")
    assert "Instructor guide" in guide and "<table" in guide
    for name in ["index.html", "instructor_guide.html"]:
        assert course.page_assets((site.out / name).read_text(encoding="utf-8"))[1] == []
