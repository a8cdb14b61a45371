import ast
import contextlib
import io
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import figures
import rs_data
from reports import draw
from conftest import ROOT


PACKAGES = ("rs_data", "runner", "reports", "bench", "figures")
LAYER = dict(rs_data="data", runner="data", cosmae="method", baselines="method", eval_mlknn="evaluation",
             reports="reports", bench="tools", figures="tools")  # of each top-level module or package


def module_files() -> dict:
    """{module name: path} of the project's code: top-level files, package files ('reports', 'reports.draw')."""
    files = {p.stem: p for p in ROOT.glob("*.py") if not p.stem.startswith("test_")}
    for pkg in PACKAGES:
        files.update({pkg if p.stem == "__init__" else f"{pkg}.{p.stem}": p for p in (ROOT / pkg).glob("*.py")})
    return files


def project_imports(name: str, files: dict) -> dict:
    """{imported project module: 'module' (at the top of the file) or 'function' (inside a function)}. Importing
    a package's module runs the package first: `from reports import draw` imports 'reports' and 'reports.draw'."""
    tree, found = ast.parse(files[name].read_text()), {}
    package = name if files[name].stem == "__init__" else name.rpartition(".")[0]
    top = list(tree.body)  # the file's own statements, also those inside its top-level try and if blocks
    for b in tree.body:
        if isinstance(b, (ast.Try, ast.If)):
            top += b.body + b.orelse + [n for h in getattr(b, "handlers", []) for n in h.body]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import draw, from .draw import x
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
            mods = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for m in mods:
            parts = m.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package above it
                target = ".".join(parts[:i])
                if target in files and target != name:
                    where = "module" if node in top else "function"
                    found[target] = "module" if found.get(target) == "module" else where
    return found


def top_level(module: str) -> str:
    return module.split(".")[0]


def test_method_file_is_the_paper_and_nothing_else():
    """cosmae.py: at most 550 lines of at most 120 characters, and none of the run machinery (run folder,
    checkpoint files, resume, metrics log, Ctrl-C, non-finite stops, flag checks, process groups)."""
    src = (ROOT / "cosmae.py").read_text()
    lines = src.splitlines()
    assert len(lines) <= 550 and max(map(len, lines)) <= 120
    tree = ast.parse(src)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    machinery = {"json", "os", "sys", "Path", "open", "signal", "fcntl", "KeyboardInterrupt", "DataError", "DIST",
                 "shard_rand", "all_mean", "Meter", "load_checkpoint", "save_torch", "enforce", "check_flags",
                 "setup_distributed", "isfinite"}
    assert not names & machinery, names & machinery
    assert not attrs & {"save", "load", "compile", "_foreach_copy_", "_foreach_lerp_", "init_process_group",
                        "DistributedDataParallel", "resume_task", "trim_metrics", "exit", "environ"}
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"__future__", "copy", "math", "contextlib", "dataclasses", "numpy", "torch", "eval_mlknn",
                       "rs_data", "runner"}


def test_data_flows_one_way_and_no_import_circle():
    """data (rs_data, runner) → method (cosmae, baselines) → evaluation (eval_mlknn) → reports; the tools (bench,
    figures) at the end. One import points back: eval_mlknn.py's command line builds the encoder with cosmae.py
    (inside a function). reports/draw.py imports nothing of the project."""
    files = module_files()
    graph = {f: project_imports(f, files) for f in files}
    assert set(LAYER) == {top_level(f) for f in files}, "every module belongs to a layer"
    for f, imports in graph.items():
        layers = {LAYER[top_level(m)] for m in imports}
        if LAYER[top_level(f)] == "data":
            assert layers <= {"data"}, (f, imports)
        if LAYER[top_level(f)] != "tools":
            assert "tools" not in layers, (f, imports)
        if LAYER[top_level(f)] in ("evaluation", "reports"):
            back = {m: where for m, where in imports.items() if LAYER[top_level(m)] == "method"}
            assert back == ({"cosmae": "function"} if f == "eval_mlknn" else {}), (f, back)
    assert graph["runner"].keys() <= {"rs_data"} and graph["rs_data"] == {} and graph["reports.draw"] == {}
    assert graph["eval_mlknn"].get("cosmae") == "function"
    edges = {f: {m for m in graph[f] if (f, m) != ("eval_mlknn", "cosmae")} for f in files}

    def reaches(a, b, seen=()):
        return any(m == b or (m not in seen and reaches(m, b, seen + (m,))) for m in edges.get(a, ()))
    assert not [f for f in files if reaches(f, f)]


def code_lines() -> dict:
    return {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in module_files().values()}


def test_the_top_level_holds_the_card():
    """The card's files on top; everything else in folders named for what they hold; the method file and the
    evaluation within their sizes (cosmae.py ≤ 550 lines, eval_mlknn.py ≤ 450)."""
    card = {"cosmae.py", "eval_mlknn.py", "baselines.py", "test_cosmae.py", "README.md", "WALKTHROUGH.md",
            "requirements.txt"}
    assert {p.name for p in ROOT.glob("*.py")} <= card
    assert {p.name for p in ROOT.iterdir() if p.is_file() and not p.name.startswith(".")} <= card
    lines = code_lines()
    assert lines["cosmae.py"] <= 550 and lines["eval_mlknn.py"] <= 450, lines


def test_the_code_fits_its_budget():
    """Issue 22: every .py file that is not a test, ≤ 2,800 lines in all."""
    lines = code_lines()
    assert sum(lines.values()) <= 2800, (sum(lines.values()), lines)


SNIPPET = re.compile(r"```python\n(.*?)```[ \t]*\n\s*```text\n(.*?)```", re.S)


def walkthrough_snippets(path: Path = ROOT / "WALKTHROUGH.md") -> list:
    """[(code, printed output)] of the page: every ```python block and the ```text block right after it."""
    text = path.read_text()
    pairs = SNIPPET.findall(text)
    assert len(pairs) == text.count("```python"), "every ```python block is followed by its ```text output block"
    return pairs


def run_snippets(pairs: list) -> list:
    """Execute the snippets in order in one namespace → what each printed."""
    namespace, printed = {"__name__": "walkthrough"}, []
    for i, (code, _) in enumerate(pairs, 1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"WALKTHROUGH.md snippet {i}", "exec"), namespace)
        printed.append(out.getvalue())
    return printed


@pytest.fixture
def restore_globals(monkeypatch, tmp_path):
    """The snippets set module globals (small evaluation sets, print options, one torch thread): undone after."""
    monkeypatch.setattr(rs_data, "SYNTH_EVAL", dict(rs_data.SYNTH_EVAL))
    monkeypatch.setattr(rs_data, "REC_TILES", rs_data.REC_TILES)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the tiny run's folder
    yield
    torch.set_printoptions(profile="default")  # (the thread count: one_thread)


def test_walkthrough_snippets_print_what_the_page_shows(restore_globals, one_thread):
    pairs = walkthrough_snippets()
    assert len(pairs) >= 8
    assert all(len(code.strip().splitlines()) <= 15 for code, _ in pairs), "a snippet holds at most 15 lines"
    for i, ((code, shown), got) in enumerate(zip(pairs, run_snippets(pairs)), 1):
        assert same_printout(got, shown), f"snippet {i} printed\n{got}\nbut the page shows\n{shown}\n(code:\n{code})"

DECIMAL = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")


def same_printout(got: str, shown: str) -> bool:
    """The same text, and the same decimal numbers up to their last digits (another CPU's float kernels may round
    differently): 1e-3 relative or absolute. Integers, shapes and every word must be equal."""
    if DECIMAL.sub("#", got) != DECIMAL.sub("#", shown):
        return False
    return all(math.isclose(float(x), float(y), rel_tol=1e-3, abs_tol=1e-3)
               for x, y in zip(DECIMAL.findall(got), DECIMAL.findall(shown)))


def test_printouts_compare_words_exactly_and_decimals_to_their_last_digits():
    assert same_printout("L = 1.2967 (2, 16)\n", "L = 1.2968 (2, 16)\n")
    assert not same_printout("L = 1.2967 (2, 16)\n", "L = 1.3067 (2, 16)\n")
    assert not same_printout("L = 1.2967 (2, 17)\n", "L = 1.2967 (2, 16)\n")
    assert not same_printout("R = 1.2967\n", "L = 1.2967\n")


def test_walkthrough_parser_pairs_code_with_output():
    page = ("x\n```python\nprint(1)\n```\n\n```text\n1\n```\n```bash\nls\n```\n"
            "```python\nprint(2)\n```\n```text\n2\n```\n")
    path = Path(tempfile.mkdtemp()) / "page.md"
    path.write_text(page)
    assert walkthrough_snippets(path) == [("print(1)\n", "1\n"), ("print(2)\n", "2\n")]
    assert run_snippets(walkthrough_snippets(path)) == ["1\n", "2\n"]
    path.write_text(page + "```python\nprint(3)\n```\n")  # a snippet without its output block
    with pytest.raises(AssertionError):
        walkthrough_snippets(path)


def test_figures_command_writes_the_teaching_figures(tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(figures.FIGURES, "teacher", lambda: figures.teacher_figure(steps=1, n=8))  # quicker
    figures.main(["--out", str(tmp_path)])
    for name in ("beta_density", "mixup", "teacher", "masking"):
        path = tmp_path / f"{name}.png"
        assert 2_000 < path.stat().st_size < 200_000, name
        w, h = Image.open(path).size
        assert 500 <= w <= 1400 and 300 <= h <= 800, (name, w, h)


def test_committed_figures_exist_are_small_and_linked_from_the_walkthrough():
    page = (ROOT / "WALKTHROUGH.md").read_text()
    for name in ("beta_density", "mixup", "teacher", "masking", "runs_matrices", "runs_reconstructions",
                 "run_finetune_reconstructions"):
        path = ROOT / "figures" / f"{name}.png"
        assert path.is_file() and path.stat().st_size < 120_000 and f"(figures/{name}.png)" in page, name


def test_heatmap_writes_the_number_in_every_cell():
    values = [[1.0, 2.5], [None, 40.25]]
    numbers, lay = draw.heatmap(values, ["a", "b"], ["x", "y"], "t", "", "{:.2f}", 1.0, 40.25, with_layout=True)
    blank, lay_blank = draw.heatmap(values, ["a", "b"], ["x", "y"], "t", "", "", 1.0, 40.25, with_layout=True)
    assert numbers.size == lay["size"]
    numbers, blank = np.asarray(numbers), np.asarray(blank)
    assert len(lay["boxes"]) == 2 and all(len(r) == 2 for r in lay["boxes"])
    cells, blank_cells = sum(lay["boxes"], []), sum(lay_blank["boxes"], [])
    for v, (x0, y0, x1, y1), (u0, v0, u1, v1) in zip(sum(values, []), cells, blank_cells):
        without = blank[v0 + 2:v1 - 2, u0 + 2:u1 - 2].reshape(-1, 3)
        with_number = numbers[y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3)
        assert (len(np.unique(without, axis=0)) == 1) == (v is not None)  # no number: one plain colour (None: 'n/a')
        background = with_number[0]
        text = with_number[(with_number != background).any(1)]
        assert 20 < len(text) < 0.6 * len(with_number)  # the number's strokes, inside the cell
        ink = draw.GREY if v is None else draw.INK if background @ [0.299, 0.587, 0.114] > 140 else draw.WHITE
        assert np.abs(text.astype(int) - np.array(ink)).sum(1).min() < 60
    colours = {tuple(blank[v0 + 3, u0 + 3]) for u0, v0, _, _ in sum(lay_blank["boxes"], [])}
    assert len(colours) == 4  # three values on the colour map, one grey 'not measured'


def test_colormap_runs_dark_to_bright_and_text_stays_readable():
    c = draw.colormap(np.linspace(0, 1, 11)).astype(float)
    lum = c @ [0.299, 0.587, 0.114]
    assert (np.diff(lum) > 0).all()  # perceptual: brightness rises monotonically
    assert np.array_equal(draw.colormap(0.2, reverse=True), draw.colormap(0.8))


def test_text_is_drawn_with_a_legible_font():
    w, h = draw.text_size("after T1 (synth_pan)", 13)
    assert 80 < w < 260 and 10 <= h <= 30
    img = Image.new("RGB", (300, 60), draw.WHITE)
    draw.draw_text(img, (150, 30), "R = 0.9836", 13, anchor="mm")
    ink = np.argwhere(np.asarray(img).min(-1) < 128)
    assert len(ink) > 20 and abs(ink[:, 1].mean() - 150) < 12 and abs(ink[:, 0].mean() - 30) < 8  # centred


def test_image_grid_places_each_picture_in_its_box():
    cells = [[np.full((10, 20, 3), 50 * (i + 2 * j), np.uint8) for j in range(3)] for i in range(2)]
    img, lay = draw.image_grid(cells, ["r0", "r1"], ["c0", "c1", "c2"], "title", notes=[["n"] * 3] * 2,
                               with_layout=True)
    img = np.asarray(img)
    assert img.shape[:2] == (lay["size"][1], lay["size"][0])
    for i in range(2):
        for j in range(3):
            x0, y0, x1, y1 = lay["boxes"][i][j]
            assert (x1 - x0, y1 - y0) == (20, 10) and (img[y0:y1, x0:x1] == 50 * (i + 2 * j)).all()


def test_line_plot_cuts_curves_at_the_axes():
    assert draw.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    red = (255, 0, 0)
    img = draw.line_plot([dict(x=[0, 1], y=[-5, 5], color=red, width=4)], (0, 1), (0, 1), size=(300, 200))
    a = np.asarray(img).astype(int)
    rows = np.flatnonzero((np.abs(a - red).sum(-1) < 60).any(1))  # where the curve is drawn
    assert img.size == (300, 200) and len(rows) > 50 and 10 < rows.min() and rows.max() < 180  # inside the axes
    dashed = np.asarray(draw.line_plot([dict(x=[0, 1], y=[0.5, 0.5], color=red, dash=True)], (0, 1), (0, 1)))
    cols = (np.abs(dashed.astype(int) - red).sum(-1) < 60).any(0)
    assert 4 < (np.diff(cols.astype(int)) == 1).sum() < 60  # on and off along the line
