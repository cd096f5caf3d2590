"""Course tooling: Run All execution, student copies, the rendered site and timings.

    python tools/course.py check                            # notebook conventions (tags, setup cell)
    python tools/course.py student [--out student]          # copies without solution cells
    python tools/course.py site [--profile default] [--out site] [NN ...]
    python tools/course.py time [--profile default] [--out FILE] [NN ...]

Conventions the notebooks follow (``check`` enforces them):

* a cell meant to fail carries the ``raises-exception`` tag (what Jupyter's Run All and nbclient honour) and
  the ``# NBVAL_RAISES_EXCEPTION`` comment (what nbval and a reader see), always both;
* a worked exercise answer carries the ``solution`` tag; the exercise stub and its checker call do not;
* the first code cell carries the ``setup`` tag and a ``# State used below: ...`` comment naming the variables
  that later cells rely on.

Notebooks are executed from copies, never in place, with nbclient and without ``allow_errors``, in a kernel
of the current Python environment started in ``notebooks/``, with matplotlib's inline backend: exactly what
Restart & Run All does in JupyterLab.
"""

from __future__ import annotations

import argparse
import ast
import copy
import html
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbconvert import HTMLExporter
from traitlets import default

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GUIDE = NOTEBOOKS / "README.md"
TEMPLATE_DIR = Path(__file__).resolve().parent / "site_template"

RAISES_TAG = "raises-exception"
NBVAL_MARKER = "NBVAL_RAISES_EXCEPTION"
SOLUTION_TAG = "solution"
SETUP_TAG = "setup"
STATE_PREFIX = "# State used below:"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
CELL_TIMEOUT = 600


def notebook_paths(names: list[str] | None = None, folder: Path = NOTEBOOKS) -> list[Path]:
    """The course notebooks in order; ``names`` selects by number ("08") or file name."""
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return paths
    chosen = [p for p in paths if any(p.name.startswith(n) or p.stem == n or p.name == n for n in names)]
    unknown = [n for n in names if not any(p.name.startswith(n) or p.stem == n or p.name == n for p in paths)]
    if unknown:
        raise ValueError(f"names: no notebook matches {unknown}")
    return chosen


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def has_nbval_marker(source: str) -> bool:
    return any(line.strip().lstrip("#").strip() == NBVAL_MARKER
               for line in source.splitlines() if line.strip().startswith("#"))


# ----------------------------------------------------------------------------------------- conventions

def _top_level_names(source: str) -> set[str]:
    """Names a cell binds in the notebook's namespace: assignments, loop and ``with`` targets, defs, classes
    and imports, outside function, class and comprehension scopes."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    bound: set[str] = set()

    def visit(node):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            for decorator in node.decorator_list:
                visit(decorator)
            return
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return bound


def _used_names(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def state_names(source: str) -> list[str]:
    """The names listed on the setup cell's ``# State used below:`` comment (one or more lines)."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(STATE_PREFIX):
            text = line[len(STATE_PREFIX):]
            for more in lines[i + 1:]:            # continuation lines: "#   more, names"
                if not re.match(r"#\s{2,}\S", more):
                    break
                text += " " + more.lstrip("#")
            text = re.sub(r"\([^)]*\)", " ", text)  # drop "(section 2)" notes
            return [w.rstrip("()") for w in re.findall(r"[A-Za-z_][A-Za-z_0-9]*(?:\(\))?", text)
                    if w not in {"and", "from", "in", "the", "cell", "this", "section", "sections"}]
    return []


def problems(nb, name: str = "notebook") -> list[str]:
    """Every way ``nb`` breaks the course's cell conventions (empty when it follows them)."""
    found = []
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for i, cell in code:
        marked, tagged = has_nbval_marker(cell.source), RAISES_TAG in tags(cell)
        if marked and not tagged:
            found.append(f"{name} cell {i}: '# {NBVAL_MARKER}' without the '{RAISES_TAG}' tag "
                         "(Run All stops there)")
        if tagged and not marked:
            found.append(f"{name} cell {i}: '{RAISES_TAG}' tag without the '# {NBVAL_MARKER}' comment")
        if SOLUTION_TAG in tags(cell) and RAISES_TAG in tags(cell):
            found.append(f"{name} cell {i}: a solution cell must not be expected to fail")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" and {SETUP_TAG, SOLUTION_TAG, RAISES_TAG} & set(tags(cell)):
            found.append(f"{name} cell {i}: course tags belong on code cells only")
    setup = [i for i, c in code if SETUP_TAG in tags(c)]
    if not code or setup != [code[0][0]]:
        found.append(f"{name}: exactly one cell, the first code cell, must carry the '{SETUP_TAG}' tag "
                     f"(found {setup})")
    else:
        source = code[0][1].source
        listed = state_names(source)
        if not listed:
            found.append(f"{name}: the setup cell has no '{STATE_PREFIX} ...' comment")
        bound = set().union(*(_top_level_names(c.source) for _, c in code))
        used_later = set().union(*(_used_names(c.source) for _, c in code[1:]))
        for n in listed:
            if n not in bound:
                found.append(f"{name}: the setup cell lists '{n}', which no cell defines")
            elif n not in used_later:
                found.append(f"{name}: the setup cell lists '{n}', which no later cell uses")
    if not any(SOLUTION_TAG in tags(c) for _, c in code):
        found.append(f"{name}: no cell carries the '{SOLUTION_TAG}' tag")
    return found


# ------------------------------------------------------------------------------------------- execution

class _CurrentEnvKernelSpecs(KernelSpecManager):
    """Every kernel name resolves to ipykernel in this interpreter (like nbval's --nbval-current-env)."""

    def get_kernel_spec(self, kernel_name):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="Python 3 (current environment)", language="python",
                          metadata={"supported_encryption": ["curve"]})


class _CurrentEnvKernelManager(AsyncKernelManager):
    """nbclient creates, owns and shuts down this kernel manager; it starts this interpreter's ipykernel."""

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self):
        return _CurrentEnvKernelSpecs(data_dir=self.data_dir)


class NotebookFailed(RuntimeError):
    """A notebook did not run like Restart & Run All should."""


def kernel_env(profile: str) -> dict[str, str]:
    """The kernel's environment: ours, with the profile set and no MPLBACKEND override (``make test`` sets
    Agg for the test process), so that ipykernel picks matplotlib's inline backend as in JupyterLab."""
    env = dict(os.environ, MOE_LAB_PROFILE=profile)
    env.pop("MPLBACKEND", None)
    return env


def execute(path: Path, profile: str, timeout: int = CELL_TIMEOUT):
    """Run a copy of the notebook at ``path`` top to bottom as Run All does; return (notebook, seconds).

    Raises ``nbclient.exceptions.CellExecutionError`` at the first failing cell that is not tagged
    ``raises-exception``, and ``NotebookFailed`` when a tagged cell did not fail.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                            kernel_manager_class=_CurrentEnvKernelManager,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute(env=kernel_env(profile))
    seconds = time.perf_counter() - start
    silent = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and RAISES_TAG in tags(c)
              and not any(o.output_type == "error" for o in c.outputs)]
    if silent:
        raise NotebookFailed(f"{path.name}: cells {silent} are tagged '{RAISES_TAG}' but did not fail")
    return nb, seconds


def image_count(nb) -> int:
    """PNG images among the outputs of an executed notebook."""
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {}))


FIGURE_CALL = re.compile(r"\b(?:plt\.subplots|plt\.figure|draw_architecture|routing_heatmap)\(")


def figure_cells(nb) -> int:
    """Code cells that draw a figure (each shows at least one image when executed)."""
    return sum(1 for c in nb.cells if c.cell_type == "code" and FIGURE_CALL.search(c.source))


class _Assets(HTMLParser):
    LOADING = {"script": "src", "img": "src", "link": "href", "iframe": "src", "embed": "src",
               "source": "src", "object": "data", "audio": "src", "video": "src"}

    def __init__(self):
        super().__init__()
        self.data_images, self.external = 0, []

    def handle_starttag(self, tag, attrs):
        url = dict(attrs).get(self.LOADING.get(tag, ""), "") or ""
        if tag == "img" and url.startswith("data:image/"):
            self.data_images += 1
        elif url and not url.startswith("data:") and re.match(r"^(?:[a-z]+:)?//", url):
            self.external.append(url)


def page_assets(page_html: str) -> tuple[int, list[str]]:
    """(images embedded as data URIs, URLs the page would load from the network when viewed)."""
    parser = _Assets()
    parser.feed(page_html)
    in_css = re.findall(r"(?:@import\s+|url\()\s*[\"']?((?:https?:)?//[^\"')\s]+)", page_html)
    external = parser.external + in_css
    return parser.data_images, external


# -------------------------------------------------------------------------------------- student copies

@dataclass
class StudentCopy:
    path: Path
    removed_cells: list[int] = field(default_factory=list)       # indices in the original notebook
    trimmed_cells: dict[int, list[str]] = field(default_factory=dict)   # index -> removed statements


def _solution_dependent_lines(source: str, removed: set[str]) -> tuple[list[tuple[int, int]], set[str]]:
    """Line ranges (0-based, end exclusive) of top-level statements that use a removed name."""
    tree = ast.parse(source)
    spans, newly = [], set()
    for stmt in tree.body:
        used = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        if used & (removed | newly):
            first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
            spans.append((first - 1, stmt.end_lineno))
            newly |= _top_level_names(ast.unparse(stmt))
    return spans, newly


def student_notebook(nb) -> tuple[object, list[int], dict[int, list[str]]]:
    """A copy of ``nb`` without solution cells, nor the statements that use what they define.

    The exercise stubs and their checker calls stay; outputs are cleared. Returns the copy, the original
    indices of removed cells and, per trimmed cell, the statements taken out of it.
    """
    nb = copy.deepcopy(nb)
    removed: set[str] = set()
    keep, removed_cells, trimmed = [], [], {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and SOLUTION_TAG in tags(cell):
            removed |= _top_level_names(cell.source)
            removed_cells.append(i)
            continue
        if cell.cell_type == "code":
            spans, newly = _solution_dependent_lines(cell.source, removed)
            if spans:
                removed |= newly
                lines = cell.source.splitlines()
                drop = {n for a, b in spans for n in range(a, b)}
                trimmed[i] = ["\n".join(lines[a:b]) for a, b in spans]
                rest = [line for n, line in enumerate(lines) if n not in drop]
                if not any(line.strip() and not line.strip().startswith("#") for line in rest):
                    removed_cells.append(i)
                    continue
                cell.source = "\n".join(rest).strip("\n")
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
        keep.append(cell)
    nb.cells = keep
    nb.metadata.pop("widgets", None)
    return nb, removed_cells, trimmed


def write_student_copies(out: Path, paths: list[Path] | None = None) -> list[StudentCopy]:
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths or notebook_paths():
        nb = nbformat.read(path, as_version=4)
        student, removed_cells, trimmed = student_notebook(nb)
        target = out / path.name
        nbformat.write(student, target)
        copies.append(StudentCopy(target, removed_cells, trimmed))
    return copies


# -------------------------------------------------------------------------------------------- the site

@dataclass
class Page:
    source: Path
    title: str
    goals: list[str]
    html_name: str
    figures: int
    seconds: float


def title_and_goals(nb) -> tuple[str, list[str]]:
    """The notebook's ``# title`` and the bullets under "Learning goals" in its first markdown cell."""
    first = next(c for c in nb.cells if c.cell_type == "markdown").source
    title = next((line[2:].strip() for line in first.splitlines() if line.startswith("# ")), "")
    goals: list[str] = []
    lines = first.splitlines()
    start = next((i for i, line in enumerate(lines) if "Learning goals" in line), None)
    if start is not None:
        for line in lines[start + 1:]:
            item = re.match(r"(?:[-*]|\d+\.)\s+(.*)", line)
            if item:
                goals.append(item.group(1).strip())
            elif goals and line.startswith("  ") and line.strip():
                goals[-1] += " " + line.strip()
            elif goals or line.strip():
                break
    return title, goals


def _page_ready(nb):
    """Executed notebook as shown on the site: progress-bar widgets (live-only) removed."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET_MIME not in o.get("data", {})]
    return nb


def exporter() -> HTMLExporter:
    """nbconvert's JupyterLab HTML with the course template: images inline, no script from a CDN."""
    return HTMLExporter(template_name="site_template", extra_template_basedirs=[str(TEMPLATE_DIR.parent)],
                        embed_images=True, exclude_input_prompt=True, exclude_output_prompt=True)


def render(nb, title: str, nav: dict[str, str] | None = None) -> str:
    nb = copy.deepcopy(nb)
    nb.metadata["title"] = title
    body, _ = exporter().from_notebook_node(nb, resources={"course_nav": nav or {}})
    return body


def _markdown_page(markdown: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(markdown)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def build_page(path: Path, out: Path, profile: str, nav: dict[str, str] | None = None) -> Page:
    """Execute a copy of one notebook and write ``out/<name>.html`` and ``out/notebooks/<name>.ipynb``."""
    nb, seconds = execute(path, profile)
    title, goals = title_and_goals(nb)
    out.mkdir(parents=True, exist_ok=True)
    (out / "notebooks").mkdir(exist_ok=True)
    shutil.copy2(path, out / "notebooks" / path.name)   # the clean notebook, to download and run
    page = Page(path, title, goals, path.stem + ".html", image_count(nb), seconds)
    nav = {"index": "index.html", "notebook": f"notebooks/{path.name}", "guide": "instructor_guide.html",
           **(nav or {})}
    (out / page.html_name).write_text(render(_page_ready(nb), title, nav), encoding="utf-8")
    return page


def nav_links(paths: list[Path], i: int) -> dict[str, str]:
    """Previous and next page of notebook ``i`` of ``paths``."""
    nav = {}
    if i > 0:
        nav["previous"] = paths[i - 1].stem + ".html"
    if i + 1 < len(paths):
        nav["next"] = paths[i + 1].stem + ".html"
    return nav


def index_markdown(pages: list[Page], profile: str) -> str:
    lines = ["# Compressing Mixture-of-Experts Models in Python",
             "",
             f"The course's {len(pages)} notebooks, executed with the `{profile}` profile "
             f"(`MOE_LAB_PROFILE={profile}`) on {time.strftime('%Y-%m-%d')}: every printed number, table and "
             "plot below was produced by that run. Download a notebook to run it yourself "
             "(`make lab`). For teaching, read the [instructor guide](instructor_guide.html).",
             "",
             "## Contents",
             ""]
    for page in pages:
        lines.append(f"1. [{page.title}](#{page.source.stem})")
    for page in pages:
        lines += ["", f"<a id=\"{page.source.stem}\"></a>", "", f"## {html.escape(page.title)}", "",
                  f"[Read the notebook with its outputs]({page.html_name}) · "
                  f"[download `{page.source.name}`](notebooks/{page.source.name}) · "
                  f"{page.figures} figure{'s' * (page.figures != 1)} · ran in {page.seconds:.0f} s", ""]
        if page.goals:
            lines += ["**Learning goals**", ""] + [f"- {g}" for g in page.goals]
    return "\n".join(lines) + "\n"


def build_site(out: Path, profile: str = "default", paths: list[Path] | None = None,
               guide: Path = GUIDE, log=print) -> list[Page]:
    """Execute every notebook (copies) and write the course site into ``out``."""
    paths = paths or notebook_paths()
    pages = []
    for i, path in enumerate(paths):
        log(f"executing {path.name} ({profile} profile) ...")
        pages.append(build_page(path, out, profile, nav_links(paths, i)))
        log(f"  {pages[-1].seconds:.0f} s, {pages[-1].figures} figures -> {out / pages[-1].html_name}")
    finish_site(out, pages, profile, guide)
    (out / "timings.md").write_text(timing_table([(p.source.name, p.seconds) for p in pages], profile),
                                    encoding="utf-8")
    return pages


def finish_site(out: Path, pages: list[Page], profile: str, guide: Path = GUIDE) -> None:
    """Write ``index.html`` and the instructor guide page for already built pages."""
    nav = {"index": "index.html", "guide": "instructor_guide.html"}
    (out / "index.html").write_text(
        render(_markdown_page(index_markdown(pages, profile)), "Compressing MoE models: the course", nav),
        encoding="utf-8")
    text = guide.read_text(encoding="utf-8") if guide.exists() else "# Instructor guide\n\n(no guide found)\n"
    text = re.sub(r"\]\((\d\d_[^)]+)\.ipynb\)", r"](\1.html)", text)   # link the rendered pages
    (out / "instructor_guide.html").write_text(render(_markdown_page(text), "Instructor guide", nav),
                                               encoding="utf-8")


# ---------------------------------------------------------------------------------------------- timing

def time_notebooks(paths: list[Path], profile: str, log=print) -> list[tuple[str, float]]:
    rows = []
    for path in paths:
        _, seconds = execute(path, profile)
        log(f"{path.name}: {seconds:.1f} s")
        rows.append((path.name, seconds))
    return rows


def timing_table(rows: list[tuple[str, float]], profile: str) -> str:
    lines = [f"| notebook | seconds ({profile}) | minutes ({profile}) |", "| --- | ---: | ---: |"]
    lines += [f"| `{name}` | {s:.0f} | {s / 60:.1f} |" for name, s in rows]
    total = sum(s for _, s in rows)
    lines.append(f"| total | {total:.0f} | {total / 60:.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="check the notebooks' cell conventions")
    p = sub.add_parser("student", help="write student copies without solution cells")
    p.add_argument("--out", type=Path, default=ROOT / "student")
    for name, default_out, text in [
            ("site", ROOT / "site", "execute the notebooks and build the HTML course"),
            ("time", None, "execute each notebook alone and tabulate the seconds")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--profile", default="default", choices=["default", "ci"])
        p.add_argument("--out", type=Path, default=default_out)
        p.add_argument("names", nargs="*", help="notebook numbers or names (default: all)")
    args = parser.parse_args(argv)

    if args.command == "check":
        found = [msg for path in notebook_paths() for msg in problems(nbformat.read(path, 4), path.name)]
        print("\n".join(found) or f"{len(notebook_paths())} notebooks follow the conventions")
        return 1 if found else 0
    if args.command == "student":
        for c in write_student_copies(args.out):
            trimmed = "".join(f"; trimmed cell {i} ({len(s)} statement{'s' * (len(s) > 1)})"
                              for i, s in c.trimmed_cells.items())
            print(f"{c.path}: removed cells {c.removed_cells}{trimmed}")
        return 0
    paths = notebook_paths(args.names)
    if args.command == "site":
        if args.out.exists() and any(args.out.iterdir()):
            if not (args.out / "index.html").is_file():
                parser.error(f"--out {args.out} holds files but no course site: refusing to replace it")
            shutil.rmtree(args.out)
        build_site(args.out, args.profile, paths)
        print(f"open {args.out / 'index.html'}")
        return 0
    table = timing_table(time_notebooks(paths, args.profile), args.profile)
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
