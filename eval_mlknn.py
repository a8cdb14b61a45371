"""Frozen-encoder evaluation of CoSMAE runs with ML-kNN multi-label classification (paper §III-B).

M.-L. Zhang, Z.-H. Zhou, "ML-KNN: A lazy learning approach to multi-label learning", Pattern Recognition
40(7):2038-2048, 2007.

Protocol (CoSMAE paper §III-B): after each task the encoder is frozen; every image (UCMerced: 256×256 RGB,
resized to 224, normalised, no augmentation, unmasked) becomes the mean of the encoder's output patch tokens;
ML-kNN with k = 10 and smoothing s = 1 is fitted on the 1000 training images and scores the 800 test images;
the paper reports micro-averaged mean average precision (micro mAP, %), macro mAP is printed beside it. The
scores ranked are the ML-kNN posteriors P(H1 | E) (`--scores binary` ranks the 0/1 MAP decisions instead,
as toolkits whose `predict` returns only decisions do; it gives much lower figures).

Run:
    python eval_mlknn.py runs/cosmae                              # every task checkpoint of one run
    python eval_mlknn.py runs/*/seed* --table-out table.md        # several methods × seeds: Table II layout
    python eval_mlknn.py runs/cosmae --ucmerced DATA/UCMerced_LandUse
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors

import cosmae
import rs_data
from rs_data import DataError


# --- ML-kNN (Zhang & Zhou 2007, Fig. 1; step numbers of the pseudo-code) -----------------------------------

def mlknn_scores(train_x, train_y, test_x, k: int = 10, s: float = 1.0) -> np.ndarray:
    """Posterior P(H1_l | E^l_{C_l}) of every label for every test point.
    train_x [m, D], train_y {0,1} [m, Q], test_x [n, D] → [n, Q]. Euclidean neighbours; a training point is
    not its own neighbour."""
    y = np.asarray(train_y).astype(np.int64)
    m, q = y.shape
    # (1)-(2) prior P(H1_l) = (s + Σ_i y_il) / (2s + m)
    prior1 = (s + y.sum(0)) / (2 * s + m)  # [Q]
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train_x)
    # (3)-(8) membership counting vector C_i(l) = Σ_{a ∈ N(x_i)} y_a(l), N(x_i) without x_i itself
    c_train = y[nn.kneighbors(return_distance=False)].sum(1)  # [m, Q], values 0..k
    # (9)-(11) c[l][j] = #{i : y_il = 1, C_i(l) = j}, c'[l][j] = #{i : y_il = 0, C_i(l) = j}
    j = np.arange(k + 1)
    c1 = ((c_train[:, :, None] == j) & (y[:, :, None] == 1)).sum(0)  # [Q, k+1]
    c0 = ((c_train[:, :, None] == j) & (y[:, :, None] == 0)).sum(0)
    # (12)-(13) likelihoods P(E_j | H_b) = (s + c[l][j]) / (s(k+1) + Σ_p c[l][p])
    like1 = (s + c1) / (s * (k + 1) + c1.sum(1, keepdims=True))
    like0 = (s + c0) / (s * (k + 1) + c0.sum(1, keepdims=True))
    # (14)-(17) a test point's counts, then Bayes' rule: the posterior is the ranking score (the MAP decision
    # of step (18) is posterior > 0.5)
    c_test = y[nn.kneighbors(test_x, return_distance=False)].sum(1)  # [n, Q]
    labels = np.arange(q)
    p1 = prior1 * like1[labels, c_test]
    p0 = (1 - prior1) * like0[labels, c_test]
    return p1 / (p1 + p0)


def mlknn_predict(train_x, train_y, test_x, k: int = 10, s: float = 1.0) -> np.ndarray:
    """The MAP decisions of ML-kNN, {0,1} [n, Q]."""
    return (mlknn_scores(train_x, train_y, test_x, k, s) > 0.5).astype(np.int64)


def map_scores(y_true, scores) -> dict:
    """Micro and macro mean average precision in %. Labels without a positive in y_true have no AP: they are
    left out of the macro mean (listed in 'skipped'); micro pools every (image, label) pair."""
    y_true = np.asarray(y_true)
    has_pos = y_true.sum(0) > 0
    micro = average_precision_score(y_true, scores, average="micro")
    macro = average_precision_score(y_true[:, has_pos], np.asarray(scores)[:, has_pos], average="macro")
    return dict(micro=100 * micro, macro=100 * macro, skipped=[int(i) for i in np.flatnonzero(~has_pos)])


# --- the frozen encoder --------------------------------------------------------------------------------------

def evaluate_encoder(model, cfg, eval_set: dict, device=None, k: int = 10, s: float = 1.0,
                     scores: str = "posterior") -> dict:
    """Features of eval_set's train and test tiles → ML-kNN → {'micro', 'macro', 'skipped'} (%)."""
    (train_x, train_y), (test_x, test_y) = eval_set["train"], eval_set["test"]
    f_train = cosmae.extract_features(model, train_x, cfg, device)
    f_test = cosmae.extract_features(model, test_x, cfg, device)
    fn = mlknn_scores if scores == "posterior" else mlknn_predict
    return map_scores(test_y, fn(f_train, train_y, f_test, k, s))


def load_config(run_dir) -> cosmae.Config:
    """The resolved Config a run folder was trained with (config.json)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir} is not a CoSMAE run folder (no config.json)")
    known = {f.name for f in dataclasses.fields(cosmae.Config)}
    return cosmae.Config(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def load_encoder(model: cosmae.MAE, path) -> cosmae.MAE:
    """Load a task checkpoint's encoder weights θ into `model`."""
    ck = cosmae.load_checkpoint(path)
    if "encoder" not in ck:
        raise DataError(f"checkpoint {path} has no 'encoder' entry; is it a CoSMAE task checkpoint?")
    model.load_state_dict(ck["encoder"], strict=False)
    return model


def evaluate_run(run_dir, eval_set: dict, device=None, **kw) -> list:
    """Rows {'task', 'name', 'micro', 'macro'}: the random-init encoder (task 0), then every task checkpoint."""
    cfg = load_config(run_dir)
    cfg.device = device or ("cuda" if cosmae.torch.cuda.is_available() else "cpu")
    checkpoints = cosmae.task_checkpoints(run_dir)
    if not checkpoints:
        raise DataError(f"{run_dir} holds no task checkpoint (task<t>_<name>.pt) yet")
    model = cosmae.build_model(cfg).to(cfg.device)
    rows = [dict(task=0, name="init", **evaluate_encoder(model, cfg, eval_set, cfg.device, **kw))]
    for t, name, path in checkpoints:
        load_encoder(model, path)
        rows.append(dict(task=t, name=name, **evaluate_encoder(model, cfg, eval_set, cfg.device, **kw)))
        print(f"  {run_dir} T{t} {name}: micro mAP {rows[-1]['micro']:.2f}  macro mAP {rows[-1]['macro']:.2f}",
              flush=True)
    return rows


# --- Table II layout: rows methods (mean ± std over seeds), columns tasks, total training hours ---------------

def cell(values: list) -> str:
    """'mean' for one value, 'mean ± std' (population std over seeds) for several, '—' for none."""
    if not values:
        return "—"
    return f"{np.mean(values):.2f}" if len(values) == 1 else f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def format_table(runs: list, metric: str = "micro", caption: str = "") -> str:
    """runs: [{'method', 'tasks', 'rows', 'train_seconds'}], one per run (seed); runs of the same method are
    averaged. → a markdown table: method | init | T1 (name) | ... | train h."""
    tasks = max((r["tasks"] for r in runs), key=len)
    groups = defaultdict(list)
    for r in runs:
        groups[r["method"]].append(r)
    head = ["method", "init"] + [f"T{i} ({n})" for i, n in enumerate(tasks, 1)] + ["train h"]
    lines = [caption] if caption else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, group in groups.items():
        by_task = defaultdict(list)
        for r in group:
            for row in r["rows"]:
                by_task[row["task"]].append(row[metric])
        hours = [r["train_seconds"] / 3600 for r in group if r.get("train_seconds") is not None]
        cells = [cell(by_task[t]) for t in range(len(tasks) + 1)] + [cell(hours)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_eval_set(ucmerced: str, cfg, cache_dir: str = "") -> dict:
    """UCMerced's splits when a folder is given (tile cache inside it by default), else the synthetic set."""
    if ucmerced:
        return rs_data.ucmerced_splits(ucmerced, Path(cache_dir or Path(ucmerced) / ".cosmae_cache"), rs_data.DATA_SEED)
    return rs_data.synthetic_eval_set(cosmae.tile_size(cfg))


# --- CLI ------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="ML-kNN evaluation of every task checkpoint of CoSMAE runs "
                                            "(Zhang & Zhou 2007; paper §III-B).")
    p.add_argument("runs", nargs="+", help="run folders (cosmae.py --out); several seeds of a method are averaged")
    p.add_argument("--ucmerced", default="", help="UCMerced_LandUse folder (default: the synthetic multi-label set)")
    p.add_argument("--cache-dir", default="", help="tile cache of UCMerced (default: inside its folder)")
    p.add_argument("--k", type=int, default=10, help="neighbours (paper: 10)")
    p.add_argument("--s", type=float, default=1.0, help="Laplace smoothing (ML-kNN's default: 1)")
    p.add_argument("--scores", choices=["posterior", "binary"], default="posterior",
                   help="rank the ML-kNN posteriors (default) or its 0/1 decisions")
    p.add_argument("--device", default="", help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--table-out", default="", help="also write the markdown tables to this file")
    args = p.parse_args(argv)
    try:
        runs, eval_sets = [], {}
        for run_dir in args.runs:
            if not Path(run_dir).is_dir():
                raise DataError(f"run folder {run_dir} does not exist")
            cfg = load_config(run_dir)
            key = (args.ucmerced, cosmae.tile_size(cfg))
            if key not in eval_sets:
                eval_sets[key] = load_eval_set(args.ucmerced, cfg, args.cache_dir)
            rows = evaluate_run(run_dir, eval_sets[key], args.device or None, k=args.k, s=args.s, scores=args.scores)
            summary_path = Path(run_dir) / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            runs.append(dict(method=cfg.method, tasks=cfg.tasks, rows=rows, train_seconds=summary.get("train_seconds")))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    src = "UCMerced (800 test images)" if args.ucmerced else "the synthetic multi-label set"
    skipped = sorted({i for r in runs for row in r["rows"] for i in row["skipped"]})
    note = f"; labels {skipped} have no positive test image and are left out of macro mAP" if skipped else ""
    tables = [format_table(runs, m, f"\n{m} mAP (%) of ML-kNN (k={args.k}, s={args.s}, {args.scores} scores) on {src}"
                           f", after each task; mean ± std over seeds{note if m == 'macro' else ''}:\n")
              for m in ("micro", "macro")]
    text = "\n".join(tables)
    print(text)
    if args.table_out:
        Path(args.table_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
