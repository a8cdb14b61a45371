"""What is measured after every task: ML-kNN multi-label classification on frozen features (paper §III-B),
the per-task accuracy matrix with average forgetting and backward transfer, and the tables of many runs.

M.-L. Zhang, Z.-H. Zhou, "ML-KNN: A lazy learning approach to multi-label learning", Pattern Recognition
40(7):2038-2048, 2007.  Forgetting: A. Chaudhry et al., "Riemannian walk for incremental learning", ECCV 2018.
Backward transfer: D. Lopez-Paz, M. Ranzato, "Gradient episodic memory for continual learning", NeurIPS 2017.

Protocol (CoSMAE paper §III-B): after each task the encoder is frozen; every image (UCMerced: 256×256 RGB,
resized to 224, normalised, no augmentation, unmasked) becomes the mean of the encoder's output patch tokens;
ML-kNN with k = 10 and smoothing s = 1 is fitted on the 1000 training images and scores the 800 test images.
The paper reports micro-averaged mean average precision (micro mAP, %) without saying which scores it ranks.
Both kinds are computed everywhere:
    posterior  the ML-kNN posteriors P(H1 | E) are ranked (the proper reading of mAP);
    binary     the 0/1 MAP decisions are ranked (what toolkits whose predict() returns decisions give).
Only the binary kind can be set beside the paper's Table II: on the real UCMerced a random-init ViT-B/16 gives
about 70 micro mAP of the posterior kind, above every row of Table II, and about 48 of the binary kind, just
under the paper's 49.11 after task 1 (README, "Which mAP the paper reports").

This file imports nothing of cosmae.py (cosmae.py imports it): it sees features, labels and result rows.

Run (tables of finished runs, read from their eval.json):
    python eval_mlknn.py runs/cosmae                              # one run
    python eval_mlknn.py runs/*/seed* --table-out table.md        # methods × seeds: mean ± std
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors

from rs_data import DataError, atomic_write

K, SMOOTHING = 10, 1.0  # the paper's k; Laplace smoothing s = 1 as in Zhang & Zhou


# --- ML-kNN (Zhang & Zhou 2007, Fig. 1; step numbers of the pseudo-code) -----------------------------------

def mlknn_scores(train_x, train_y, test_x, k: int = K, s: float = SMOOTHING, count_self: bool = False) -> np.ndarray:
    """Posterior P(H1_l | E^l_{C_l}) of every label for every test point.
    train_x [m, D], train_y {0,1} [m, Q], test_x [n, D] → [n, Q]. Euclidean neighbours. A training point is not
    its own neighbour while the likelihoods are counted (Zhang & Zhou's N(x_i)); count_self = True counts it,
    as scikit-multilearn's MLkNN does."""
    y = np.asarray(train_y).astype(np.int64)
    m, q = y.shape
    # (1)-(2) prior P(H1_l) = (s + Σ_i y_il) / (2s + m)
    prior1 = (s + y.sum(0)) / (2 * s + m)  # [Q]
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train_x)
    # (3)-(8) membership counting vector C_i(l) = Σ_{a ∈ N(x_i)} y_a(l)
    own = nn.kneighbors(train_x if count_self else None, return_distance=False)  # [m, k]
    c_train = y[own].sum(1)  # [m, Q], values 0..k
    # (9)-(11) c[l][j] = #{i : y_il = 1, C_i(l) = j}, c'[l][j] = #{i : y_il = 0, C_i(l) = j}
    j = np.arange(k + 1)
    c1 = ((c_train[:, :, None] == j) & (y[:, :, None] == 1)).sum(0)  # [Q, k+1]
    c0 = ((c_train[:, :, None] == j) & (y[:, :, None] == 0)).sum(0)
    # (12)-(13) likelihoods P(E_j | H_b) = (s + c[l][j]) / (s(k+1) + Σ_p c[l][p])
    like1 = (s + c1) / (s * (k + 1) + c1.sum(1, keepdims=True))
    like0 = (s + c0) / (s * (k + 1) + c0.sum(1, keepdims=True))
    # (14)-(17) a test point's counts, then Bayes' rule: the posterior (the MAP decision of (18) is > 0.5)
    c_test = y[nn.kneighbors(test_x, return_distance=False)].sum(1)  # [n, Q]
    labels = np.arange(q)
    p1 = prior1 * like1[labels, c_test]
    p0 = (1 - prior1) * like0[labels, c_test]
    return p1 / (p1 + p0)


def map_scores(y_true, scores) -> dict:
    """Micro and macro mean average precision in %. Labels without a positive in y_true have no AP: they are
    left out of the macro mean (listed in 'skipped'); micro pools every (image, label) pair."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    has_pos = y_true.sum(0) > 0
    micro = average_precision_score(y_true, scores, average="micro")
    macro = average_precision_score(y_true[:, has_pos], scores[:, has_pos], average="macro")
    return dict(micro=100 * micro, macro=100 * macro, skipped=[int(i) for i in np.flatnonzero(~has_pos)])


def evaluate_features(f_train, y_train, f_test, y_test, count_self: bool = False) -> dict:
    """ML-kNN on frozen features → micro / macro mAP (%) of both kinds: {'micro', 'macro'} rank the posteriors,
    {'micro_binary', 'macro_binary'} rank the 0/1 decisions (the kind comparable with the paper's tables)."""
    for name, f in (("training", f_train), ("test", f_test)):
        if not np.isfinite(f).all():
            raise DataError(f"the encoder gives non-finite features for {int((~np.isfinite(f)).any(1).sum())} "
                            f"{name} images: its weights are broken (NaN/inf); evaluate an earlier checkpoint")
    post = mlknn_scores(f_train, y_train, f_test, count_self=count_self)
    posterior, binary = map_scores(y_test, post), map_scores(y_test, post > 0.5)
    return dict(micro=posterior["micro"], macro=posterior["macro"], micro_binary=binary["micro"],
                macro_binary=binary["macro"], skipped=posterior["skipped"])


# --- One evaluation point: the row of eval.json ----------------------------------------------------------------

def evaluation_row(data: dict, features, reconstruct, count_self: bool = False) -> tuple:
    """data: rs_data.evaluation_sets() (the multi-label set 'main', each task's own labelled set 'own' or None,
    each task's held-out tiles 'held_out'); features(tiles) → [n, D] frozen features; reconstruct(tiles) →
    (Eq. (1) loss with fixed masks, picture). → (row, pictures): the row holds ML-kNN on 'main' (both mAP kinds),
    'per_task' = A[t][·] (micro mAP of the posterior kind on each task's own set) and 'rec_loss' = R[t][·]."""
    def mlknn(s):
        return evaluate_features(features(s["train"][0]), s["train"][1], features(s["test"][0]), s["test"][1],
                                 count_self)

    row = mlknn(data["main"])
    row["per_task"] = [mlknn(s)["micro"] for s in data["own"]] if data["own"] else None
    recs = [reconstruct(tiles) for tiles in data["held_out"]]
    row["rec_loss"] = [loss for loss, _ in recs]
    return row, [pic for _, pic in recs]


def row_line(row: dict) -> str:
    """One printed line of a row."""
    per = " ".join(f"{v:.1f}" for v in row["per_task"] or [])
    return (f"micro mAP {row['micro']:.2f} (of 0/1 decisions {row['micro_binary']:.2f})" + (f" | per task {per}" if per
            else "") + " | Eq. (1) per task " + " ".join(f"{v:.3f}" for v in row["rec_loss"]))


def save_picture(path: Path, pictures: list, scale: int = 0):
    """The pictures of every task (uint8 [H, W', 3] each), one task per row → one PNG, written atomically."""
    from PIL import Image
    width = max(p.shape[1] for p in pictures)  # a task with fewer held-out tiles: its row padded with black
    arr = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in pictures], 0)
    scale = scale or max(1, 256 // pictures[0].shape[0])
    im = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


# --- Continual-learning measures of an accuracy matrix ------------------------------------------------------

def forgetting_bwt(a) -> dict:
    """a [T+1, T]: a[t][j] = mAP on task j+1 after task t (row 0: random init). With A[t][j] in the paper-style
    1-based indices (task j learnt at row j):
        final average mAP   = 1/T Σ_j A[T][j]
        average forgetting  = 1/(T−1) Σ_{j<T} max_{t∈j..T−1} A[t][j] − A[T][j]     (Chaudhry et al. 2018)
        backward transfer   = 1/(T−1) Σ_{j<T} A[T][j] − A[j][j]                    (Lopez-Paz & Ranzato 2017)
    Forgetting > 0: the final encoder is worse on old tasks than it once was; BWT < 0: worse than right after
    learning them. With one task both are undefined (None)."""
    a = np.asarray(a, dtype=np.float64)
    t_last = a.shape[1]
    old = range(1, t_last)  # tasks j = 1..T−1 (1-based), column j−1
    forgetting = [max(a[t][j - 1] for t in range(j, t_last)) - a[t_last][j - 1] for j in old]
    bwt = [a[t_last][j - 1] - a[j][j - 1] for j in old]
    return dict(final_avg_map=float(a[t_last].mean()), avg_forgetting=float(np.mean(forgetting)) if old else None,
                bwt=float(np.mean(bwt)) if old else None)


# --- Tables: Table II layout, accuracy and reconstruction matrices, forgetting -------------------------------

def cell(values: list, digits: int = 2) -> str:
    """'mean' for one value, 'mean ± std' (population std over seeds) for several, '—' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m = f"{np.mean(values):.{digits}f}"
    return m if len(values) == 1 else f"{m} ± {np.std(values):.{digits}f}"


def markdown(head: list, rows: list, caption: str = "") -> str:
    lines = [caption] if caption else []
    return "\n".join(lines + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def group_runs(runs: list) -> dict:
    """{label: [runs]}: runs that differ only by seed form one group (their mean ± std)."""
    groups = defaultdict(list)
    for r in runs:
        groups[r["label"]].append(r)
    return groups


def format_table(runs: list, metric: str = "micro", caption: str = "") -> str:
    """runs: [{'label', 'tasks', 'rows', 'train_seconds'}] → method | init | T1 (name) | ... | train h, the
    layout of the paper's Table II (training hours; seconds when every run took less than an hour); rows of one
    label are averaged over seeds."""
    tasks = max((r["tasks"] for r in runs), key=len)
    hours = max((r.get("train_seconds") or 0) for r in runs) >= 3600  # the paper's unit; seconds for short runs
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
    """The matrix rows[t][key][j] of one group of runs (mean ± std over seeds): row 'after T<t>' (row 0: init),
    column 'task j'."""
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


def has_matrix(run: dict) -> bool:
    """True when the run evaluated every task's own set before task 1 and after each of its tasks."""
    rows = run["rows"]
    return len(rows) == len(run["tasks"]) + 1 and all(row.get("per_task") for row in rows)


KINDS = {"micro": "micro", "macro": "macro", "micro_binary": "micro ★", "macro_binary": "macro ★"}
STAR = ("★ ranks ML-kNN's 0/1 decisions: the kind to set beside the paper's Tables I and II; the others rank its "
        "posteriors (README, 'Which mAP the paper reports')")


def run_table(run: dict, caption: str = "") -> str:
    """One run's rows: encoder (init, after T1, ...) | the four mAPs."""
    rows = [["init (random)" if r["task"] == 0 else f"after T{r['task']} ({r['name']})"]
            + [f"{r[k]:.2f}" for k in KINDS] for r in run["rows"]]
    return markdown(["encoder"] + list(KINDS.values()), rows, caption)


def report(runs: list, source: str) -> str:
    """Everything printed at the end of a run (one run) and by the CLI (several: mean ± std over seeds)."""
    caption = f"\nmAP (%) of ML-kNN (k={K}) on {source} after each task"
    if len(runs) == 1:
        parts = [run_table(runs[0], caption + ":"), STAR]
    else:
        parts = [format_table(runs, m, f"{caption}: {name} mAP") for m, name in KINDS.items()] + [STAR]
    for label, group in group_runs(runs).items():
        if any(has_matrix(r) for r in group):
            parts.append(format_matrix(group, "per_task", f"\n{label}: accuracy matrix A[t][j] = micro mAP (%) of ML-kNN "
                                                          "on task j's own images and labels, after task t:"))
        if any(r["rows"] and r["rows"][0].get("rec_loss") for r in group):
            parts.append(format_matrix(group, "rec_loss", f"\n{label}: reconstruction matrix R[t][j] = Eq. (1) on task "
                                                          "j's held-out tiles (fixed masks), after task t; label-free, "
                                                          "a rise down a column is forgetting:", digits=4))
    if any(has_matrix(r) for r in runs):
        parts.append(forgetting_table(runs, "\nfrom A: final average mAP, average forgetting (Chaudhry et al. 2018) and "
                                            "backward transfer (Lopez-Paz & Ranzato 2017), micro mAP points; forgetting "
                                            "> 0 and BWT < 0: earlier tasks were forgotten"))
    return "\n".join(parts)


# --- CLI: tables of finished runs --------------------------------------------------------------------------

NOT_TRAINING = ("out", "seeds", "device", "eval", "log_every", "save_every", "data_root", "cache_dir", "compile",
                "ucmerced", "mlknn_count_self")  # settings that do not change what is trained: a resume may change them


def load_run(run_dir) -> dict:
    """A run folder → {'label', 'tasks', 'rows', 'train_seconds', 'config'}. The label names the method and the
    Table I switches; runs with the same label are seeds of one configuration."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist")
    try:
        config = json.loads((run_dir / "config.json").read_text())
        rows = json.loads((run_dir / "eval.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    except FileNotFoundError as e:
        raise DataError(f"{run_dir} is not an evaluated run folder (no {Path(e.filename).name}); rerun its "
                        "cosmae.py command with --eval to evaluate its task checkpoints") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{run_dir}: a JSON file is corrupt ({e}); rerun its cosmae.py command to rewrite it") from None
    label = config["method"]
    if config["method"] == "cosmae":
        off = [n for n in ("data_mixup", "model_mixup") if not config.get(n, True)]
        label += "".join(f" --no-{n.replace('_', '-')}" for n in off)
    return dict(label=label, tasks=config["tasks"], rows=rows, train_seconds=summary.get("train_seconds"),
                folder=run_dir, config={k: v for k, v in config.items() if k not in NOT_TRAINING + ("seed",)})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Tables of CoSMAE runs: Table II layout (both mAP kinds), accuracy "
                                            "and reconstruction matrices, forgetting and BWT; mean ± std over seeds.")
    p.add_argument("runs", nargs="+", help="run folders (cosmae.py --out); runs that differ only by seed are averaged")
    p.add_argument("--table-out", default="", help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in args.runs]
        for group in group_runs(runs).values():  # one label, several settings: tell them apart by folder
            if any(r["config"] != group[0]["config"] for r in group):
                for r in group:  # OUT/seed<s> folders of --seeds are named by OUT
                    f = r["folder"]
                    r["label"] += f" ({f.parent.name if f.name.startswith('seed') else f.name})"
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sources = {r["rows"][0].get("eval_set", "?") if r["rows"] else "?" for r in runs}
    text = report(runs, " / ".join(sorted(sources)))
    print(text)
    if args.table_out:
        Path(args.table_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
