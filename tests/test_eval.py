"""The evaluation (eval_mlknn.py: ML-kNN, both mAP kinds, the per-task callback, the command line) and the tables
and pictures of runs (reports/)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cosmae
import eval_mlknn
import reports
import rs_data
import runner
from cosmae import Config
from conftest import ROOT, make_datasets, make_ucmerced, tiny_cfg, train
from reports import draw


def test_forgetting_and_bwt_of_a_hand_checkable_matrix():
    """Rows: init, after T1, T2, T3; columns: tasks 1-3.
    final avg = (60 + 50 + 90) / 3 = 66.67.
    forgetting: task 1: max(A[1][1], A[2][1]) − A[3][1] = max(70, 80) − 60 = 20; task 2: A[2][2] − A[3][2] = 60 − 50
    = 10 → 15.   BWT: task 1: A[3][1] − A[1][1] = 60 − 70 = −10; task 2: 50 − 60 = −10 → −10."""
    a = [[10, 10, 10], [70, 20, 20], [80, 60, 30], [60, 50, 90]]
    r = reports.forgetting_bwt(a)
    assert math.isclose(r["final_avg_map"], 200 / 3) and r["avg_forgetting"] == 15 and r["bwt"] == -10
    assert reports.forgetting_bwt([[1.0], [2.0]]) == dict(final_avg_map=2.0, avg_forgetting=None, bwt=None)
    up = reports.forgetting_bwt([[0, 0], [50, 0], [60, 70]])  # task 1 improved later: forgetting < 0, BWT > 0
    assert up["avg_forgetting"] == -10 and up["bwt"] == 10


def test_reconstruction_loss_uses_fixed_masks(small_eval):
    cfg = cosmae.resolve(Config(model="vit_test", device="cpu"))
    model, tiles = cosmae.build_model(cfg), rs_data.synth_task("synth_red", 10, 37, 0)[0]
    torch.manual_seed(1)
    a = eval_mlknn.reconstruct(model, tiles, cfg.mask_ratio)
    torch.manual_seed(2)  # whatever the global RNG: the same masks
    b = eval_mlknn.reconstruct(model, tiles, cfg.mask_ratio)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[1].shape == (32, 6 * 32, 3)
    assert eval_mlknn.reconstruct(model, tiles, cfg.mask_ratio, seed=5)[0] != a[0]


def test_run_evaluates_every_task_and_a_rerun_with_eval_fills_the_missing_rows(tmp_path, small_eval):
    train(tiny_cfg(tmp_path))  # trained without evaluation
    rows = train(tiny_cfg(tmp_path, eval=True))["eval"]  # the same run, rerun with --eval
    assert [r["task"] for r in rows] == [0, 1, 2]
    fresh = train(tiny_cfg(tmp_path, eval=True, out=str(tmp_path / "fresh")))["eval"]
    for a, b in zip(rows, fresh):
        assert math.isclose(a["micro"], b["micro"]) and a["rec_loss"] == pytest.approx(b["rec_loss"])
    for r in fresh:
        assert {"micro", "macro", "micro_binary", "macro_binary"} <= set(r)
        assert len(r["per_task"]) == 2 and len(r["rec_loss"]) == 2  # A[t][·], R[t][·]: one column per task
        assert all(0 <= v <= 100 for v in r["per_task"]) and all(v > 0 for v in r["rec_loss"])
    summary = json.loads((tmp_path / "fresh" / "summary.json").read_text())
    want = reports.forgetting_bwt([r["per_task"] for r in fresh])
    assert all(math.isclose(summary[k], want[k]) for k in ("final_avg_map", "avg_forgetting", "bwt"))
    for t in range(3):
        w, h = Image.open(tmp_path / "fresh" / f"reconstructions_T{t}.png").size
        assert h == 2 * 32 * 8 and w == 6 * 32 * 8  # a row per task, 2 × (original, masked, reconstruction)


def mlknn_loop(train_x, train_y, test_x, k, s):
    """ML-kNN written out point by point (Zhang & Zhou 2007, Fig. 1)."""
    m, q = train_y.shape
    dist = lambda a, b: math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))
    neigh = lambda x, skip: sorted((i for i in range(m) if i != skip), key=lambda i: dist(x, train_x[i]))[:k]
    train_neigh = [neigh(train_x[i], i) for i in range(m)]
    out = np.zeros((len(test_x), q))
    for l in range(q):
        prior1 = (s + sum(train_y[i, l] for i in range(m))) / (2 * s + m)
        c1, c0 = [0] * (k + 1), [0] * (k + 1)
        for i in range(m):
            count = sum(train_y[a, l] for a in train_neigh[i])
            (c1 if train_y[i, l] == 1 else c0)[count] += 1
        for n, x in enumerate(test_x):
            count = sum(train_y[a, l] for a in neigh(x, None))
            p1 = prior1 * (s + c1[count]) / (s * (k + 1) + sum(c1))
            p0 = (1 - prior1) * (s + c0[count]) / (s * (k + 1) + sum(c0))
            out[n, l] = p1 / (p1 + p0)
    return out


@pytest.mark.parametrize("k,s", [(1, 1.0), (3, 1.0), (10, 0.5)])
def test_mlknn_matches_loop_reference(k, s):
    rng = np.random.default_rng(k)
    train_x, test_x = rng.normal(size=(40, 3)), rng.normal(size=(7, 3))
    train_y = (rng.random((40, 4)) < [0.5, 0.2, 0.8, 0.0]).astype(int)
    assert np.allclose(eval_mlknn.mlknn_scores(train_x, train_y, test_x, k, s),
                       mlknn_loop(train_x, train_y, test_x, k, s), atol=1e-12)


def test_mlknn_hand_checkable_example_with_a_label_that_never_occurs():
    """x = 0, 1, 3, 10, 12 with label A = 1, 1, 0, 0, 0 and label B never present; k = 1, s = 1.
    Nearest other point: 0→1, 1→0, 3→1, 10→12, 12→10, so C_A = 1, 1, 1, 0, 0.
    A: prior 3/7; c1 = [0, 2], c0 = [2, 1]; P(E|H1) = [1/4, 3/4], P(E|H0) = [3/5, 2/5].
       test 0.4 (neighbour x=0, C=1): (3/7·3/4) / (3/7·3/4 + 4/7·2/5) = 45/77;
       test 11.2 (neighbour x=12, C=0): (3/7·1/4) / (3/7·1/4 + 4/7·3/5) = 5/21.
    B: prior 1/7; c1 = [0, 0] → P(E|H1) = [1/2, 1/2]; c0 = [5, 0] → P(E|H0) = [6/7, 1/7]; C = 0:
       (1/7·1/2) / (1/7·1/2 + 6/7·6/7) = 7/79 for both test points."""
    train_x = np.array([[0.0], [1.0], [3.0], [10.0], [12.0]])
    train_y = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [0, 0]])
    got = eval_mlknn.mlknn_scores(train_x, train_y, np.array([[0.4], [11.2]]), k=1, s=1.0)
    assert np.allclose(got, [[45 / 77, 7 / 79], [5 / 21, 7 / 79]])


def test_mlknn_duplicate_points_exclude_only_themselves():
    """x = 0, 0, 5, 6 with A = 1, 0, 1, 1, k = 1: each copy of 0 has the OTHER copy as neighbour, so
    C = 0, 1, 1, 1; c1 = [1, 2], c0 = [0, 1]; prior 2/3; test 5.4 (neighbour 5, C = 1):
    (2/3·3/5) / (2/3·3/5 + 1/3·2/3) = 9/14. (Counting a point as its own neighbour would give 24/29.)"""
    got = eval_mlknn.mlknn_scores(np.array([[0.0], [0.0], [5.0], [6.0]]), np.array([[1], [0], [1], [1]]),
                                  np.array([[5.4]]), k=1, s=1.0)
    assert np.allclose(got, [[9 / 14]])


def test_both_map_kinds_rank_posteriors_and_decisions():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 2)), (rng.random((30, 3)) < 0.5).astype(int)
    post = eval_mlknn.mlknn_scores(x, y, x[:10])  # k = 10, as the evaluation
    r = eval_mlknn.evaluate_features(x, y, x[:10], y[:10])
    assert math.isclose(r["micro"], eval_mlknn.map_scores(y[:10], post)["micro"])
    assert math.isclose(r["micro_binary"], eval_mlknn.map_scores(y[:10], post > 0.5)["micro"])
    assert math.isclose(r["macro_binary"], eval_mlknn.map_scores(y[:10], post > 0.5)["macro"])
    y_true = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    perfect = eval_mlknn.map_scores(y_true, y_true * 0.9 + 0.05)
    assert perfect["micro"] == 100 and perfect["macro"] == 100 and perfect["skipped"] == [2]
    scores = rng.random((3, 3))
    from sklearn.metrics import average_precision_score
    got = eval_mlknn.map_scores(y_true, scores)
    assert math.isclose(got["micro"], 100 * average_precision_score(y_true.ravel(), scores.ravel()))
    per_label = [average_precision_score(y_true[:, i], scores[:, i]) for i in (0, 1)]
    assert math.isclose(got["macro"], 100 * np.mean(per_label))
    with pytest.raises(rs_data.DataError, match="non-finite features"):
        eval_mlknn.evaluate_features(np.full((4, 2), np.nan), y[:4], x[:2], y[:2])


def test_mlknn_count_self_counts_each_training_point_as_its_own_neighbour():
    """x = 0, 1, 5, 6 with A = 1, 0, 1, 1, k = 1, counting self (scikit-multilearn's MLkNN): each point's one
    neighbour is itself, C = y = 1, 0, 1, 1; c1 = [0, 3], c0 = [1, 0]; prior 2/3; P(E|H1) = [1/5, 4/5],
    P(E|H0) = [2/3, 1/3]; test 5.4 (neighbour 5, C = 1): (2/3·4/5) / (2/3·4/5 + 1/3·1/3) = 24/29."""
    x, y = np.array([[0.0], [1.0], [5.0], [6.0]]), np.array([[1], [0], [1], [1]])
    assert np.allclose(eval_mlknn.mlknn_scores(x, y, np.array([[5.4]]), k=1, s=1.0, count_self=True), [[24 / 29]])
    assert not np.allclose(eval_mlknn.mlknn_scores(x, y, np.array([[5.4]]), k=1, s=1.0), [[24 / 29]])


def fake_run(label, micro, per_task=None, seconds=3600.0):
    rows = [dict(task=t, micro=v, macro=v, micro_binary=v / 2, macro_binary=v / 2, rec_loss=[0.5, 0.4],
                 per_task=per_task[t] if per_task else None) for t, v in enumerate(micro)]
    return dict(label=label, tasks=["a", "b"], rows=rows, train_seconds=seconds, eval_set="s")


def test_table_writer_layout_with_seeds_and_hours():
    runs = [fake_run("finetune", (40, 50, 60)), fake_run("cosmae", (40, 50, 64), seconds=7200),
            fake_run("cosmae", (40, 52, 66), seconds=9000)]
    assert reports.format_table(runs) == (
        "| method | init | T1 (a) | T2 (b) | train h |\n"
        "|---|---|---|---|---|\n"
        "| finetune | 40.00 | 50.00 | 60.00 | 1.00 |\n"
        "| cosmae | 40.00 ± 0.00 | 51.00 ± 1.00 | 65.00 ± 1.00 | 2.25 ± 0.25 |")
    short = reports.format_table([fake_run("x", (1, 2, 3), seconds=290.4)], "micro_binary")
    assert short.endswith("| x | 0.50 | 1.00 | 1.50 | 290 |") and "train s" in short


def test_forgetting_table_and_matrices_mean_and_std_over_seeds():
    a1 = [[10, 10], [70, 20], [60, 80]]  # forgetting 10, BWT −10, final 70
    a2 = [[10, 10], [70, 20], [50, 80]]  # forgetting 20, BWT −20, final 65
    runs = [fake_run("ft", (1, 2, 3), a1, 100), fake_run("ft", (1, 2, 3), a2, 300)]
    table = reports.report(runs)
    assert table.splitlines()[-1] == "| ft | 67.50 ± 2.50 | 15.00 ± 5.00 | -15.00 ± 5.00 | 200 ± 100 |"
    matrix = reports.format_matrix(runs, "per_task")
    assert "| after T2 (b) | 55.00 ± 5.00 | 80.00 ± 0.00 |" in matrix and "| init (random) |" in matrix


def test_eval_cli_tables_of_runs_and_seeds(tmp_path, capsys, small_eval):
    cosmae.main(["--tasks", "synth_red", "synth_green", "--model", "vit_test", "--epochs", "1", "--batch-size", "8",
                 "--synth-train", "32", "--memory-size", "20", "--device", "cpu", "--seeds", "0", "1",
                 "--out", str(tmp_path / "co")])
    capsys.readouterr()
    seeds = [str(tmp_path / "co" / "seed0"), str(tmp_path / "co" / "seed1")]
    eval_mlknn.main(seeds + ["--table-out", str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    assert "| cosmae |" in table and "T2 (synth_green)" in table and " ± " in table
    assert "micro ★ mAP" in table and "Table" in table and "avg forgetting" in table and "R[t][j]" in table
    capsys.readouterr()
    eval_mlknn.main([str(tmp_path / "co")])  # the --seeds folder: its seed folders
    assert capsys.readouterr().out.strip() == table.strip()
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path / "missing")])
    assert e.value.code == 2 and f"run folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path / "empty")])
    assert e.value.code == 2 and "is not a run folder of cosmae.py or baselines.py (no config.json)" in \
        capsys.readouterr().err


def test_eval_file_does_not_import_the_method_file():
    """Data flows one way: eval_mlknn imports reports, runner and rs_data, none of which imports cosmae (or
    eval_mlknn); eval_mlknn imports cosmae only inside its command line."""
    import ast
    for path in ("eval_mlknn.py", "reports/__init__.py", "reports/draw.py", "rs_data/__init__.py",
                 "runner/__init__.py"):
        tree = ast.parse((ROOT / path).read_text())
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "command"
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "cosmae" in names or (path.startswith("reports") and "eval_mlknn" in names):
                assert path == "eval_mlknn.py" and id(node) in inside, (path, node.lineno)


def test_eval_cli_scores_the_checkpoints_of_a_run_whose_training_data_is_gone(tmp_path, capsys, monkeypatch):
    import shutil
    import conftest
    import tifffile
    monkeypatch.setattr(conftest, "write_packbits_tiled", tifffile.imwrite)  # Potsdam is not read here: written fast
    make_datasets(tmp_path / "d")
    make_ucmerced(tmp_path / "U")
    run, ucm = tmp_path / "run", str(tmp_path / "U")
    cosmae.main(["--tasks", "us3d", "treesat", "--data-root", str(tmp_path / "d"), "--model", "vit_test",
                 "--epochs", "1", "--batch-size", "2", "--warmup-epochs", "0.5", "--no-eval", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "c"), "--out", str(run)])
    shutil.rmtree(tmp_path / "d")
    shutil.rmtree(tmp_path / "c")
    capsys.readouterr()
    eval_mlknn.main([str(run), "--ucmerced", ucm])
    out = capsys.readouterr().out
    rows = json.loads((run / "eval.json").read_text())
    label = f"UCMerced (16 test images) from {tmp_path / 'U'}"  # 42 images: 20 train, 6 val, 16 test
    assert [(r["task"], r["eval_set"]) for r in rows] == [(t, label) for t in (0, 1, 2)]
    assert all(r["rec_loss"] is None and 0 <= r["micro"] <= 100 and 0 <= r["micro_binary"] <= 100 for r in rows)
    assert "T2 (treesat)" in out and label in out and "3 of 3 points to evaluate" in out
    eval_mlknn.main([str(run), "--ucmerced", ucm])  # evaluated: nothing again, the same rows
    assert json.loads((run / "eval.json").read_text()) == rows and "0 of 3 points" in capsys.readouterr().out
    make_ucmerced(tmp_path / "V", n_per_class=15)  # another set: its own rows, its table alone
    capsys.readouterr()
    eval_mlknn.main([str(run), "--ucmerced", str(tmp_path / "V")])
    out, both = capsys.readouterr().out, json.loads((run / "eval.json").read_text())
    other = [r for r in both if r not in rows]
    assert len(both) == 6 and len(other) == 3 and rows[0]["eval_id"] not in {r["eval_id"] for r in other}
    assert "UCMerced (18 test images) from" in out and label not in out
    assert f"| after T2 (treesat) | {other[2]['micro']:.2f} |" in out
    eval_mlknn.main([str(run / "task2_treesat.pt"), "--ucmerced", ucm])  # one task checkpoint
    assert f"| task2_treesat.pt | {rows[2]['micro']:.2f} | {rows[2]['macro']:.2f} |" in capsys.readouterr().out
    enc = torch.load(run / "task2_treesat.pt", weights_only=True)["encoder"]  # facebookresearch/mae's layout
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")
    eval_mlknn.main([str(tmp_path / "mae_pretrain.pth"), "--ucmerced", ucm, "--model", "vit_test"])
    assert f"| mae_pretrain.pth | {rows[2]['micro']:.2f} |" in capsys.readouterr().out
    eval_mlknn.main(["--model", "vit_test", "--ucmerced", ucm])  # the floor: a random-init encoder
    assert f"| vit_test (random init, seed 0) | {rows[0]['micro']:.2f} |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path / "mae_pretrain.pth")])
    assert e.value.code == 2 and "needs --ucmerced" in capsys.readouterr().err


def fake_folder(folder, tasks, sets, **config):
    """A run folder with config.json and eval.json rows of each (eval_set, eval_id) in sets, per task."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(method="cosmae", tasks=tasks, seed=0, **config)))
    rows = [dict(task=t, name="x", eval_set=s, eval_id=i, micro=50.0 + t, macro=40.0, micro_binary=30.0,
                 macro_binary=20.0, per_task=None, rec_loss=None) for s, i in sets for t in range(len(tasks) + 1)]
    (folder / "eval.json").write_text(json.dumps(rows))


SYN, UCM = ("the synthetic multi-label set (800 test images)", "a"), ("UCMerced (800 test images) from /u", "b")


def test_eval_tables_never_mix_evaluation_sets_or_task_lists_and_count_a_folder_once(tmp_path, capsys):
    fake_folder(tmp_path / "a", ["t1", "t2"], [SYN, UCM])
    fake_folder(tmp_path / "b", ["t1", "t2", "t3"], [SYN])
    fake_folder(tmp_path / "c", ["t1", "t2"], [(UCM[0], "other images")])  # the same label, another set
    eval_mlknn.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a") + "/", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert out.count("on the synthetic multi-label set (800 test images) after each task") == 2  # a's, b's tasks
    assert out.count(f"on {UCM[0]} after each task") == 2 and " ± " not in out  # a counted once, c apart


def test_only_runs_of_equal_settings_form_a_row_and_unfinished_seeds_are_noted(tmp_path, capsys):
    fake_folder(tmp_path / "x" / "run", ["t1", "t2"], [SYN], lr=0.0015, out="x/run")
    fake_folder(tmp_path / "y" / "run", ["t1", "t2"], [SYN], lr=0.002, out="y/run")
    fake_folder(tmp_path / "z" / "run", ["t1", "t2"], [SYN], lr=0.002, out="z/run")
    rows = json.loads((tmp_path / "z" / "run" / "eval.json").read_text())
    (tmp_path / "z" / "run" / "eval.json").write_text(json.dumps(rows[:2]))  # a seed that stopped after T1
    eval_mlknn.main([str(tmp_path / d / "run") for d in "xyz"])
    out = capsys.readouterr().out
    assert "| cosmae (lr=0.0015) | 50.00 | 51.00 | 52.00 |" in out  # `out` is not a training setting
    assert "| cosmae (lr=0.002) (1 of 2 seeds finished) | 50.00 ± 0.00 | 51.00 ± 0.00 | 52.00 |" in out


def test_outputs_over_a_run_unwritable_outputs_broken_rows_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
    fake_folder(tmp_path / "run", ["t1"], [SYN])
    fake_folder(tmp_path / "seeds" / "seed0", ["t1"], [SYN])
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    for flags, message in ((["--table-out", str(tmp_path / "run" / "eval.json")], "a file of the run folder"),
                           (["--table-out", "/proc/x.md"], "cannot write a file there"),
                           (["--figures", str(tmp_path / "run")], "is a run folder"),
                           (["--figures", str(tmp_path / "seeds")], "is a run folder")):
        with pytest.raises(SystemExit) as e:
            eval_mlknn.main([str(tmp_path / "run")] + flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    eval_mlknn.main([str(tmp_path / "run"), "--table-out", str(tmp_path / "run" / "table.md")])  # a .md in it: fine
    for rows in ('[{"task": 0, "micro": "high"}]', '[{"task": 0, "per_task": 3}]', '[[1]]'):
        (tmp_path / "run" / "eval.json").write_text(rows)
        with pytest.raises(SystemExit) as e:
            eval_mlknn.main([str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "eval.json: expected a JSON list of rows" in err and len(err.splitlines()) == 1
    monkeypatch.setattr(eval_mlknn, "load_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path / "run")])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == \
        "eval_mlknn: interrupted (the rows written so far are kept; rerun the command to evaluate the rest)"


def test_panel_view_shows_the_informative_band_in_grey_and_paints_the_removed_patches():
    h = 4
    original = np.random.default_rng(0).integers(0, 255, (h, h, 3), dtype=np.uint8)
    masked = original.copy()
    masked[:2, :2] = (124, 116, 104)  # a removed patch: MAE's mean colour
    panel = np.concatenate([original, masked, original] * 2, 1)  # two tiles
    for name, band in (("synth_red", 0), ("synth_green", 1), ("synth_blue", 2)):
        out, grey = eval_mlknn.panel_view(panel, name), original[..., band:band + 1]
        assert (out[:2, h:h + 2] == draw.MASK_COLOR).all() and (out[:2, 4 * h:4 * h + 2] == draw.MASK_COLOR).all()
        assert (out[2:, h:2 * h] == grey[2:]).all() and (out[:, :h] == grey).all()
    pan = eval_mlknn.panel_view(panel, "synth_pan")[:, :h]
    assert (pan == np.round(original.mean(-1, keepdims=True))).all()  # the mean of the bands, grey
    assert eval_mlknn.panel_view(panel, "potsdam") is panel


def picture_cfg(tmp_path, **kw):
    base = dict(tasks=["synth_pan", "synth_red"], model="vit_test", epochs=1, batch_size=8, synth_train=32,
                memory_size=20, log_every=2, out=str(tmp_path / "run"), device="cpu", warmup_epochs=0.5,
                mim_form="simclr")
    return cosmae.resolve(cosmae.Config(**{**base, **kw}))


def run_with_eval(cfg):
    """A run as `python cosmae.py` makes it, in process, with its evaluation callback."""
    with runner.Run(cfg, callbacks=[eval_mlknn.Evaluation(cfg)]) as r:
        cosmae.train(cfg, r)


def recon_boxes(folder, rows: list, tasks: list) -> list:
    """Where reports.recon_picture puts the cells of these rows' reconstructions (the boxes do not depend on the
    title's or the column labels' text)."""
    points = [(folder, r) for r in rows if r.get("rec_loss")]
    return reports.recon_picture(points, tasks, ["c"] * len(points), "t")[1]["boxes"]


def check_run_pictures(out: Path, tasks: list, points: int):
    """reconstructions.png: a row per task, a column per evaluation point, each cell its task's row of
    reconstructions_T<t>.png (the band in grey, removed patches blue); matrices.png: A | R; both drawn again from
    eval.json: the same pictures."""
    rows = eval_mlknn.read_rows(out)
    drawn = reports.write_run_pictures(out, tasks, rows, "cosmae")
    assert list(drawn) == ["matrices.png", "reconstructions.png"]
    for name, img in drawn.items():
        assert np.array_equal(np.asarray(Image.open(out / name).convert("RGB")), np.asarray(img))
    on_disk, lay = np.asarray(drawn["reconstructions.png"]), recon_boxes(out, rows, tasks)
    assert len(lay) == len(tasks) and all(len(r) == points for r in lay)
    for row in lay:
        for x0, y0, x1, y1 in row:
            view = (x1 - x0) // 6  # 2 tiles × (original, masked, reconstruction)
            assert y1 - y0 == reports.RECON_CELL == view and x1 - x0 == 6 * view
            original = on_disk[y0:y1, x0:x0 + view - 2]
            assert (original == original[..., :1]).all()  # a synthetic sensor: its band in grey
            masked = on_disk[y0:y1, x0 + view + 2:x0 + 2 * view - 2]
            assert (masked == draw.MASK_COLOR).all(-1).mean() > 0.4  # r = 0.75 of it removed (blue)
    assert drawn["matrices.png"].width > 2 * 300  # A | R


def test_run_pictures_also_after_a_resume_and_cli_figures_compare_labels(tmp_path, small_eval, monkeypatch, capsys,
                                                                         one_thread):
    cfg = picture_cfg(tmp_path)
    real = cosmae.train_task

    def crash_in_task_2(t, *a, **k):
        if t == 2:
            raise RuntimeError("the process dies here: only the files on disk survive")
        return real(t, *a, **k)

    monkeypatch.setattr(cosmae, "train_task", crash_in_task_2)
    with pytest.raises(RuntimeError):
        run_with_eval(cfg)
    out = Path(cfg.out)
    check_run_pictures(out, cfg.tasks, 2)  # init and after T1
    before = np.asarray(Image.open(out / "reconstructions.png"))
    monkeypatch.setattr(cosmae, "train_task", real)
    run_with_eval(picture_cfg(tmp_path))  # a new process: the resume draws from what is on disk
    check_run_pictures(out, cfg.tasks, 3)
    after = np.asarray(Image.open(out / "reconstructions.png"))
    assert after.shape[1] > before.shape[1] and after.shape[0] == before.shape[0]  # one more column, same rows
    x_init = recon_boxes(out, eval_mlknn.read_rows(out), cfg.tasks)[0][0]
    assert np.array_equal(after[x_init[1]:x_init[3], x_init[0]:x_init[2]], before[x_init[1]:x_init[3],
                                                                                   x_init[0]:x_init[2]])
    # --figures: the finished run beside a finetune run, a column (reconstructions) and a row (matrices) per label
    out.rename(tmp_path / "cosmae")
    run_with_eval(picture_cfg(tmp_path, method="finetune", out=str(tmp_path / "finetune")))
    folders = [str(tmp_path / "cosmae"), str(tmp_path / "finetune")]
    capsys.readouterr()
    eval_mlknn.main(folders + ["--figures", str(tmp_path / "figs")])
    assert "pictures:" in capsys.readouterr().out
    labels = reports.group_runs([e for f in folders for e in eval_mlknn.load_run(f)])
    assert list(labels) == ["cosmae", "finetune"]
    last = [(tmp_path / m, max(labels[m][0]["rows"], key=lambda r: r["task"])) for m in labels]
    boxes = reports.recon_picture(last, cfg.tasks, ["c"] * 2, "t")[1]["boxes"]
    assert len(boxes) == 2 and all(len(r) == 2 for r in boxes)  # rows = tasks, a column per label
    on_disk = np.asarray(Image.open(tmp_path / "figs" / "reconstructions.png").convert("RGB"))
    for c, method in enumerate(labels):  # each label's column: its run's cells after its last task
        own = np.asarray(Image.open(tmp_path / method / "reconstructions.png").convert("RGB"))
        own_boxes = recon_boxes(tmp_path / method, eval_mlknn.read_rows(tmp_path / method), cfg.tasks)
        for j in range(2):
            x0, y0, x1, y1 = boxes[j][c]
            u0, v0, u1, v1 = own_boxes[j][-1]
            assert np.array_equal(on_disk[y0:y1, x0:x1], own[v0:v1, u0:u1])
    matrices = Image.open(tmp_path / "figs" / "matrices.png")
    assert matrices.size == reports.matrices_picture(labels, ["synth_pan", "synth_red"]).size
    assert matrices.height > 2 * 150 and matrices.width > 2 * 300  # two labels × (A | R)
    with pytest.raises(SystemExit):
        eval_mlknn.main(["--figures", str(tmp_path / "figs")])  # no run folder named


def test_folders_of_images_are_a_task_sequence_trained_and_evaluated_end_to_end(tmp_path, capsys):
    make_ucmerced(tmp_path / "U")
    for k, name in enumerate(("flights_2019", "flights_2021")):  # two folders of someone's own images
        (tmp_path / name / "day1").mkdir(parents=True)
        for i in range(4):
            img = np.random.default_rng([k, i]).integers(0, 256, (256, 512, 3), dtype=np.uint8)
            img[..., k] //= 4  # the second folder sees another colour
            Image.fromarray(img).save(tmp_path / name / ("day1" if i % 2 else "") / f"{i}.{('png', 'jpg')[i % 2]}")
    tasks, run = [str(tmp_path / "flights_2019"), str(tmp_path / "flights_2021")], tmp_path / "run"
    cosmae.main(["--tasks", *tasks, "--model", "vit_test", "--epochs", "2", "--batch-size", "2", "--warmup-epochs",
                 "0.5", "--memory-size", "4", "--device", "cpu", "--ucmerced", str(tmp_path / "U"),
                 "--cache-dir", str(tmp_path / "c"), "--out", str(run)])
    out, rows = capsys.readouterr().out, json.loads((run / "eval.json").read_text())
    assert [r["task"] for r in rows] == [0, 1, 2] and all(len(r["rec_loss"]) == 2 for r in rows)
    assert all(r["eval_set"].startswith("UCMerced (16 test images)") for r in rows)
    assert json.loads((run / "config.json").read_text())["tasks"] == tasks  # absolute paths, as given
    assert {p.name for p in run.glob("task*.pt")} == {"task1_flights_2019.pt", "task2_flights_2021.pt"}
    assert "after T2 (flights_2021)" in out and (run / "reconstructions.png").is_file()
    assert [r["name"] for r in rows] == ["init", "flights_2019", "flights_2021"]
    make_ucmerced(tmp_path / "V", n_per_class=15)  # the checkpoints evaluated afresh: rows named the same way
    eval_mlknn.main([str(run), "--ucmerced", str(tmp_path / "V")])
    rows = [r for r in json.loads((run / "eval.json").read_text()) if r["eval_set"].startswith("UCMerced (18")]
    assert [r["name"] for r in rows] == ["init", "flights_2019", "flights_2021"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        cosmae.main(["--tasks", str(tmp_path / "empty"), "--model", "vit_test", "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "empty") in err and len(err.strip().splitlines()) == 1
