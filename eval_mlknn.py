"""The frozen-feature evaluation: after each task the encoder is frozen and its features classified with ML-kNN
(M.-L. Zhang, Z.-H. Zhou, Pattern Recognition 40(7), 2007), scored by mean average precision (mAP); a row of
eval.json per evaluation point and the run's pictures (reports/ draws them and writes the tables).

The paper (§III-B) fixes: the frozen encoder as feature extractor, ML-kNN with k = 10, micro mAP on UCMerced (1000
training / 300 validation / 800 test images). This project's choices, which the paper does not state: images resized
to the model's size (224 for ViT-B/16), normalised, unaugmented, unmasked; the feature is the mean of the output
patch tokens (--pool); Laplace smoothing s = 1 (Zhang & Zhou's); ML-kNN fitted on the 1000 training images and
scored on the 800 test images. The paper does not say which scores its mAP ranks, so both kinds are computed:
    posterior  the ML-kNN posteriors P(H1 | E) are ranked (the proper reading of mAP);
    binary     the 0/1 MAP decisions are ranked (what toolkits whose predict() returns decisions give).
The binary kind is probably the paper's (a guess from its numbers: README, "Which mAP the paper reports"), so it is
the one to set beside the paper's Tables I and II. Only the command line imports cosmae.py (to build an encoder).

Run:
    python eval_mlknn.py runs/cosmae                              # the tables of a finished run (its eval.json)
    python eval_mlknn.py runs/*/seed* --table-out table.md        # methods × seeds: mean ± std
    python eval_mlknn.py runs/grid/* --figures figs               # A, R and reconstructions per method, as PNGs
    python eval_mlknn.py runs/cosmae --ucmerced DATA/UCMerced_LandUse   # the init and every task checkpoint on it
    python eval_mlknn.py mae_pretrain_vit_base.pth --ucmerced DATA/UCMerced_LandUse   # one checkpoint
    python eval_mlknn.py --model vit_base --ucmerced DATA/UCMerced_LandUse            # a random-init encoder
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors

import reports
import rs_data
import runner
from reports import draw
from rs_data import DataError, atomic_write

K, SMOOTHING = 10, 1.0  # the paper's k; Laplace smoothing s = 1 as in Zhang & Zhou
UCMERCED, SYNTHETIC = "UCMerced (800 test images)", "the synthetic multi-label set"  # eval_set of a row

# --- ML-kNN (Zhang & Zhou 2007, Fig. 1; step numbers of the pseudo-code) -----------------------------------

def mlknn_scores(train_x, train_y, test_x, k: int = K, s: float = SMOOTHING, count_self: bool = False) -> np.ndarray:
    """Posterior P(H1_l | E^l_{C_l}): train_x [m, D], train_y {0,1} [m, Q], test_x [n, D] → [n, Q]. Euclidean
    neighbours; a training point is not its own neighbour (Zhang & Zhou's N(x_i)) unless count_self (as
    scikit-multilearn's MLkNN)."""
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
    """Micro (every (image, label) pair pooled) and macro mAP in %; labels without a positive are left out of the
    macro mean ('skipped')."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    has_pos = y_true.sum(0) > 0
    micro = average_precision_score(y_true, scores, average="micro")
    macro = average_precision_score(y_true[:, has_pos], scores[:, has_pos], average="macro")
    return dict(micro=100 * micro, macro=100 * macro, skipped=[int(i) for i in np.flatnonzero(~has_pos)])


def evaluate_features(f_train, y_train, f_test, y_test, count_self: bool = False) -> dict:
    """ML-kNN on frozen features → mAP (%): 'micro', 'macro' rank the posteriors, '*_binary' the 0/1 decisions."""
    for name, f in (("training", f_train), ("test", f_test)):
        if not np.isfinite(f).all():
            raise DataError(f"the encoder gives non-finite features for {int((~np.isfinite(f)).any(1).sum())} "
                            f"{name} images: its weights are broken (NaN/inf); evaluate an earlier checkpoint")
    post = mlknn_scores(f_train, y_train, f_test, count_self=count_self)
    posterior, binary = map_scores(y_test, post), map_scores(y_test, post > 0.5)
    return dict(micro=posterior["micro"], macro=posterior["macro"], micro_binary=binary["micro"],
                macro_binary=binary["macro"], skipped=posterior["skipped"])


# --- A frozen encoder: its features, and Eq. (1) on held-out tiles ------------------------------------------------

def device_tiles(tiles, device) -> torch.Tensor:
    """uint8 tiles (a numpy array, a read-only memory map: copied, or a tensor) → a tensor on `device`."""
    return (tiles if torch.is_tensor(tiles) else torch.from_numpy(np.array(tiles))).to(device)


@torch.no_grad()
def extract_features(model, tiles, pool: str = "mean", device="cpu", amp: bool = True,
                     batch_size: int = 256) -> np.ndarray:
    """Frozen features of uint8 tiles [n, 3, S, S] (resized to the model's size, normalised, unmasked) → [n, D]."""
    was_training, out, dev = model.training, [], torch.device(device)
    model.eval()
    for i in range(0, len(tiles), batch_size):
        b = device_tiles(tiles[i:i + batch_size], dev)
        with runner.autocast(dev, amp):
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
            with runner.autocast(dev, amp):
                loss, pred, mask, _ = model(x, mask_ratio)
            total += float(loss) * len(x)
            panel = panel if panel is not None else picture(model, x[:show], pred[:show].float(), mask[:show])
    model.train(was_training)
    return total / len(tiles), panel


def picture(model, x, pred, mask) -> np.ndarray:
    """MAE's visualisation: original | masked input (removed = mean colour) | reconstruction with the visible
    patches pasted back, for each tile → uint8 [H, 3·N·W, 3]. x [N, 3, H, W] normalised, pred [N, L, p²·3]."""
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
    """data: rs_data.evaluation_sets() ('main', 'own', 'held_out'); features(tiles) → [n, D]; reconstruct(tiles) →
    (loss, picture). → (row: ML-kNN on 'main', 'per_task' = A[t][·] (posterior micro mAP on each task's own set),
    'rec_loss' = R[t][·]; the pictures)."""
    def mlknn(s):
        return evaluate_features(features(s["train"][0]), s["train"][1], features(s["test"][0]), s["test"][1],
                                 count_self)

    row = mlknn(data["main"])
    row["per_task"] = [mlknn(s)["micro"] for s in data["own"]] if data["own"] else None
    recs = [reconstruct(tiles) for tiles in data["held_out"]]
    row["rec_loss"] = [loss for loss, _ in recs]
    return row, [pic for _, pic in recs]


def save_picture(path: Path, pictures: list, scale: int = 0):
    """The pictures of every task (uint8 [H, W', 3] each), a row each, enlarged to ~256 px high → one PNG."""
    from PIL import Image
    width = max(p.shape[1] for p in pictures)  # a task with fewer held-out tiles: its row padded with black
    arr = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in pictures], 0)
    scale = scale or max(1, 256 // pictures[0].shape[0])
    im = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def task_band(name: str):
    """A synthetic sensor's informative band (0, 1, 2; None for synth_pan: the mean of the three); 'rgb' otherwise."""
    return rs_data.SYNTH_TASKS[name] if name in rs_data.SYNTH_TASKS else "rgb"


def band_view(img: np.ndarray, band) -> np.ndarray:
    """uint8 [H, W, 3] → the band (task_band) in grey [H, W, 3]; 'rgb': unchanged."""
    if band == "rgb":
        return img
    grey = img[..., band] if band is not None else np.round(img.astype(np.float64).mean(-1)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, -1)


def panel_view(panel: np.ndarray, band) -> np.ndarray:
    """A picture() panel in `band`, the removed patches (where the masked input differs from the original) painted
    draw.MASK_COLOR (blue); 'rgb': unchanged (MAE's grey patches)."""
    if band == "rgb":
        return panel
    h, out = panel.shape[0], band_view(panel, band).copy()
    for k in range(panel.shape[1] // (3 * h)):
        original, masked = panel[:, 3 * k * h:(3 * k + 1) * h], panel[:, (3 * k + 1) * h:(3 * k + 2) * h]
        out[:, (3 * k + 1) * h:(3 * k + 2) * h][(masked != original).any(-1)] = draw.MASK_COLOR
    return out


class Evaluation:
    """The evaluation before task 1 and after every task (a runner.Run callback): a row of eval.json per point (ML-kNN
    on the multi-label set, both kinds; A[t][·] on synthetic tasks; R[t][·]), the pictures; at the end the tables."""

    def __init__(self, cfg, reconstructions: bool = True):
        self.cfg, self.source, self.data = cfg, UCMERCED if cfg.ucmerced else SYNTHETIC, None
        self.reconstructions = reconstructions  # False: ML-kNN only (no task data needed, no R, no pictures)

    def prepare(self, run, model):
        """Read the evaluation sets (before config.json: a bad --ucmerced leaves no run behind)."""
        cfg, size = self.cfg, rs_data.tile_size(self.cfg.tasks, model.grid * model.p)
        if self.reconstructions:
            self.data = rs_data.evaluation_sets(cfg.tasks, size, cfg.ucmerced, cfg.data_root, cfg.cache_dir,
                                                cfg.treesat_resize)
        else:
            main = rs_data.ucmerced_splits(cfg.ucmerced, cfg.cache_dir) if cfg.ucmerced else \
                rs_data.synthetic_eval_set(size, cfg.tasks)
            self.data = dict(main=main, own=None, held_out=[])
        self.rows = read_rows(run.out)

    def start(self, run, model):
        """Evaluate the init and the finished tasks without a row on this eval set (resume, another --ucmerced)."""
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
        keep = [r for r in self.rows if (r.get("eval_set"), r["task"]) != (self.source, t)]  # a row replaced
        self.rows = sorted(keep + [row], key=lambda r: (r.get("eval_set", ""), r["task"]))
        run.write("eval.json", self.rows)
        reports.write_run_pictures(run.out, cfg.tasks, [r for r in self.rows if r.get("eval_set") == self.source],
                                   cfg.method)
        per = " ".join(f"{v:.1f}" for v in row["per_task"] or [])
        rec = " ".join(f"{v:.3f}" for v in row["rec_loss"] or [])
        print(f"eval after {name} ({time.time() - t0:.0f}s): micro mAP {row['micro']:.2f} (of 0/1 decisions "
              f"{row['micro_binary']:.2f})" + (f" | per task {per}" if per else "")
              + (f" | Eq. (1) per task {rec}" if rec else ""), flush=True)

    def end(self, run):
        """The tables of the run; final average mAP, forgetting and BWT into summary.json."""
        if not run.main:
            return
        rows = [r for r in self.rows if r.get("eval_set") == self.source]
        result = dict(label=self.cfg.method, tasks=self.cfg.tasks, rows=rows, eval_set=self.source,
                      train_seconds=run.summary.get("train_seconds"))
        print(reports.report([result], K))
        if shown := [n for n in ("reconstructions.png", "accuracy_matrix.png", "reconstruction_matrix.png")
                     if (run.out / n).exists()]:
            print(f"\npictures in {run.out}: {', '.join(shown)} (every task after every task; A and R as heat "
                  "maps), reconstructions_T<t>.png (each evaluation)")
        if reports.has_matrix(result):
            run.summary.update(reports.forgetting_bwt([r["per_task"] for r in rows]))
            run.write("summary.json", run.summary)


def read_rows(out) -> list:
    """eval.json of a run folder ([] when absent); corrupt or of the wrong shape: one line, exit 2."""
    path, todo = Path(out) / "eval.json", "delete it and evaluate again"
    rows = rs_data.read_json(path, object, f"{todo} (rerun the run's command, or python eval_mlknn.py RUN "
                                           "--ucmerced DIR)") if path.exists() else []
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("task"), int) for r in rows):
        raise DataError(f"{path}: expected a JSON list of rows, each with a 'task' number; {todo}")
    return rows


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


def read_config(run_dir: Path) -> dict:
    if not (run_dir / "config.json").exists():
        raise DataError(f"{run_dir} is not a run folder of cosmae.py or baselines.py (no config.json)")
    return rs_data.read_json(run_dir / "config.json", dict, "rerun the run's command to rewrite it")


def load_run(run_dir, not_training=()) -> list:
    """A run folder → an entry per evaluation set in its eval.json: {'label', 'tasks', 'rows', 'eval_set',
    'train_seconds', 'config' (without `not_training` and the seed), 'folder'}; the label names the method and the
    Table I switches turned off."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if not isinstance(config.get("tasks"), list) or not isinstance(config.get("method"), str):
        raise DataError(f"{run_dir / 'config.json'}: no 'method' and 'tasks'; rerun the run's command to rewrite it")
    rows = read_rows(run_dir)
    if not rows:
        raise DataError(f"{run_dir} has no evaluation yet (no eval.json): rerun its command with --eval, or evaluate "
                        f"its checkpoints on UCMerced: python eval_mlknn.py {run_dir} --ucmerced DIR")
    summary = rs_data.read_json(run_dir / "summary.json", dict) if (run_dir / "summary.json").exists() else {}
    label = config["method"]
    if config["method"] == "cosmae":
        off = [n for n in ("data_mixup", "model_mixup") if not config.get(n, True)]
        label += "".join(f" --no-{n.replace('_', '-')}" for n in off)
    training = {k: v for k, v in config.items() if k not in (*not_training, "seed")}
    return [dict(label=label, tasks=config["tasks"], rows=sorted(rs, key=lambda r: r["task"]), eval_set=s,
                 train_seconds=summary.get("train_seconds"), folder=run_dir, config=training)
            for s, rs in reports.group_runs(rows, lambda r: r.get("eval_set", "?")).items()]


def evaluate_runs(cosmae, folders: list, ucmerced: str, device: str):
    """The init and every finished task of each run on UCMerced into its eval.json, under the run's lock (the
    training data need not be there: no R). cosmae: the module, imported by command()."""
    for folder in folders:
        config, names = read_config(folder), {f.name for f in dataclasses.fields(cosmae.Config)}
        cfg = cosmae.resolve(cosmae.Config(**{k: v for k, v in config.items() if k in names and k != "device"},
                                           device=device))
        cfg.ucmerced, cfg.out = ucmerced, str(folder)
        with runner.Run(cfg) as run:
            model = cosmae.build_model(cfg).to(cfg.device)
            if cfg.init:
                runner.load_init(model, cfg.init)
            ev = Evaluation(cfg, reconstructions=False)
            ev.prepare(run, model)
            print(f"{folder}: evaluating the init and {len(run.finished)} task checkpoint(s) on {ev.source}")
            ev.start(run, model)


def evaluate_checkpoint(cosmae, path: str, model_name: str, ucmerced: str, device: str) -> list:
    """ML-kNN on UCMerced of one encoder: a checkpoint (this project's, or facebookresearch/mae's
    mae_pretrain_vit_base.pth) or, path '', the random init of `model_name` → a table row."""
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
    f = [extract_features(model, data[s][0], cfg.pool, cfg.device, cfg.amp) for s in ("train", "test")]
    row = evaluate_features(f[0], data["train"][1], f[1], data["test"][1])
    return [Path(path).name if path else f"{name} (random init, seed {cfg.seed})"] + \
        [f"{row[k]:.2f}" for k in reports.KINDS]


def command(args):
    """The work of the command line (main parses it)."""
    import cosmae  # the command line only: the encoder is cosmae.py's MAE
    if args.table_out:  # checked before the work
        out = Path(args.table_out)
        if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK) or \
                (out.exists() and not os.access(out, os.W_OK)):
            raise DataError(f"--table-out {out}: cannot write a file there; name a file in a writable folder")
    device = str(runner.resolve_device(args.device))
    files = [x for x in args.paths if Path(x).is_file()]
    if args.figures and (files or not args.paths):
        raise DataError("--figures draws run folders: name run folders, not checkpoint files")
    if args.figures and (Path(args.figures).exists() and not Path(args.figures).is_dir()):
        raise DataError(f"--figures {args.figures} is a file; name a folder")
    pictures = ""
    if files or not args.paths:
        if not args.ucmerced:
            raise DataError("scoring a checkpoint (or a random init) needs --ucmerced DIR")
        rows = [evaluate_checkpoint(cosmae, f, args.model, args.ucmerced, device) for f in files or [""]]
        text = reports.markdown(["encoder"] + list(reports.KINDS.values()), rows,
                                f"mAP (%) of ML-kNN (k={K}) on {UCMERCED}:") + "\n" + reports.STAR
    else:
        folders = run_folders(args.paths)
        if args.ucmerced:
            evaluate_runs(cosmae, folders, args.ucmerced, device)
        not_training = [f.name for f in dataclasses.fields(cosmae.Config) if not f.metadata.get("training", True)]
        runs = [entry for f in folders for entry in load_run(f, not_training)]
        for group in reports.group_runs(runs).values():  # one label, several settings: tell them apart by folder
            if any(r["config"] != group[0]["config"] for r in group):
                for r in group:  # OUT/seed<s> folders of --seeds are named by OUT
                    f = r["folder"]
                    r["label"] += f" ({f.parent.name if f.name.startswith('seed') else f.name})"
        text = reports.report_all(runs, K)
        if args.figures:
            drawn = reports.write_figures(runs, Path(args.figures))
            none = "none (no A, R or reconstruction in these runs' evaluations)"
            pictures = "\npictures: " + (", ".join(map(str, drawn)) or none)
    print(text + pictures)
    if args.table_out:
        atomic_write(Path(args.table_out), lambda tmp: tmp.write_text(text + "\n"))


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
    runner.cli(command, p.parse_args(argv))


if __name__ == "__main__":
    main()
