"""The frozen-feature evaluation: after each task the frozen encoder's features are classified with ML-kNN (M.-L.
Zhang, Z.-H. Zhou, Pattern Recognition 40(7), 2007) and scored by mean average precision (mAP): a row of eval.json per
evaluation point. The paper (§III-B) fixes ML-kNN with k = 10 and micro mAP on UCMerced (1000 training / 300
validation / 800 test images); this project's choices: images resized to the model's size, normalised, unmasked; the
mean of the output patch tokens (--pool); Laplace smoothing s = 1. Both mAP kinds: 'posterior' ranks ML-kNN's
posteriors P(H1 | E), 'binary' (★) its 0/1 decisions (probably the paper's: docs/results.md, "Which mAP kind").

    python eval_mlknn.py runs/*/seed* --table-out table.md --figures figs   # tables (mean ± std over seeds), pictures
    python eval_mlknn.py runs/cosmae --ucmerced DATA/UCMerced_LandUse      # the init and every task checkpoint on it
    python eval_mlknn.py [mae_pretrain_vit_base.pth] --ucmerced DATA/UCMerced_LandUse  # a checkpoint, or random init
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors

import reports
import rs_data
import runner
from reports import draw
from rs_data import DataError, atomic_write

K, SMOOTHING = 10, 1.0  # the paper's k; Laplace smoothing s = 1 as in Zhang & Zhou

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
    """Micro (all (image, label) pairs pooled) and macro mAP in %; macro skips labels without a positive."""
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

def device_tiles(tiles, device) -> torch.Tensor:  # a numpy array, a read-only memory map (copied) or a tensor
    return (tiles if torch.is_tensor(tiles) else torch.from_numpy(np.array(tiles))).to(device)


@torch.no_grad()
def extract_features(model, tiles, pool="mean", device="cpu", amp=True, batch_size=256) -> np.ndarray:
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
def reconstruct(model, tiles, mask_ratio=0.75, device="cpu", amp=True, show=2, seed=0, batch_size=256):
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


def evaluation_row(data: dict, features, reconstruct, count_self: bool = False) -> tuple:
    """data: rs_data.evaluation_sets(); features(tiles) → [n, D]; reconstruct(tiles) → (loss, picture). → (row: ML-kNN
    on 'main', 'per_task' = A[t][·] (micro mAP on each task's own set), 'rec_loss' = R[t][·]; the pictures)."""
    def mlknn(s):
        return evaluate_features(features(s["train"][0]), s["train"][1], features(s["test"][0]), s["test"][1],
                                 count_self)

    row = mlknn(data["main"])
    row["per_task"] = [mlknn(s)["micro"] for s in data["own"]] if data["own"] else None
    recs = [reconstruct(tiles) for tiles in data["held_out"]]
    row["rec_loss"] = [loss for loss, _ in recs] or None  # none: no task data (python eval_mlknn.py RUN --ucmerced)
    return row, [pic for _, pic in recs]


def panel_view(panel: np.ndarray, task: str) -> np.ndarray:
    """A picture() panel of a synthetic sensor: its informative band in grey (synth_pan: the mean of the three), the
    removed patches (where the masked input differs from the original) in draw.MASK_COLOR; other tasks: unchanged."""
    if task not in rs_data.SYNTH_TASKS:
        return panel
    band, h = rs_data.SYNTH_TASKS[task], panel.shape[0]
    grey = panel[..., band] if band is not None else np.round(panel.astype(np.float64).mean(-1)).astype(np.uint8)
    out = np.repeat(grey[..., None], 3, -1)
    views = panel[:, :panel.shape[1] // (3 * h) * 3 * h].reshape(h, -1, 3, h, 3)  # [H, tile, view, W, 3]
    out[:, :views.shape[1] * 3 * h].reshape(h, -1, 3, h, 3)[:, :, 1][(views[:, :, 1] != views[:, :, 0]).any(-1)] = \
        draw.MASK_COLOR
    return out


def set_identity(main: dict, ucmerced) -> dict:
    """The evaluation set of a row: what it is, where, how many test images; a fingerprint of its images and labels."""
    digest = hashlib.sha256()
    for part in (*main["train"], *main["test"]):
        digest.update(np.ascontiguousarray(part))
    n = len(main["test"][1])
    what = f"UCMerced ({n} test images) from {Path(ucmerced).resolve()}" if ucmerced else \
        f"the synthetic multi-label set ({n} test images)"
    return dict(eval_set=what, eval_id=digest.hexdigest()[:16])


class Evaluation:
    """The evaluation before task 1 and after every task (a runner.Run callback): a row of eval.json per point (ML-kNN
    on the multi-label set, both kinds; A[t][·] on synthetic tasks; R[t][·]), the pictures; at the end the tables."""

    def __init__(self, cfg, reconstructions: bool = True):
        self.cfg, self.data, self.rows, self.set = cfg, None, [], dict(eval_set="?", eval_id="")
        self.reconstructions = reconstructions  # False: ML-kNN only (no task data needed, no R, no pictures)

    def prepare(self, run, model):
        """Read the evaluation sets (before config.json: a bad --ucmerced leaves no run behind)."""
        cfg, size = self.cfg, rs_data.tile_size(self.cfg.tasks, model.grid * model.p)
        if self.reconstructions:
            self.data = rs_data.evaluation_sets(cfg.tasks, size, cfg.ucmerced, cfg.data_root, cfg.cache_dir,
                                                cfg.treesat_resize)
        else:
            self.data = dict(own=None, held_out=[], main=rs_data.ucmerced_splits(cfg.ucmerced, cfg.cache_dir)
                             if cfg.ucmerced else rs_data.synthetic_eval_set(size, cfg.tasks))
        self.set, self.rows = set_identity(self.data["main"], cfg.ucmerced), read_rows(run.out)

    def mine(self) -> list:
        return [r for r in self.rows if r.get("eval_id") == self.set["eval_id"]]

    def missing(self, run) -> list:  # the points (0: init, t: after task t) without a row on this set
        have = {r["task"] for r in self.mine() if r.get("rec_loss") or not self.reconstructions}
        return [t for t in (0, *(f[0] for f in run.finished)) if t not in have]

    def start(self, run, model):  # evaluate the missing points (resume, another set)
        todo = self.missing(run)
        if 0 in todo:
            self.evaluate(run, 0, "init", model)
        for t, name, path in run.finished:
            if t in todo:
                done = copy.deepcopy(model)
                done.load_state_dict(runner.load_checkpoint(path)["model"])
                self.evaluate(run, t, rs_data.task_name(name), done)  # as task_end names it

    def task_end(self, run, t, model):
        self.evaluate(run, t, rs_data.task_name(self.cfg.tasks[t - 1]), model)

    def evaluate(self, run, t: int, name: str, model):
        if not run.main:
            return
        cfg, t0, run.at = self.cfg, time.time(), f"while evaluating after task {t}"
        row, panels = evaluation_row(self.data, lambda x: extract_features(model, x, cfg.pool, cfg.device, cfg.amp),
                                     lambda x: reconstruct(model, x, cfg.mask_ratio, cfg.device, cfg.amp),
                                     cfg.mlknn_count_self)
        row = dict(task=t, name=name, **self.set, **row)
        if panels:  # a row per task (synthetic sensors: the band in grey), enlarged to ~256 px high
            panels = [panel_view(p, n) for p, n in zip(panels, cfg.tasks)]
            width = max(p.shape[1] for p in panels)  # a task with fewer held-out tiles: its row padded with black
            arr = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in panels], 0)
            img = Image.fromarray(draw.upscale(arr, max(1, 256 // panels[0].shape[0])))
            atomic_write(run.out / f"reconstructions_T{t}.png", lambda tmp: img.save(tmp, format="PNG"))
        self.rows = [r for r in self.rows if (r.get("eval_id"), r["task"]) != (self.set["eval_id"], t)] + [row]
        self.rows.sort(key=lambda r: (r.get("eval_set", ""), r["task"]))
        run.write("eval.json", self.rows)
        reports.write_run_pictures(run.out, cfg.tasks, self.mine(), cfg.method)
        per, rec = (" ".join(f"{v:{f}}" for v in row[k] or []) for k, f in (("per_task", ".1f"), ("rec_loss", ".3f")))
        print(f"eval after {name} ({time.time() - t0:.0f}s): micro mAP {row['micro']:.2f} (of 0/1 decisions "
              f"{row['micro_binary']:.2f})" + (f" | per task {per}" if per else "")
              + (f" | Eq. (1) per task {rec}" if rec else ""), flush=True)

    def end(self, run):
        """The tables of the run; final average mAP, forgetting and BWT into summary.json."""
        if not run.main:
            return
        result = dict(label=self.cfg.method, tasks=self.cfg.tasks, rows=self.mine(), eval_set=self.set["eval_set"],
                      train_seconds=run.summary.get("train_seconds"))
        print(reports.report([result], K))
        if shown := [n for n in ("reconstructions.png", "matrices.png") if (run.out / n).exists()]:
            print(f"\npictures in {run.out}: {', '.join(shown)}, reconstructions_T<t>.png (each evaluation)")
        if reports.has_matrix(result):
            run.summary.update(reports.forgetting_bwt([r["per_task"] for r in result["rows"]]))
            run.write("summary.json", run.summary)


def read_rows(out) -> list:
    """eval.json of a run folder ([] when absent); corrupt or of the wrong shape: one line, exit 2."""
    path, todo = Path(out) / "eval.json", "delete it and evaluate again"
    rows = rs_data.read_json(path, list, f"{todo} (rerun the run's command, or python eval_mlknn.py RUN "
                                         "--ucmerced DIR)") if path.exists() else []
    for r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("task"), int) or \
                not all(isinstance(r.get(k, 0.0), (int, float)) for k in reports.KINDS) or \
                not all(isinstance(r.get(k), (list, type(None))) for k in ("per_task", "rec_loss")):
            raise DataError(f"{path}: expected a JSON list of rows, each with a 'task' number and mAP numbers; "
                            f"got {str(r)[:80]}; {todo}")
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
    config = rs_data.read_json(run_dir / "config.json", dict, "rerun the run's command to rewrite it")
    if not isinstance(config.get("tasks"), list) or not isinstance(config.get("method"), str):
        raise DataError(f"{run_dir / 'config.json'}: no 'method' and 'tasks'; rerun the run's command to rewrite it")
    return config


def load_run(run_dir, not_training=()) -> list:
    """A run folder → an entry per evaluation set in its eval.json: {'label' (the method and the Table I switches off),
    'tasks', 'rows', 'eval_set', 'eval_id', 'train_seconds', 'config' (without `not_training`, seed), 'folder'}."""
    run_dir = Path(run_dir)
    config, rows = read_config(run_dir), read_rows(run_dir)
    if not rows:
        raise DataError(f"{run_dir} has no evaluation yet (no eval.json): rerun its command with --eval, or evaluate "
                        f"its checkpoints on UCMerced: python eval_mlknn.py {run_dir} --ucmerced DIR")
    summary = rs_data.read_json(run_dir / "summary.json", dict) if (run_dir / "summary.json").exists() else {}
    off = [n for n in ("data_mixup", "model_mixup") if config["method"] == "cosmae" and not config.get(n, True)]
    label = config["method"] + "".join(f" --no-{n.replace('_', '-')}" for n in off)
    training = {k: v for k, v in config.items() if k not in (*not_training, "seed", "threads")}
    sets = reports.group_runs(rows, lambda r: (r.get("eval_set", "?"), r.get("eval_id")))
    return [dict(label=label, tasks=config["tasks"], rows=sorted(rs, key=lambda r: r["task"]), eval_set=s, eval_id=i,
                 train_seconds=summary.get("train_seconds"), folder=run_dir, config=training)
            for (s, i), rs in sets.items()]


def evaluate_runs(cosmae, folders: list, ucmerced: str, device: str) -> str:
    """The init and every finished task of each run on UCMerced into its eval.json, under its lock → the set's id."""
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
            print(f"{folder}: {len(ev.missing(run))} of {len(run.finished) + 1} points to evaluate on", ev.set["eval_set"])
            ev.start(run, model)
    return ev.set["eval_id"]


def evaluate_checkpoint(cosmae, path: str, model_name: str, ucmerced: str, device: str, sets: dict) -> list:
    """ML-kNN on UCMerced of a checkpoint (ours or MAE's mae_pretrain_vit_base.pth) or, path '', a random init."""
    ck = runner.load_checkpoint(path, "check the path") if path else {}
    settings = ck.get("settings") if isinstance(ck.get("settings"), dict) else {}
    name = settings.get("model") or model_name
    if name not in cosmae.MODELS:
        raise DataError(f"--model {name}: must be one of {list(cosmae.MODELS)}")
    cfg = cosmae.resolve(cosmae.Config(model=name, device=device, tasks=["us3d"], seed=settings.get("seed", 0)))
    model = cosmae.build_model(cfg).to(cfg.device)
    if path:
        runner.load_init(model, path, what="checkpoint")
    if "main" not in sets:  # read after the checks
        sets["main"] = rs_data.ucmerced_splits(ucmerced)
    data = sets["main"]
    f = [extract_features(model, data[s][0], cfg.pool, cfg.device, cfg.amp) for s in ("train", "test")]
    row = evaluate_features(f[0], data["train"][1], f[1], data["test"][1])
    return [Path(path).name if path else f"{name} (random init, seed {cfg.seed})"] + \
        [f"{row[k]:.2f}" for k in reports.KINDS]


def command(args):
    """The work of the command line (main parses it)."""
    import cosmae  # the command line only: the encoder is cosmae.py's MAE
    out, figures = Path(args.table_out), Path(args.figures)  # checked before any work: never over a run's own files
    if args.table_out and (out.parent / "config.json").exists() and out.suffix != ".md":
        raise DataError(f"--table-out {out}: a file of the run folder {out.parent}; name a .md file or another folder")
    if args.table_out and (out.is_dir() or not out.parent.is_dir() or not rs_data.writable(out.parent)):
        raise DataError(f"--table-out {out}: cannot write a file there; name a file in a writable folder")
    if args.figures and (figures.is_file() or [*figures.glob("config.json"), *figures.glob("seed*/config.json")]):
        raise DataError(f"--figures {figures} is a run folder or a file; name a folder for the pictures")
    device = str(runner.resolve_device(args.device))
    files = [x for x in args.paths if Path(x).is_file()]
    if args.figures and (files or not args.paths):
        raise DataError("--figures draws run folders: name run folders, not checkpoint files")
    pictures = ""
    if files or not args.paths:
        if not args.ucmerced:
            raise DataError("scoring a checkpoint (or a random init) needs --ucmerced DIR")
        sets = {}
        rows = [evaluate_checkpoint(cosmae, f, args.model, args.ucmerced, device, sets) for f in files or [""]]
        text = reports.markdown(["encoder"] + list(reports.KINDS.values()), rows, f"mAP (%) of ML-kNN (k={K}) on "
                                f"{set_identity(sets['main'], args.ucmerced)['eval_set']}:") + "\n" + reports.STAR
    else:
        folders = run_folders(args.paths)
        named = evaluate_runs(cosmae, folders, args.ucmerced, device) if args.ucmerced else None
        not_training = [f.name for f in dataclasses.fields(cosmae.Config) if not f.metadata.get("training", True)]
        runs = [e for f in folders for e in load_run(f, not_training) if named in (None, e["eval_id"])]
        for group in reports.group_runs(runs).values():  # one label, several settings: name the settings that differ
            differ = sorted({k for r in group for k in {*r["config"], *group[0]["config"]}
                             if r["config"].get(k) != group[0]["config"].get(k)})
            for r in group if differ else []:
                r["label"] += " (" + ", ".join(f"{k}={r['config'].get(k)}" for k in differ) + ")"
        text = reports.report_all(runs, K)
        if args.figures:
            drawn = reports.write_figures(runs, figures)
            pictures = "\npictures: " + (", ".join(map(str, drawn)) or "none (no A, R or reconstructions in the runs)")
    print(text + pictures)
    if args.table_out:
        atomic_write(Path(args.table_out), lambda tmp: tmp.write_text(text + "\n"))


def main(argv=None) -> None:
    p = runner.ArgumentParser(description="Tables and pictures of CoSMAE runs (mean ± std over seeds), and the ML-kNN "
                              "evaluation on UCMerced of the checkpoints of runs or of one checkpoint.")
    p.add_argument("paths", nargs="*", help="run folders (a --seeds folder: its seed folders), or checkpoint files")
    p.add_argument("--ucmerced", default="", help="UCMerced folder: score the runs' checkpoints (or the files) on it")
    p.add_argument("--model", default="vit_base", help="a checkpoint's encoder if it does not say; alone: random init")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--table-out", default="", help="also write the tables to this markdown file")
    p.add_argument("--figures", default="", metavar="DIR", help="also draw the runs into DIR: matrices.png (mean A "
                   "and R, a row per label), reconstructions.png (a column per label)")
    runner.cli(command, p.parse_args(argv), interrupted="eval_mlknn: interrupted (the rows written so far are kept; "
               "rerun the command to evaluate the rest)")


if __name__ == "__main__":
    main()
