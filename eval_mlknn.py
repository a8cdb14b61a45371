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
Only the binary kind can be set beside the paper's Tables I and II (README, "Which mAP the paper reports").

The evaluation functions see features, labels and models; they import nothing of cosmae.py. Only the command
line below imports it, to build the encoder of a run or a checkpoint.

Run:
    python eval_mlknn.py runs/cosmae                              # the tables of a finished run (its eval.json)
    python eval_mlknn.py runs/*/seed* --table-out table.md        # methods × seeds: mean ± std
    python eval_mlknn.py runs/grid/* --figures figs               # A, R and reconstructions per method, as PNGs
    python eval_mlknn.py runs/cosmae --ucmerced DATA/UCMerced_LandUse   # evaluate the init and every task
                                                                  # checkpoint on UCMerced (no training data needed)
    python eval_mlknn.py mae_pretrain_vit_base.pth --ucmerced DATA/UCMerced_LandUse   # one checkpoint
    python eval_mlknn.py --model vit_base --ucmerced DATA/UCMerced_LandUse            # a random-init encoder
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors

from reports import draw
import rs_data
import runner
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


# --- A frozen encoder: its features, and Eq. (1) on held-out tiles ------------------------------------------------

def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (as the training), nothing on CPU."""
    return torch.autocast("cuda", torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def device_tiles(tiles, device) -> torch.Tensor:
    """uint8 tiles (a numpy array, a read-only memory map: copied, or a tensor) → a tensor on `device`."""
    return (tiles if torch.is_tensor(tiles) else torch.from_numpy(np.array(tiles))).to(device)


@torch.no_grad()
def extract_features(model, tiles, pool: str = "mean", device="cpu", amp: bool = True,
                     batch_size: int = 256) -> np.ndarray:
    """Frozen features c of uint8 tiles [n, 3, S, S] (resized to the model's size, normalised, no augmentation,
    unmasked; model: cosmae.MAE) → float32 [n, D]."""
    was_training, out, dev = model.training, [], torch.device(device)
    model.eval()
    for i in range(0, len(tiles), batch_size):
        b = device_tiles(tiles[i:i + batch_size], dev)
        with autocast(dev, amp):
            out.append(model.encode(rs_data.augment(b, model.grid * model.p, None), pool).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


@torch.no_grad()
def reconstruct(model, tiles, mask_ratio: float = 0.75, device="cpu", amp: bool = True, show: int = 2,
                seed: int = 0, batch_size: int = 256):
    """Eq. (1) on uint8 tiles (plain resize; masks drawn from `seed`, so every call masks the same patches) →
    (mean loss, uint8 [H, 3·show·W, 3] picture of the first `show` tiles: original | masked | reconstruction)."""
    total, panel, was_training, dev = 0.0, None, model.training, torch.device(device)
    model.eval()
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(tiles), batch_size):
            x = rs_data.augment(device_tiles(tiles[i:i + batch_size], dev), model.grid * model.p, None)
            with autocast(dev, amp):
                loss, pred, mask, _ = model(x, mask_ratio)
            total += float(loss) * len(x)
            panel = panel if panel is not None else picture(model, x[:show], pred[:show].float(), mask[:show])
    model.train(was_training)
    return total / len(tiles), panel


def picture(model, x, pred, mask) -> np.ndarray:
    """MAE's visualisation: original, masked input, reconstruction with the visible patches pasted back, side
    by side → uint8 [H, 3·N·W, 3]. x [N, 3, H, W] normalised, pred [N, L, p²·3], mask [N, L]. In the masked input
    a visible pixel equals the original's and a removed one is the mean colour (0 normalised): panel_view finds
    the removed patches by comparing the two."""
    patches, mask = model.patchify(x), mask[..., None]
    if model.norm_pix_loss:  # the prediction is in per-patch normalised units: undo it with the patch's statistics
        pred = pred * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
    views = [x, model.unpatchify(patches * (1 - mask)), model.unpatchify(patches * (1 - mask) + pred * mask)]
    img = torch.cat([v for triple in zip(*views) for v in triple], 2)
    mean, std = rs_data.mean_std(x.device)
    img = img * std[0] + mean[0]
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


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
    per, rec = " ".join(f"{v:.1f}" for v in row["per_task"] or []), " ".join(f"{v:.3f}" for v in row["rec_loss"] or [])
    return (f"micro mAP {row['micro']:.2f} (of 0/1 decisions {row['micro_binary']:.2f})"
            + (f" | per task {per}" if per else "") + (f" | Eq. (1) per task {rec}" if rec else ""))


def save_picture(path: Path, pictures: list, scale: int = 0):
    """The pictures of every task (uint8 [H, W', 3] each), one task per row → one PNG, written atomically."""
    from PIL import Image
    width = max(p.shape[1] for p in pictures)  # a task with fewer held-out tiles: its row padded with black
    arr = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in pictures], 0)
    scale = scale or max(1, 256 // pictures[0].shape[0])
    im = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


# --- Pictures of a run: every task after every task, and the matrices A and R as heat maps ----------------------
# Drawn from what is on disk (eval.json and the reconstructions_T<t>.png of each evaluation point), so a resumed
# run draws the same pictures as one that never stopped.

def task_band(name: str):
    """The band a task's pictures show: a synthetic sensor's informative band (rs_data.SYNTH_TASKS: 0, 1, 2, or
    None = the mean of the three bands for synth_pan); 'rgb' for real data (the three bands as colour)."""
    return rs_data.SYNTH_TASKS[name] if name in rs_data.SYNTH_TASKS else "rgb"


def band_view(img: np.ndarray, band) -> np.ndarray:
    """uint8 [H, W, 3] → the band in grey, uint8 [H, W, 3]: band 0/1/2 = that channel, None = the mean of the
    three channels (rounded); 'rgb' = the picture unchanged."""
    if band == "rgb":
        return img
    grey = img[..., band] if band is not None else np.round(img.astype(np.float64).mean(-1)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, -1)


def panel_view(panel: np.ndarray, band) -> np.ndarray:
    """A picture() panel [H, 3·n·H, 3] (original | masked | reconstruction of n square tiles) in `band`; in a
    grey view the removed patches of the masked input are painted draw.MASK_COLOR (blue), found as the pixels
    where the masked input differs from the original. 'rgb': unchanged (MAE's grey patches)."""
    if band == "rgb":
        return panel
    h, out = panel.shape[0], band_view(panel, band).copy()
    for k in range(panel.shape[1] // (3 * h)):
        original, masked = panel[:, 3 * k * h:(3 * k + 1) * h], panel[:, (3 * k + 1) * h:(3 * k + 2) * h]
        out[:, (3 * k + 1) * h:(3 * k + 2) * h][(masked != original).any(-1)] = draw.MASK_COLOR
    return out


RECON_CELL = 96  # pixels per view in reconstructions.png (original | masked | reconstruction: 3 views a cell)


def recon_cells(path: Path, n_tasks: int, size: int = RECON_CELL) -> list:
    """The first tile's original | masked | reconstruction of every task (a row each) of a reconstructions_T<t>.png
    → [uint8 [size, 3·size + 6, 3] or None (no picture of that task)] × n_tasks."""
    from PIL import Image
    try:
        arr = np.asarray(Image.open(path).convert("RGB"))
    except (OSError, ValueError):  # missing or unreadable: that column is drawn empty
        return [None] * n_tasks
    h = arr.shape[0] // n_tasks
    if h == 0 or arr.shape[0] != h * n_tasks or arr.shape[1] < 3 * h:
        return [None] * n_tasks
    cells = []
    for j in range(n_tasks):
        views = [arr[j * h:(j + 1) * h, v * h:(v + 1) * h] for v in range(3)]  # square tiles: a view is h wide
        if not any(v.any() for v in views):  # a row padded with black: the task had no held-out tile
            cells.append(None)
            continue
        small = [np.asarray(Image.fromarray(v).resize((size, size), Image.BOX)) for v in views]
        gap = np.full((size, 3, 3), 255, np.uint8)
        cells.append(np.concatenate([small[0], gap, small[1], gap, small[2]], 1))
    return cells


def point_label(t: int) -> str:
    """The name of an evaluation point: init (the random init), after T1, after T2, ..."""
    return "init" if t == 0 else f"after T{t}"


def reconstructions_picture(out, tasks: list, rows: list, size: int = RECON_CELL):
    """reconstructions.png of a run folder: rows = tasks j, columns = the evaluation points (init, after T1, ...)
    that have a row with R and a reconstructions_T<t>.png; each cell the task's first held-out tile: original |
    masked | reconstruction, and R[t][j] under it → (Image, draw.grid_layout) or None (no picture on disk)."""
    points = [r for r in sorted(rows, key=lambda r: r["task"]) if r.get("rec_loss")]
    files = [Path(out) / f"reconstructions_T{r['task']}.png" for r in points]
    if not any(f.is_file() for f in files):
        return None
    columns = [recon_cells(f, len(tasks), size) for f in files]  # [point][task]
    cells = [[col[j] for col in columns] for j in range(len(tasks))]
    notes = [[f"R = {r['rec_loss'][j]:.4f}" if j < len(r["rec_loss"]) and r["rec_loss"][j] is not None else None
              for r in points] for j in range(len(tasks))]
    synth = any(n in rs_data.SYNTH_TASKS for n in tasks)
    subtitle = ("Each cell: the task's first held-out tile, original | masked input | reconstruction (visible patches "
                "pasted back); the same tile and mask in every column.\nUnder it: R[t][j] = Eq. (1) on the task's "
                "held-out tiles (reconstruction_matrix.png). A row that gets worse to the right is forgetting."
                + ("\nSynthetic sensors: the band that holds the scene, in grey (synth_pan: the mean of the three "
                   "bands); removed patches in blue." if synth else ""))
    row_labels = [f"T{j} {n}" for j, n in enumerate(tasks, 1)]
    col_labels = [point_label(r["task"]) for r in points]
    args = ([size * 3 + 6] * len(points), [size] * len(tasks), row_labels, col_labels,
            "Masked reconstructions of every task (rows) after every task (columns)", subtitle, True)
    img = draw.image_grid(cells, *args[2:6], notes=notes)
    return img, draw.grid_layout(*args)


def matrix_values(rows: list, key: str, n_tasks: int) -> list:
    """rows[t][key] as a [points][n_tasks] matrix of floats, None where not measured."""
    return [[(r.get(key) or [])[j] if j < len(r.get(key) or []) else None for j in range(n_tasks)] for r in rows]


def matrix_heatmap(values: list, points: list, tasks: list, key: str, title: str, extra: str = "", vmin=None,
                   vmax=None, with_layout: bool = False):
    """A heat map of A (key 'per_task') or R ('rec_loss'): rows = the encoder after task t (t = points), columns =
    task j, the number in every cell; brighter = better in both (R's colours reversed: a low loss is bright)."""
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


def matrix_range(mats: list, key: str) -> tuple:
    """(min, max) of the values of matrices [(values, points)] of one kind: for R those of the trained rows (t ≥ 1)
    when there are any, for A all of them; (None, None) when there is none."""
    vals = [[v for t, row in zip(points, m) if t > 0 or key == "per_task" for v in row if v is not None]
            for m, points in mats]
    vals = sum(vals, []) or [v for m, _ in mats for row in m for v in row if v is not None]
    return (min(vals), max(vals)) if vals else (None, None)


def save_png(path: Path, img):
    """A picture, written atomically."""
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def run_matrices(tasks: list, rows: list, label: str = "") -> dict:
    """The heat maps of one run's rows (one evaluation set): {'accuracy_matrix.png': (Image, layout)} when A was
    measured (synthetic tasks), {'reconstruction_matrix.png': ...} when R was; a row per evaluation point."""
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
    return pictures


def write_run_pictures(out, tasks: list, rows: list, label: str = "") -> list:
    """reconstructions.png, accuracy_matrix.png (synthetic tasks: A) and reconstruction_matrix.png (R) of a run
    folder, from the rows of one evaluation set and the reconstructions_T<t>.png on disk → the paths written."""
    out, written = Path(out), []
    pic = reconstructions_picture(out, tasks, rows)
    pictures = dict(run_matrices(tasks, rows, label), **({"reconstructions.png": pic} if pic else {}))
    for name, (img, _) in pictures.items():
        save_png(out / name, img)
        written.append(out / name)
    return written


UCMERCED, SYNTHETIC = "UCMerced (800 test images)", "the synthetic multi-label set"  # eval_set of a row


def merge_row(rows: list, row: dict) -> list:
    """eval.json rows with `row` in place of the row of the same evaluation set and task, sorted."""
    keep = [r for r in rows if (r.get("eval_set"), r["task"]) != (row["eval_set"], row["task"])]
    return sorted(keep + [row], key=lambda r: (r.get("eval_set", ""), r["task"]))


class Evaluation:
    """The evaluation of a run before task 1 and after every task (paper §III-B; a callback of runner.Run): one
    row of eval.json per evaluation point (ML-kNN on the multi-label set, both mAP kinds; A[t][·] on synthetic
    tasks; R[t][·]), a picture of the masked reconstructions, and at the end the tables, forgetting and BWT."""

    def __init__(self, cfg, reconstructions: bool = True):
        self.cfg, self.source, self.data = cfg, UCMERCED if cfg.ucmerced else SYNTHETIC, None
        self.reconstructions = reconstructions  # False: ML-kNN only (no task data needed, no R, no pictures)

    def prepare(self, run, model):
        """Read the evaluation sets (before config.json: a bad --ucmerced leaves no run behind)."""
        cfg = self.cfg
        size = rs_data.tile_size(cfg.tasks, model.grid * model.p)
        if self.reconstructions:
            self.data = rs_data.evaluation_sets(cfg.tasks, size, cfg.ucmerced, cfg.data_root, cfg.cache_dir,
                                                cfg.treesat_resize)
        else:
            main = rs_data.ucmerced_splits(cfg.ucmerced, cfg.cache_dir) if cfg.ucmerced else \
                rs_data.synthetic_eval_set(size, cfg.tasks)
            self.data = dict(main=main, own=None, held_out=[])
        self.rows = read_rows(run.out)

    def start(self, run, model):
        """Evaluate the random init and the finished tasks that have no row on this evaluation set (a resume after
        a crash in an evaluation, or a finished run rerun with another --ucmerced)."""
        have = {r["task"] for r in self.rows
                if r.get("eval_set") == self.source and (r.get("rec_loss") or not self.reconstructions)}
        if 0 not in have:
            self.evaluate(run, 0, "init", model)
        for t, name, path, *_ in run.finished:
            if t not in have:
                done = copy.deepcopy(model)
                done.load_state_dict(runner.load_checkpoint(path)["model"])
                self.evaluate(run, t, name, done)

    def task_end(self, run, t, model):
        self.evaluate(run, t, self.cfg.tasks[t - 1], model)

    def evaluate(self, run, t: int, name: str, model):
        if not run.main:
            return
        cfg, t0, run.at = self.cfg, time.time(), f"while evaluating after task {t}"
        row, panels = evaluation_row(self.data, lambda x: extract_features(model, x, cfg.pool, cfg.device, cfg.amp),
                                     lambda x: reconstruct(model, x, cfg.mask_ratio, cfg.device, cfg.amp),
                                     cfg.mlknn_count_self)
        row = dict(task=t, name=name, eval_set=self.source, **row)
        row["rec_loss"] = row["rec_loss"] or None  # none computed: no task data (python eval_mlknn.py RUN ...)
        if panels:  # synthetic sensors: the band that holds the scene, in grey
            panels = [panel_view(p, task_band(n)) for p, n in zip(panels, cfg.tasks)]
            save_picture(run.out / f"reconstructions_T{t}.png", panels)
        self.rows = merge_row(self.rows, row)
        run.write("eval.json", self.rows)
        write_run_pictures(run.out, cfg.tasks, [r for r in self.rows if r.get("eval_set") == self.source], cfg.method)
        print(f"eval after {name} ({time.time() - t0:.0f}s): {row_line(row)}", flush=True)

    def end(self, run):
        """The tables of the run; final average mAP, forgetting and BWT into summary.json."""
        if not run.main:
            return
        rows = [r for r in self.rows if r.get("eval_set") == self.source]
        result = dict(label=self.cfg.method, tasks=self.cfg.tasks, rows=rows, eval_set=self.source,
                      train_seconds=run.summary.get("train_seconds"))
        print(report([result]))
        shown = [n for n in ("reconstructions.png", "accuracy_matrix.png", "reconstruction_matrix.png")
                 if (run.out / n).exists()]
        if shown:
            print(f"\npictures in {run.out}: {', '.join(shown)} (every task after every task; A and R as heat "
                  "maps), reconstructions_T<t>.png (each evaluation)")
        if has_matrix(result):
            run.summary.update(forgetting_bwt([r["per_task"] for r in rows]))
            run.write("summary.json", run.summary)


def read_rows(out) -> list:
    """eval.json of a run folder ([] when absent); corrupt or of the wrong shape: one line, exit 2."""
    path = Path(out) / "eval.json"
    try:
        rows = json.loads(path.read_text()) if path.exists() else []
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e}); delete it and evaluate again (rerun the run's command, or "
                        "python eval_mlknn.py RUN --ucmerced DIR)") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("task"), int) for r in rows):
        raise DataError(f"{path}: expected a JSON list of rows, each with a 'task' number; delete it and evaluate "
                        "again")
    return rows


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


def report(runs: list) -> str:
    """Everything printed at the end of a run (one run) and by the CLI (several: mean ± std over seeds). All runs
    here share one evaluation set and one task list (report_all splits them)."""
    caption = f"\nmAP (%) of ML-kNN (k={K}) on {runs[0]['eval_set']} after each task"
    if len(runs) == 1:
        parts = [run_table(runs[0], caption + ":"), STAR]
    else:
        parts = [format_table(runs, m, f"{caption}: {name} mAP") for m, name in KINDS.items()] + [STAR]
    for label, group in group_runs(runs).items():
        if any(has_matrix(r) for r in group):
            parts.append(format_matrix(group, "per_task", f"\n{label}: accuracy matrix A[t][j] = micro mAP (%) of "
                                                          "ML-kNN on task j's own images and labels, after task t:"))
        if any(r["rows"] and r["rows"][0].get("rec_loss") for r in group):
            parts.append(format_matrix(group, "rec_loss", f"\n{label}: reconstruction matrix R[t][j] = Eq. (1) on task "
                                                          "j's held-out tiles (fixed masks), after task t; label-free, "
                                                          "a rise down a column is forgetting:", digits=4))
    if any(has_matrix(r) for r in runs):
        parts.append(forgetting_table(runs, "\nfrom A: final average mAP, average forgetting (Chaudhry et al. 2018) "
                                            "and backward transfer (Lopez-Paz & Ranzato 2017), micro mAP points; "
                                            "forgetting > 0 and BWT < 0: earlier tasks were forgotten"))
    return "\n".join(parts)


def report_all(runs: list) -> str:
    """The reports of runs grouped by evaluation set and task list: what differs is never averaged together."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["eval_set"], tuple(r["tasks"]))].append(r)
    return "\n\n".join(report(g) for g in groups.values())


# --- Pictures of many runs: A and R per label side by side, the last reconstructions of each label -------------

def mean_matrix(group: list, key: str, n_tasks: int):
    """The mean over the runs (seeds) of one label of rows[t][key][j] → (matrix [points][n_tasks], points, seeds)
    over the evaluation points every run has; (None, [], 0) when no run has the matrix."""
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
    """A row per label (group_runs of one evaluation set and task list): its A and R, each the mean over its runs,
    side by side; one colour scale per matrix kind across the labels → Image, or None (no matrix)."""
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
            panels.append(draw.hstack(row, 24, "bottom"))  # the two grids side by side
    return draw.vstack(panels, 24) if panels else None


def compare_reconstructions(labels: dict, tasks: list, eval_set: str = ""):
    """Rows = tasks, a column per label: every task's first held-out tile at the last evaluation of the label's
    first run (its reconstructions_T<t>.png), R under each → (Image, draw.grid_layout) or None (no picture)."""
    cells, notes, heads = [], [], []
    for label, g in labels.items():
        run = g[0]
        last = max((r for r in run["rows"] if r.get("rec_loss")), key=lambda r: r["task"], default=None)
        if last is None:
            continue
        cells.append(recon_cells(Path(run["folder"]) / f"reconstructions_T{last['task']}.png", len(tasks)))
        notes.append([f"R = {v:.4f}" if v is not None else None
                      for v in matrix_values([last], "rec_loss", len(tasks))[0]])
        heads.append(f"{label}, {point_label(last['task'])}")
    if not any(c is not None for col in cells for c in col):
        return None
    size = RECON_CELL
    args = ([3 * size + 6] * len(cells), [size] * len(tasks), [f"T{j} {n}" for j, n in enumerate(tasks, 1)], heads,
            "The last evaluation of each method: every task's first held-out tile",
            "original | masked input | reconstruction; R[t][j] under each cell; the first run of each label"
            + (f" ({eval_set})" if eval_set else ""), True)
    img = draw.image_grid([list(r) for r in zip(*cells)], *args[2:6], notes=[list(r) for r in zip(*notes)])
    return img, draw.grid_layout(*args)


def write_figures(runs: list, folder: Path) -> list:
    """The pictures of many runs (load_run entries; labelled, grouped by evaluation set and task list as the tables)
    into `folder`: matrices.png (compare_matrices) and reconstructions.png (compare_reconstructions); a second
    group of runs gets the suffix _2, ... → the paths written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--figures {folder}: cannot create the folder ({e.strerror})") from None
    by_set, written = defaultdict(list), []
    for r in runs:
        by_set[(r["eval_set"], tuple(r["tasks"]))].append(r)
    for k, ((eval_set, tasks), group) in enumerate(by_set.items()):
        suffix, labels = "" if k == 0 else f"_{k + 1}", group_runs(group)
        mats, recs = compare_matrices(labels, list(tasks)), compare_reconstructions(labels, list(tasks), eval_set)
        for name, img in ((f"matrices{suffix}.png", mats), (f"reconstructions{suffix}.png", recs and recs[0])):
            if img is not None:
                save_png(folder / name, img)
                written.append(folder / name)
    return written


# --- CLI: tables of finished runs; evaluation of the checkpoints of runs, or of one checkpoint ------------------------

def run_folders(paths: list) -> list:
    """Run folders, each once: a folder of --seeds (OUT holding OUT/seed<s>) stands for its seed folders."""
    folders = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise DataError(f"run folder {p} does not exist")
        seeds = sorted(q for q in p.glob("seed*") if (q / "config.json").exists())
        for q in ([p] if (p / "config.json").exists() or not seeds else seeds):
            if q.resolve() not in [f.resolve() for f in folders]:
                folders.append(q)
    return folders


def read_json(path: Path, kind):
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path.parent} is not a run folder of cosmae.py or baselines.py (no {path.name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e}); rerun the run's command to rewrite it") from None
    if not isinstance(obj, kind):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a JSON {kind.__name__}")
    return obj


def load_run(run_dir) -> list:
    """A run folder → one entry per evaluation set in its eval.json: {'label', 'tasks', 'rows', 'eval_set',
    'train_seconds', 'config', 'folder'}. The label names the method and the Table I switches; runs with the same
    label are seeds of one configuration."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json", dict)
    if not isinstance(config.get("tasks"), list) or not isinstance(config.get("method"), str):
        raise DataError(f"{run_dir / 'config.json'}: no 'method' and 'tasks'; rerun the run's command to rewrite it")
    rows = read_rows(run_dir)
    if not rows:
        raise DataError(f"{run_dir} has no evaluation yet (no eval.json): rerun its command with --eval, or evaluate "
                        f"its checkpoints on UCMerced: python eval_mlknn.py {run_dir} --ucmerced DIR")
    summary = read_json(run_dir / "summary.json", dict) if (run_dir / "summary.json").exists() else {}
    label = config["method"]
    if config["method"] == "cosmae":
        off = [n for n in ("data_mixup", "model_mixup") if not config.get(n, True)]
        label += "".join(f" --no-{n.replace('_', '-')}" for n in off)
    by_set = defaultdict(list)
    for r in rows:
        by_set[r.get("eval_set", "?")].append(r)
    training = {k: v for k, v in config.items() if k not in runner.NOT_TRAINING + ("seed",)}
    return [dict(label=label, tasks=config["tasks"], rows=sorted(rs, key=lambda r: r["task"]), eval_set=s,
                 train_seconds=summary.get("train_seconds"), folder=run_dir, config=training)
            for s, rs in by_set.items()]


def run_config(run_dir: Path, device: str):
    """The resolved cosmae.Config of a run folder (its config.json), on `device`."""
    import cosmae  # the command line only: the encoder is cosmae.py's MAE
    config = read_json(run_dir / "config.json", dict)
    names = {f.name for f in dataclasses.fields(cosmae.Config)}
    cfg = cosmae.Config(**{k: v for k, v in config.items() if k in names})
    cfg.device = device
    return cfg


def evaluate_runs(folders: list, ucmerced: str, device: str):
    """Evaluate the init and every finished task of each run on UCMerced (both mAP kinds) into its eval.json,
    holding the run's lock; the training data need not be there (no reconstruction matrix)."""
    import cosmae
    for folder in folders:
        cfg = cosmae.resolve(run_config(folder, device))
        cfg.ucmerced, cfg.out = ucmerced, str(folder)
        with runner.Run(cfg) as run:
            if not run.finished and not (folder / "config.json").exists():
                raise DataError(f"{folder} holds no finished task")
            model = cosmae.build_model(cfg).to(cfg.device)
            if cfg.init:
                runner.load_init(model, cfg.init)
            ev = Evaluation(cfg, reconstructions=False)
            ev.prepare(run, model)
            print(f"{folder}: evaluating the init and {len(run.finished)} task checkpoint(s) on {ev.source}")
            ev.start(run, model)


def evaluate_checkpoint(path: str, model_name: str, ucmerced: str, device: str) -> list:
    """ML-kNN on UCMerced of one encoder: a checkpoint (this project's, or facebookresearch/mae's
    mae_pretrain_vit_base.pth) or, path '', the random init of `model_name` → a table row."""
    import cosmae
    ck = runner.load_checkpoint(path, "check the path") if path else {}
    settings = ck.get("settings") if isinstance(ck.get("settings"), dict) else {}
    name = settings.get("model") or model_name
    if name not in cosmae.MODELS:
        raise DataError(f"--model {name}: must be one of {list(cosmae.MODELS)}")
    cfg = cosmae.resolve(cosmae.Config(model=name, device=device, tasks=["us3d"], seed=settings.get("seed", 0)))
    model = cosmae.build_model(cfg).to(cfg.device)
    if path:
        runner.load_init(model, path, what="checkpoint")
    data = rs_data.ucmerced_splits(ucmerced)
    row, _ = evaluation_row(dict(main=data, own=None, held_out=[]),
                            lambda x: extract_features(model, x, cfg.pool, cfg.device, cfg.amp), None)
    return [Path(path).name if path else f"{name} (random init, seed {cfg.seed})"] + [f"{row[k]:.2f}" for k in KINDS]


def main(argv=None) -> None:
    p = runner.ArgumentParser(description="Tables of CoSMAE runs (Table II layout, both mAP kinds, accuracy and "
                                "reconstruction matrices, forgetting, BWT; mean ± std over seeds), and the ML-kNN "
                                "evaluation on UCMerced of the checkpoints of runs or of one checkpoint.",
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="*", help="run folders (cosmae.py --out; a --seeds folder = its seed folders), or "
                   "checkpoint files (.pt/.pth)")
    p.add_argument("--ucmerced", default="", help="UCMerced_LandUse folder: evaluate the init and every task "
                   "checkpoint of the runs (or the checkpoint files) on it")
    p.add_argument("--model", default="vit_base", help="the encoder of a checkpoint that does not record it (e.g. "
                   "mae_pretrain_vit_base.pth); alone with --ucmerced: score its random init")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--table-out", default="", help="also write the tables to this markdown file")
    p.add_argument("--figures", default="", metavar="DIR", help="also draw the runs (each label averaged over its "
                   "seeds) into DIR: matrices.png (A and R\nas heat maps, a row per label) and reconstructions.png "
                   "(every task after the last task, a column per label)")
    args = p.parse_args(argv)
    try:
        if args.table_out:  # checked before the work
            out = Path(args.table_out)
            if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK) or \
                    (out.exists() and not os.access(out, os.W_OK)):
                raise DataError(f"--table-out {out}: cannot write a file there; name a file in a writable folder")
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if args.device == "auto" else args.device)
        runner.check_device(device)
        files = [x for x in args.paths if Path(x).is_file()]
        if args.figures and (files or not args.paths):
            raise DataError("--figures draws run folders: name run folders, not checkpoint files")
        if args.figures and (Path(args.figures).exists() and not Path(args.figures).is_dir()):
            raise DataError(f"--figures {args.figures} is a file; name a folder")
        if files or not args.paths:
            if not args.ucmerced:
                raise DataError("scoring a checkpoint (or a random init) needs --ucmerced DIR")
            rows = [evaluate_checkpoint(f, args.model, args.ucmerced, device) for f in files or [""]]
            text = markdown(["encoder"] + list(KINDS.values()), rows,
                            f"mAP (%) of ML-kNN (k={K}) on {UCMERCED}:") + "\n" + STAR
        else:
            folders = run_folders(args.paths)
            if args.ucmerced:
                evaluate_runs(folders, args.ucmerced, device)
            runs = [entry for f in folders for entry in load_run(f)]
            for group in group_runs(runs).values():  # one label, several settings: tell them apart by folder
                if any(r["config"] != group[0]["config"] for r in group):
                    for r in group:  # OUT/seed<s> folders of --seeds are named by OUT
                        f = r["folder"]
                        r["label"] += f" ({f.parent.name if f.name.startswith('seed') else f.name})"
            text = report_all(runs)
            if args.figures:
                drawn = write_figures(runs, Path(args.figures))
                pictures = "\npictures: " + (", ".join(map(str, drawn)) or "none (no A, R or reconstruction in "
                                                                           "these runs' evaluations)")
        print(text + (pictures if args.figures else ""))
        if args.table_out:
            atomic_write(Path(args.table_out), lambda tmp: tmp.write_text(text + "\n"))
    except DataError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)


if __name__ == "__main__":
    main()
