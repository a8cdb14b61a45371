"""Tables and pictures of finished runs (eval.json rows): Table II (mean ± std over seeds), the accuracy and
reconstruction matrices A[t][j] and R[t][j] (also as heat maps), forgetting, BWT; the reconstructions as image grids."""
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
        "posteriors (docs/results.md, 'Which mAP kind')")
RECON_CELL = 96  # pixels high of a task's reconstructions in reconstructions.png


def forgetting_bwt(a) -> dict:
    """a[t][j] = mAP on task j+1 after task t (row 0: init) → final average mAP, average forgetting, BWT."""
    a = np.asarray(a, dtype=np.float64)
    t_last = a.shape[1]
    old = range(1, t_last)  # tasks j = 1..T−1 (1-based), column j−1; with one task: forgetting and BWT are None
    # average forgetting (Chaudhry et al., ECCV 2018) = 1/(T−1) Σ_{j<T} max_{t∈j..T−1} A[t][j] − A[T][j] (> 0: forgot)
    forgetting = [max(a[t][j - 1] for t in range(j, t_last)) - a[t_last][j - 1] for j in old]
    # backward transfer (Lopez-Paz & Ranzato, NeurIPS 2017) = 1/(T−1) Σ_{j<T} A[T][j] − A[j][j] (< 0: forgotten)
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
    return "\n".join([caption] * bool(caption) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def setting(run: dict) -> tuple:
    return run["eval_set"], run.get("eval_id"), tuple(run["tasks"])


def group_runs(runs: list, key=lambda r: r["label"]) -> dict:  # {label: [runs]}; key=setting: by set and tasks
    groups = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def has_matrix(run: dict) -> bool:  # every task's own set evaluated before task 1 and after each task
    return len(run["rows"]) == len(run["tasks"]) + 1 and all(row.get("per_task") for row in run["rows"])


def heads(tasks: list, fmt: str = "T{} {}") -> list:
    return [fmt.format(j, rs_data.task_name(n)) for j, n in enumerate(tasks, 1)]


def point(t: int, tasks: list) -> str:
    return f"after T{t} ({rs_data.task_name(tasks[t - 1])})" if t else "init (random)"


def format_table(runs: list, metric: str = "micro", caption: str = "") -> str:
    """method | init | T1 (name) | ... | train h (s when all took under an hour); unfinished seeds noted."""
    tasks = max((r["tasks"] for r in runs), key=len)
    hours = max((r.get("train_seconds") or 0) for r in runs) >= 3600
    name, unit, digits, rows = ("h", 3600, 2, []) if hours else ("s", 1, 0, [])
    for label, group in group_runs(runs).items():
        by_task = defaultdict(list)
        for row in (row for r in group for row in r["rows"]):
            by_task[row["task"]].append(row.get(metric))
        done = sum(len(r["tasks"]) in {row["task"] for row in r["rows"]} for r in group)
        label += f" ({done} of {len(group)} seeds finished)" if done < len(group) else ""
        rows.append([label] + [cell(by_task[t]) for t in range(len(tasks) + 1)]
                    + [cell([r["train_seconds"] / unit for r in group if r.get("train_seconds") is not None], digits)])
    return markdown(["method", "init"] + heads(tasks, "T{} ({})") + [f"train {name}"], rows, caption)


def format_matrix(runs: list, key: str, caption: str = "", digits: int = 2) -> str:
    """rows[t][key][j] of one group of runs (mean ± std): a row per evaluation point, a column per task."""
    tasks, by_task, rows = runs[0]["tasks"], [{row["task"]: row for row in r["rows"]} for r in runs], []
    for t in range(len(tasks) + 1):
        vals = [[b[t][key][j] for b in by_task if b.get(t, {}).get(key)] for j in range(len(tasks))]
        if any(vals):
            rows.append([point(t, tasks)] + [cell(v, digits) for v in vals])
    return markdown(["encoder"] + heads(tasks), rows, caption)


def report(runs: list, k: int = 10) -> str:  # the tables of one evaluation set and task list (seeds: mean ± std)
    caption = f"\nmAP (%) of ML-kNN (k={k}) on {runs[0]['eval_set']} after each task"
    if len(runs) == 1:
        rows = [[point(r["task"], runs[0]["tasks"])] + [cell([r.get(m)]) for m in KINDS] for r in runs[0]["rows"]]
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
    rows = []
    for label, group in group_runs(runs).items():  # from A, mean ± std over seeds
        stats = [forgetting_bwt([row["per_task"] for row in r["rows"]]) for r in group if has_matrix(r)]
        rows.append([label] + [cell([s[k] for s in stats]) for k in ("final_avg_map", "avg_forgetting", "bwt")]
                    + [cell([r.get("train_seconds") for r in group], 0)])
    if any(has_matrix(r) for r in runs):
        parts.append(markdown(["method", "final avg mAP", "avg forgetting", "BWT", "train s"], rows, "\nfrom A: final "
                              "average mAP, average forgetting and backward transfer (micro mAP points; forgetting > 0,"
                              " BWT < 0: forgotten)"))
    return "\n".join(parts)


def report_all(runs: list, k: int = 10) -> str:
    return "\n\n".join(report(g, k) for g in group_runs(runs, setting).values())


def matrix_values(rows: list, key: str, n_tasks: int) -> list:  # rows[t][key][j], None where not measured
    return [[(r.get(key) or [])[j] if j < len(r.get(key) or []) else None for j in range(n_tasks)] for r in rows]


def recon_picture(points: list, tasks: list, col_labels: list, title: str):
    """points [(run folder, row)] → rows = tasks, a column per point, R under each → (Image, layout) or None."""
    columns = []
    for folder, row in points:  # a point's reconstructions_T<t>.png: a row per task, made RECON_CELL high
        try:
            img = Image.open(Path(folder) / f"reconstructions_T{row['task']}.png").convert("RGB")
            img = img.resize((img.width * RECON_CELL * len(tasks) // img.height, RECON_CELL * len(tasks)), Image.BOX)
            columns.append([c if c.any() else None for c in np.split(np.asarray(img), len(tasks))])
        except (OSError, ValueError):  # missing or unreadable: that column is drawn empty
            columns.append([None] * len(tasks))
    if all(c is None for col in columns for c in col):
        return None
    notes = [[None if v is None else f"R = {v:.4f}" for v in row]
             for row in zip(*matrix_values([r for _, r in points], "rec_loss", len(tasks)))]
    synth = "; synthetic sensors: the band in grey, removed patches blue" * any(n in rs_data.SYNTH_TASKS for n in tasks)
    return draw.image_grid([list(r) for r in zip(*columns)], heads(tasks), col_labels, title, "Each cell: original | "
                           f"masked input | reconstruction of a task's first held-out tiles{synth}; under it R[t][j] = "
                           "Eq. (1) on its held-out tiles", notes, True)


def matrices_picture(labels: dict, tasks: list):
    """A row per label: its A | R (mean over its runs, on the points all have) as heat maps → Image or None."""
    mats, panels = {}, []
    for label, group in labels.items():
        for key in ("per_task", "rec_loss"):
            have = [{r["task"]: r for r in run["rows"] if r.get(key)} for run in group]
            if points := sorted(set.intersection(*map(set, have))):
                m = np.array([matrix_values([h[t] for t in points], key, len(tasks)) for h in have], dtype=float)
                mats[label, key] = [[None if np.isnan(v) else v for v in r] for r in m.mean(0).tolist()], points, len(m)
    for label in labels:
        row = []
        for key, what in (("per_task", "accuracy matrix A[t][j]"), ("rec_loss", "reconstruction matrix R[t][j]")):
            if (label, key) not in mats:
                continue
            (values, points, n), accuracy = mats[label, key], key == "per_task"
            scale = [v for (_, k), (m, p, _) in mats.items() if k == key for t, r in zip(p, m) if t > 0 or accuracy
                     for v in r if v is not None] or [0.0]  # one per kind; R's: the trained rows (the init's is far)
            note = ("micro mAP (%) of ML-kNN on task j's own images and labels (posterior kind); higher is better"
                    if accuracy else "Eq. (1) on task j's held-out tiles, fixed masks; lower is better") + \
                "\nrow t: the encoder after task t; a column that darkens downwards is forgetting"
            if not accuracy and points[0] == 0 and any(v is not None and v > max(scale) for v in values[0]):
                note += "\ncolours span the trained rows (the init lies off the scale)"
            title = f"{label}: {what}" + f", mean of {n} runs" * (n > 1)
            fmt, rows = "{:.1f}" if accuracy else "{:.4f}", [point(t, tasks) for t in points]
            row.append(np.asarray(draw.heatmap(values, rows, heads(tasks), title, note, fmt, min(scale), max(scale),
                                               not accuracy)))
        if row:
            panels.append(row)
    return draw.image_grid(panels, [], [], gap=24) if panels else None


def save(folder: Path, pictures: dict) -> list:  # {name: Image or None} → the paths written
    written = []
    for name, img in pictures.items():
        if img:
            atomic_write(folder / name, lambda tmp: img.save(tmp, format="PNG"))
            written.append(folder / name)
    return written


def write_run_pictures(out, tasks: list, rows: list, label: str = "") -> dict:
    """matrices.png (A | R) and reconstructions.png of a run folder (one evaluation set) → {name: Image or None}."""
    rows = sorted(rows, key=lambda r: r["task"])
    points = [(out, r) for r in rows if r.get("rec_loss")]
    recs = recon_picture(points, tasks, ["init" if r["task"] == 0 else f"after T{r['task']}" for _, r in points],
                         "Masked reconstructions of every task (rows) after every task (columns): the same tiles and "
                         "masks in each; a row that gets worse to the right is forgetting")
    pictures = {"matrices.png": matrices_picture({label or "run": [dict(rows=rows, tasks=tasks)]}, list(tasks)),
                "reconstructions.png": recs and recs[0]}
    save(Path(out), pictures)
    return pictures


def write_figures(runs: list, folder: Path) -> list:
    """matrices.png and reconstructions.png (_2, ... for further sets and task lists) of many runs → the paths."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--figures {folder}: cannot create the folder ({e.strerror})") from None
    written = []
    for k, ((eval_set, _, tasks), group) in enumerate(group_runs(runs, setting).items()):
        labels, suffix = group_runs(group), "" if k == 0 else f"_{k + 1}"
        last = [(label, g[0]["folder"], max((r for r in g[0]["rows"] if r.get("rec_loss")), key=lambda r: r["task"],
                                            default=None)) for label, g in labels.items()]
        recs = recon_picture([(f, r) for _, f, r in last if r], list(tasks), [
            f"{label}, {'init' if r['task'] == 0 else 'after T%d' % r['task']}" for label, _, r in last if r],
            f"The last evaluation of each label (its first run), on {eval_set}")
        written += save(folder, {f"matrices{suffix}.png": matrices_picture(labels, list(tasks)),
                                 f"reconstructions{suffix}.png": recs and recs[0]})
    return written
