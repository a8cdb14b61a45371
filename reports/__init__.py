"""Tables and pictures of finished runs (eval.json rows): the paper's Table II layout (mean ± std over seeds), the
accuracy matrix A[t][j] and reconstruction matrix R[t][j], average forgetting (Chaudhry et al., ECCV 2018) and
backward transfer (Lopez-Paz & Ranzato, NeurIPS 2017); A and R as heat maps, the reconstructions as image grids."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

import rs_data
from reports import draw
from rs_data import DataError, atomic_write

KINDS = {"micro": "micro", "macro": "macro", "micro_binary": "micro ★", "macro_binary": "macro ★"}
STAR = ("★ ranks ML-kNN's 0/1 decisions: the kind to set beside the paper's Tables I and II; the others rank its "
        "posteriors (README, 'Which mAP the paper reports')")
RECON_CELL = 96  # pixels per view in reconstructions.png (original | masked | reconstruction: 3 views a cell)


def forgetting_bwt(a) -> dict:
    """a [T+1, T]: a[t][j] = mAP on task j+1 after task t (row 0: random init); with 1-based A[t][j]:
        final average mAP   = 1/T Σ_j A[T][j]
        average forgetting  = 1/(T−1) Σ_{j<T} max_{t∈j..T−1} A[t][j] − A[T][j]     (> 0: forgotten)
        backward transfer   = 1/(T−1) Σ_{j<T} A[T][j] − A[j][j]                    (< 0: forgotten)
    With one task both are None."""
    a = np.asarray(a, dtype=np.float64)
    t_last = a.shape[1]
    old = range(1, t_last)  # tasks j = 1..T−1 (1-based), column j−1
    forgetting = [max(a[t][j - 1] for t in range(j, t_last)) - a[t_last][j - 1] for j in old]
    bwt = [a[t_last][j - 1] - a[j][j - 1] for j in old]
    return dict(final_avg_map=float(a[t_last].mean()), avg_forgetting=float(np.mean(forgetting)) if old else None,
                bwt=float(np.mean(bwt)) if old else None)


def cell(values: list, digits: int = 2) -> str:
    """'mean' of one value, 'mean ± std' (population std over seeds) of several, '—' of none."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m = f"{np.mean(values):.{digits}f}"
    return m if len(values) == 1 else f"{m} ± {np.std(values):.{digits}f}"


def markdown(head: list, rows: list, caption: str = "") -> str:
    lines = [caption] if caption else []
    return "\n".join(lines + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def setting(run: dict) -> tuple:
    return run["eval_set"], tuple(run["tasks"])


def group_runs(runs: list, key=lambda r: r["label"]) -> dict:
    """{label: [runs]}: runs that differ only by seed form a group; key=setting: by evaluation set and task list."""
    groups = defaultdict(list)
    for r in runs:
        groups[key(r)].append(r)
    return groups


def has_matrix(run: dict) -> bool:
    """True when the run evaluated every task's own set before task 1 and after each of its tasks."""
    rows = run["rows"]
    return len(rows) == len(run["tasks"]) + 1 and all(row.get("per_task") for row in rows)


def format_table(runs: list, metric: str = "micro", caption: str = "") -> str:
    """method | init | T1 (name) | ... | train h (Table II; seconds when every run took under an hour)."""
    tasks = max((r["tasks"] for r in runs), key=len)
    hours = max((r.get("train_seconds") or 0) for r in runs) >= 3600
    name, unit, digits, rows = ("h", 3600, 2, []) if hours else ("s", 1, 0, [])
    for label, group in group_runs(runs).items():
        by_task = defaultdict(list)
        for r in group:
            for row in r["rows"]:
                by_task[row["task"]].append(row.get(metric))
        rows.append([label] + [cell(by_task[t]) for t in range(len(tasks) + 1)]
                    + [cell([r["train_seconds"] / unit for r in group if r.get("train_seconds") is not None], digits)])
    return markdown(["method", "init"] + [f"T{i} ({n})" for i, n in enumerate(tasks, 1)] + [f"train {name}"], rows,
                    caption)


def format_matrix(runs: list, key: str, caption: str = "", digits: int = 2) -> str:
    """rows[t][key][j] of one group of runs (mean ± std): a row per evaluation point, a column per task."""
    tasks, rows = runs[0]["tasks"], []
    by_task = [{row["task"]: row for row in r["rows"]} for r in runs]
    for t, name in enumerate(["init"] + list(tasks)):
        vals = [[b[t][key][j] for b in by_task if b.get(t, {}).get(key)] for j in range(len(tasks))]
        if any(vals):
            rows.append([f"after T{t} ({name})" if t else "init (random)"] + [cell(v, digits) for v in vals])
    return markdown(["encoder"] + [f"T{j} {n}" for j, n in enumerate(tasks, 1)], rows, caption)


def forgetting_table(runs: list, caption: str = "") -> str:
    """method | final average mAP | average forgetting | BWT | train s, each mean ± std over seeds."""
    rows = []
    for label, group in group_runs(runs).items():
        stats = [forgetting_bwt([row["per_task"] for row in r["rows"]]) for r in group if has_matrix(r)]
        rows.append([label] + [cell([s[k] for s in stats]) for k in ("final_avg_map", "avg_forgetting", "bwt")]
                    + [cell([r.get("train_seconds") for r in group], 0)])
    return markdown(["method", "final avg mAP", "avg forgetting", "BWT", "train s"], rows, caption)


def report(runs: list, k: int = 10) -> str:
    """The tables of one run, or of several (mean ± std over seeds) of one evaluation set and task list."""
    caption = f"\nmAP (%) of ML-kNN (k={k}) on {runs[0]['eval_set']} after each task"
    if len(runs) == 1:
        rows = [["init (random)" if r["task"] == 0 else f"after T{r['task']} ({r['name']})"]
                + [f"{r[m]:.2f}" for m in KINDS] for r in runs[0]["rows"]]
        parts = [markdown(["encoder"] + list(KINDS.values()), rows, caption + ":"), STAR]
    else:
        parts = [format_table(runs, m, f"{caption}: {name} mAP") for m, name in KINDS.items()] + [STAR]
    for label, group in group_runs(runs).items():
        if any(has_matrix(r) for r in group):
            parts.append(format_matrix(group, "per_task", f"\n{label}: accuracy matrix A[t][j] = micro mAP (%) on "
                                       "task j's own images and labels, after task t:"))
        if any(r["rows"] and r["rows"][0].get("rec_loss") for r in group):
            parts.append(format_matrix(group, "rec_loss", f"\n{label}: reconstruction matrix R[t][j] = Eq. (1) on "
                                       "task j's held-out tiles after task t (a rise down a column: forgetting):", 4))
    if any(has_matrix(r) for r in runs):
        parts.append(forgetting_table(runs, "\nfrom A: final average mAP, average forgetting and backward transfer "
                                      "(micro mAP points; forgetting > 0, BWT < 0: forgotten)"))
    return "\n".join(parts)


def report_all(runs: list, k: int = 10) -> str:
    return "\n\n".join(report(g, k) for g in group_runs(runs, setting).values())


def recon_cells(path: Path, n_tasks: int) -> list:
    """reconstructions_T<t>.png (a row per task) → [each task's first tile, original | masked | reconstruction,
    RECON_CELL px a view, or None]."""
    try:
        arr = np.asarray(Image.open(path).convert("RGB"))
    except (OSError, ValueError):  # missing or unreadable: that column is drawn empty
        return [None] * n_tasks
    h, size, cells = arr.shape[0] // n_tasks, RECON_CELL, []
    if h == 0 or arr.shape[0] != h * n_tasks or arr.shape[1] < 3 * h:
        return [None] * n_tasks
    gap = np.full((size, 3, 3), 255, np.uint8)
    for j in range(n_tasks):
        views = [arr[j * h:(j + 1) * h, v * h:(v + 1) * h] for v in range(3)]  # square tiles: a view is h wide
        small = [np.asarray(Image.fromarray(v).resize((size, size), Image.BOX)) for v in views]
        empty = not any(v.any() for v in views)  # a row padded with black: the task had no held-out tile
        cells.append(None if empty else np.concatenate([small[0], gap, small[1], gap, small[2]], 1))
    return cells


def recon_grid(points: list, tasks: list, col_labels: list, title: str, subtitle: str):
    """points [(run folder, row)] → rows = tasks, a column per point: the task's first held-out tile in
    <folder>/reconstructions_T<t>.png, R[t][j] under it → (Image, draw.grid_layout) or None (no picture)."""
    columns = [recon_cells(Path(f) / f"reconstructions_T{r['task']}.png", len(tasks)) for f, r in points]
    if not any(c is not None for col in columns for c in col):
        return None
    notes = [[f"R = {v:.4f}" if v is not None else None for v in row]
             for row in zip(*matrix_values([r for _, r in points], "rec_loss", len(tasks)))]
    return draw.image_grid([list(r) for r in zip(*columns)], [f"T{j} {n}" for j, n in enumerate(tasks, 1)],
                           col_labels, title, subtitle, notes, with_layout=True)


def point_label(t: int) -> str:
    return "init" if t == 0 else f"after T{t}"


def reconstructions_picture(out, tasks: list, rows: list):
    """reconstructions.png of a run: a row per task, a column per evaluation point with R."""
    points = [(out, r) for r in sorted(rows, key=lambda r: r["task"]) if r.get("rec_loss")]
    subtitle = ("Each cell: the task's first held-out tile, original | masked input | reconstruction (visible patches "
                "pasted back); the same tile and mask in every column.\nUnder it: R[t][j] = Eq. (1) on the task's "
                "held-out tiles (reconstruction_matrix.png). A row that gets worse to the right is forgetting."
                + ("\nSynthetic sensors: the band that holds the scene, in grey (synth_pan: the mean of the three "
                   "bands); removed patches in blue." if any(n in rs_data.SYNTH_TASKS for n in tasks) else ""))
    return recon_grid(points, tasks, [point_label(r["task"]) for _, r in points],
                      "Masked reconstructions of every task (rows) after every task (columns)", subtitle)


def matrix_values(rows: list, key: str, n_tasks: int) -> list:
    """rows[t][key] as a [points][n_tasks] matrix of floats, None where not measured."""
    return [[(r.get(key) or [])[j] if j < len(r.get(key) or []) else None for j in range(n_tasks)] for r in rows]


def matrix_range(mats: list, key: str) -> tuple:
    """(min, max) over matrices [(values, points)] of one kind (for R: of the trained rows t ≥ 1 if any)."""
    vals = [[v for t, row in zip(points, m) if t > 0 or key == "per_task" for v in row if v is not None]
            for m, points in mats]
    vals = sum(vals, []) or [v for m, _ in mats for row in m for v in row if v is not None]
    return (min(vals), max(vals)) if vals else (None, None)


def matrix_heatmap(values: list, points: list, tasks: list, key: str, title: str, extra: str = "", vmin=None,
                   vmax=None, with_layout: bool = False):
    """A heat map of A ('per_task') or R ('rec_loss'): a row per point, a column per task; brighter is better."""
    accuracy = key == "per_task"
    what = ("micro mAP (%) of ML-kNN on task j's own images and labels (posterior kind); higher is better"
            if accuracy else "Eq. (1) on task j's held-out tiles, fixed masks; lower is better")
    if not accuracy and vmin is None:  # the random init's loss is far above the rest: colours for the trained rows
        vmin, vmax = matrix_range([(values, points)], key)
    init = values[points.index(0)] if 0 in points else []
    if vmax is not None and any(v is not None and not vmin <= v <= vmax for v in init):
        extra = "colours span the trained rows (the init lies off the scale)" + (f"; {extra}" if extra else "")
    subtitle = what + "\nrow t: the encoder after task t; a column that darkens downwards is forgetting" + \
        (f"\n{extra}" if extra else "")
    return draw.heatmap(values, [f"after T{t} ({tasks[t - 1]})" if t else "init (random)" for t in points],
                        [f"T{j} {n}" for j, n in enumerate(tasks, 1)], title, subtitle,
                        "{:.1f}" if accuracy else "{:.4f}", vmin, vmax, not accuracy, with_layout)


def write_run_pictures(out, tasks: list, rows: list, label: str = "") -> dict:
    """accuracy_matrix.png, reconstruction_matrix.png and reconstructions.png of a run folder (those it has; one
    evaluation set) → {name: (Image, layout)}."""
    rows, pictures, prefix = sorted(rows, key=lambda r: r["task"]), {}, f"{label}: " if label else ""
    for key, name, title in (("per_task", "accuracy_matrix.png", "accuracy matrix A[t][j]"),
                             ("rec_loss", "reconstruction_matrix.png", "reconstruction matrix R[t][j]")):
        have, extra = [r for r in rows if r.get(key)], ""
        if not have:
            continue
        if key == "per_task" and has_matrix(dict(rows=rows, tasks=tasks)) and len(tasks) > 1:
            s = forgetting_bwt([r["per_task"] for r in rows])
            extra = (f"final average mAP {s['final_avg_map']:.2f}, average forgetting {s['avg_forgetting']:.2f}, BWT "
                     f"{s['bwt']:.2f} (forgetting_bwt)")
        pictures[name] = matrix_heatmap(matrix_values(have, key, len(tasks)), [r["task"] for r in have], tasks, key,
                                        prefix + title, extra, with_layout=True)
    pictures["reconstructions.png"] = reconstructions_picture(out, tasks, rows)
    for name, picture in pictures.items():
        if picture:
            atomic_write(Path(out) / name, lambda tmp: picture[0].save(tmp, format="PNG"))
    return pictures


def mean_matrix(group: list, key: str, n_tasks: int):
    """The mean over a label's runs of rows[t][key][j] on the points every run has → (matrix, points, runs)."""
    have = [{r["task"]: r for r in run["rows"] if r.get(key)} for run in group]
    have = [h for h in have if h]
    points = sorted(set.intersection(*[set(h) for h in have])) if have else []
    if not points:
        return None, [], 0
    mats = [matrix_values([h[t] for t in points], key, n_tasks) for h in have]
    mean = [[None if any(m[i][j] is None for m in mats) else float(np.mean([m[i][j] for m in mats]))
             for j in range(n_tasks)] for i in range(len(points))]
    return mean, points, len(mats)


def compare_matrices(labels: dict, tasks: list):
    """A row per label (group_runs): its mean A and R side by side, one colour scale per kind → Image or None."""
    mats = {(label, key): mean_matrix(g, key, len(tasks)) for label, g in labels.items()
            for key in ("per_task", "rec_loss")}
    panels = []
    for label in labels:
        row = []
        for key, what in (("per_task", "A"), ("rec_loss", "R")):
            mean, points, n = mats[label, key]
            lo, hi = matrix_range([(m, p) for (_, kk), (m, p, _) in mats.items() if kk == key and m], key)
            if mean is not None:
                row.append(matrix_heatmap(mean, points, list(tasks), key, f"{label}: {what}[t][j], mean of {n} "
                                          f"run{'s' if n > 1 else ''}", vmin=lo, vmax=hi))
        if row:
            panels.append(draw.vstack(row, 24, across=True))
    return draw.vstack(panels, 24) if panels else None


def compare_reconstructions(labels: dict, tasks: list, eval_set: str = ""):
    """Rows = tasks, a column per label: the last evaluation (with R) of the label's first run."""
    last = {label: max((r for r in g[0]["rows"] if r.get("rec_loss")), key=lambda r: r["task"], default=None)
            for label, g in labels.items()}
    points = [(labels[label][0]["folder"], r) for label, r in last.items() if r]
    return recon_grid(points, tasks, [f"{label}, {point_label(r['task'])}" for label, r in last.items() if r],
                      "The last evaluation of each method: every task's first held-out tile",
                      "original | masked input | reconstruction; R[t][j] under each cell; the first run of each "
                      "label" + (f" ({eval_set})" if eval_set else ""))


def write_figures(runs: list, folder: Path) -> list:
    """matrices.png and reconstructions.png of many runs into `folder` (a further evaluation set or task list: _2,
    ...) → the paths written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--figures {folder}: cannot create the folder ({e.strerror})") from None
    written = []
    for k, ((eval_set, tasks), group) in enumerate(group_runs(runs, setting).items()):
        suffix, labels = "" if k == 0 else f"_{k + 1}", group_runs(group)
        mats, recs = compare_matrices(labels, list(tasks)), compare_reconstructions(labels, list(tasks), eval_set)
        for name, img in ((f"matrices{suffix}.png", mats), (f"reconstructions{suffix}.png", recs and recs[0])):
            if img is not None:
                atomic_write(folder / name, lambda tmp: img.save(tmp, format="PNG"))
                written.append(folder / name)
    return written
