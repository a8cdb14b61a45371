import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import baselines
import cosmae
import eval_mlknn
import rs_data
import runner
from cosmae import MAE, MODELS
from conftest import ROOT, copy_run, encoder_of, make_ucmerced, make_uavid, records, tiny_cfg, tiny_model, train


def test_train_two_tiny_tasks_writes_checkpoints_and_finite_losses(finished_run):
    run = Path(finished_run.out)
    names = [p.name for _, _, p in runner.finished_tasks(run, finished_run.tasks)]
    assert names == ["task1_synth_red.pt", "task2_synth_green.pt"]
    recs = records(run)
    assert {"loss/rec", "loss/mim", "loss/total", "lam1", "lam2", "img/s", "lr", "data_wait"} <= set(recs[0])
    assert all(0 <= r["data_wait"] <= 1 for r in recs)
    assert all(math.isfinite(r["loss/total"]) for r in recs)
    t1, t2 = [r for r in recs if r["task"] == 1], [r for r in recs if r["task"] == 2]
    assert all(r["lam1"] == 1 and r["lam2"] == 1 and r["loss/mim"] == 0 for r in t1)  # task 1: Eq. (1) alone
    assert any(r["loss/mim"] != 0 for r in t2) and any(r["lam1"] != 1 for r in t2)
    ck = torch.load(run / names[1], weights_only=True)
    assert set(ck) >= {"encoder", "model", "projector", "buffer"}
    assert sum(len(v) for v in ck["buffer"].values()) == 20  # M = 20: 10 + 10 after two tasks
    assert json.loads((run / "config.json").read_text())["model"] == "vit_test"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] == 2 and summary["train_seconds"] > 0
    assert not list(run.glob("*.tmp"))  # every file written atomically


def test_data_wait_is_the_share_of_the_time_the_loop_waited_for_batches(tmp_path, monkeypatch):
    """A reader that sleeps 0.5 s a batch, then an instant one: data_wait is a share in [0, 1], larger with the slow
    reader, and the rate is at most one batch per 0.5 s (whatever the speed of the machine)."""
    real, nap = rs_data.batches, {"s": 0.5}

    def reader(*a, **k):
        for raw in real(*a, **k):
            time.sleep(nap["s"])
            yield raw

    monkeypatch.setattr(rs_data, "batches", reader)
    train(tiny_cfg(tmp_path, tasks=["synth_red"], log_every=4))
    nap["s"] = 0.0
    train(tiny_cfg(tmp_path, tasks=["synth_red"], log_every=4, out=str(tmp_path / "fast")))
    (slow,), (fast,) = records(tmp_path / "run"), records(tmp_path / "fast")
    assert 0 <= fast["data_wait"] < slow["data_wait"] <= 1
    assert slow["img/s"] <= 8 / 0.5  # 8 images a batch, one batch every ≥ 0.5 s


def test_no_mixing_on_first_task(tmp_path, monkeypatch):
    calls = []
    real = cosmae.mix_batch
    monkeypatch.setattr(cosmae, "mix_batch", lambda *a: calls.append(1) or real(*a))
    train(tiny_cfg(tmp_path))
    recs = records(tmp_path / "run")
    assert len(calls) == 4 and all(r["lam1"] == 1 for r in recs if r["task"] == 1)  # every step of task 2 only


def test_same_seed_same_weights_other_seed_differs(tmp_path, finished_run):
    a = runner.task_file(finished_run.out, 2, "synth_green")
    b = train(tiny_cfg(tmp_path, out=str(tmp_path / "b")))["checkpoints"][-1]
    c = train(tiny_cfg(tmp_path, out=str(tmp_path / "c"), seed=1))["checkpoints"][-1]
    ea, eb, ec = encoder_of(a), encoder_of(b), encoder_of(c)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not all(torch.equal(ea[k], ec[k]) for k in ea)


def test_resume_after_interrupted_run_equals_uninterrupted_and_logs_each_step_once(tmp_path, monkeypatch):
    """4 steps per epoch, a record every 3 steps, a crash on step 3 of epoch 2 of task 2: the resumed run is bit-
    identical, logs each step once, and its first record (steps 4-6, across the resumed epoch boundary) is the mean
    over the same steps as without the stop; the training time is kept."""
    kw = dict(epochs=2, save_every=1, log_every=3)
    full = train(tiny_cfg(tmp_path, out=str(tmp_path / "full"), **kw))
    real_step, count = torch.optim.AdamW.step, {"n": 0}

    def crash_in_task2_epoch2(self, *a, **k):
        count["n"] += 1
        if count["n"] == 8 + 4 + 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_in_task2_epoch2)
    cfg = tiny_cfg(tmp_path, out=str(tmp_path / "cut/"), **kw)  # the same folder
    run = runner.Run(cfg)
    with pytest.raises(KeyboardInterrupt), run:
        cosmae.train(cfg, run)
    assert run.at == "in task 2 (synth_green), epoch 2, step 6"
    cut = tmp_path / "cut"
    assert (cut / "task1_synth_red.pt").exists() and not (cut / "task2_synth_green.pt").exists()
    last = torch.load(cut / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["seconds"] > json.loads((cut / "summary.json").read_text())["train_seconds"]
    assert [(r["task"], r["step"]) for r in records(cut)][-2:] == [(2, 3), (2, 6)]  # step 6: to be replayed
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"task": 2, "st')  # and a record torn by the crash
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = train(tiny_cfg(tmp_path, out=str(cut), **kw))
    e_full, e_cut = encoder_of(full["checkpoints"][-1]), encoder_of(resumed["checkpoints"][-1])
    assert all(torch.equal(e_full[k], e_cut[k]) for k in e_full)
    assert not (cut / "last.pt").exists()
    want = [(r["task"], r["step"], r["loss/total"], r["loss/mim"]) for r in records(tmp_path / "full")]
    assert [(r["task"], r["step"], r["loss/total"], r["loss/mim"]) for r in records(cut)] == want
    assert json.loads((cut / "summary.json").read_text())["train_seconds"] > last["seconds"]


def test_resume_refuses_another_training_configuration_not_another_path_spelling(tmp_path, finished_run):
    cfg = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(rs_data.DataError, match="other settings.*beta"):
        train(dataclasses.replace(cfg, beta=0.5))
    train(dataclasses.replace(cfg, log_every=5, data_root="x", eval=False))  # finished: nothing to do, accepted
    cosmae.main(TINY + ["--out", str(tmp_path / "run") + "/", "--warmup-epochs", "0.5"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["out"] == str(tmp_path / "run")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "task1_x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(rs_data.DataError, match="cannot be read as a weights-only torch dict"):
        runner.load_checkpoint(bad)
    with pytest.raises(rs_data.DataError, match="No such file"):
        runner.load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("cli", [cosmae.main, baselines.main, eval_mlknn.main])
def test_help_of_every_cli(cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0 and "--" in capsys.readouterr().out


def test_unknown_task_name_exits_2_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        cosmae.main(["--tasks", "us3d", "mars"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tasks: 'mars'" in err and len(err.strip().splitlines()) == 1, err


def test_seeds_flag_runs_one_folder_per_seed(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cosmae, "train", lambda cfg, run: seen.append((cfg.seed, cfg.out, str(run.out))))
    cosmae.main(["--tasks", "synth_red", "--seeds", "0", "2", "--out", str(tmp_path / "r")])
    assert seen == [(s, f"{tmp_path}/r/seed{s}", f"{tmp_path}/r/seed{s}") for s in (0, 2)]

TINY = ["--tasks", "synth_red", "synth_green", "--model", "vit_test", "--epochs", "1", "--batch-size", "8",
        "--synth-train", "32", "--memory-size", "20", "--no-eval", "--device", "cpu"]


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "-1"], "--epochs -1: must be ≥ 1"), (["--batch-size", "-4"], "--batch-size -4: must be ≥ 1"),
    (["--mask-ratio", "1.0"], "--mask-ratio 1.0: must be in (0, 1)"), (["--mask-ratio", "0"], "--mask-ratio 0.0"),
    (["--mask-ratio", "1.5"], "--mask-ratio 1.5"), (["--mask-ratio", "0.99"], "one patch visible"),
    (["--tau", "0"], "--tau 0.0: must be > 0"), (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--alpha1", "0"], "--alpha1 0.0: must be in (0, 1000.0]"), (["--alpha2", "1e308"], "--alpha2 1e+308: must be in"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}: must be in [0, 4294967295]"), (["--lr", "-inf"], "--lr=VALUE"),
    (["--log-every", "0"], "--log-every 0: must be ≥ 1"), (["--save-every", "0"], "--save-every 0: must be ≥ 1"),
    (["--memory-size", "0"], "--memory-size 0: must be ≥ 1 with data mixup"),
    (["--lam2-value", "1.5"], "--lam2-value 1.5: must be in [0, 1]"), (["--warmup-epochs", "5"], "--warmup-epochs 5.0"),
    (["--synth-train", "4"], "--synth-train 4: must be ≥ --batch-size (8)"), (["--seed", "-3"], "--seed -3"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "CUDA device"),
    (["--device", "tpu"], "--device tpu"), (["--model", "vit_huge"], "--model: invalid choice: 'vit_huge'"),
    (["--init", "/nonexistent/mae.pth"], "--init /nonexistent/mae.pth: must be an existing checkpoint file"),
    (["--lr", "inf"], "--lr inf: must be a finite number"), (["--beta", "nan"], "--beta nan: must be a finite number"),
    (["--mask-ratio=-inf"], "--mask-ratio -inf: must be a finite number"),
    (["--tasks", "synth_red", "us3d"], "--tasks synth_red us3d: must be all synthetic or all real"),
    (["--seeds", "1", "-2"], "--seeds 1 -2: must be in [0, 4294967295]"),
    (["--pool", "max"], "--pool: invalid choice: 'max'"),
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"), (["--no-such-flag"], "unrecognized arguments"),
])
def test_a_bad_flag_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cosmae.main(TINY + ["--out", str(tmp_path / "run")] + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_sizes_that_cannot_fit_memory_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # numpy refuses 5 PB before allocating anything
        cosmae.main(TINY + ["--out", str(tmp_path / "run"), "--synth-train", str(10 ** 12)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Unable to allocate" in err and "lower --batch-size" in err, err
    assert len(err.strip().splitlines()) == 1

    def gpu_full(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    with pytest.raises(SystemExit) as e:  # a GPU's out-of-memory error: the same one line
        runner.cli(gpu_full)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == "error: CUDA out of memory. Tried to allocate 80.00 GiB; lower " \
        "--batch-size, --memory-size or --synth-train", err


@pytest.mark.parametrize("flags,message", [
    (["--method", "der", "--memory-size", "0"], "--memory-size 0: must be ≥ 1 for der"),
    (["--method", "er", "--replay-batch", "-1"], "--replay-batch -1"), (["--method", "lump", "--lump-alpha", "2e3"],
                                                                        "--lump-alpha 2000.0: must be in (0, 1000.0]"),
    (["--method", "ewc", "--ewc-batches", "0"], "--ewc-batches 0: must be ≥ 1")])
def test_a_bad_baseline_flag_is_one_line_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        baselines.main(TINY + ["--out", str(tmp_path / "run")] + flags)
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, capsys, finished_run):
    good = encoder_of(runner.task_file(finished_run.out, 1, "synth_red"))
    with pytest.raises(SystemExit) as e:  # an absurd learning rate
        cosmae.main(TINY + ["--out", str(tmp_path / "bad"), "--lr", "1e6", "--log-every", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "non-finite" in err and "task 1 (synth_red)" in err and "--no-amp" in err, err
    assert not list((tmp_path / "bad").glob("*.pt"))  # no checkpoint of non-finite weights
    model = tiny_model()
    with runner.Run(tiny_cfg(tmp_path, out=str(tmp_path / "nan"))) as run:
        run.save(tmp_path / "nan" / "task1_x.pt", model, encoder=good)
        with torch.no_grad():
            model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
        with pytest.raises(rs_data.DataError, match="non-finite"):
            run.save(tmp_path / "nan" / "task1_x.pt", model, encoder={})
    assert all(torch.equal(good[k], v) for k, v in encoder_of(tmp_path / "nan" / "task1_x.pt").items())


def test_failed_start_leaves_no_run_folder_and_the_fixed_rerun_works(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    for bad in (["--init", str(tmp_path / "missing.pt")], ["--ucmerced", str(tmp_path / "nowhere"), "--eval"],
                ["--batch-size", "64"]):
        with pytest.raises(SystemExit) as e:
            cosmae.main(TINY + out + bad)
        assert e.value.code == 2 and not (tmp_path / "run" / "config.json").exists(), bad
    capsys.readouterr()
    cosmae.main(TINY + out + ["--tasks", "synth_red"])
    assert (tmp_path / "run" / "task1_synth_red.pt").exists()


def test_init_that_matches_nothing_is_an_error_and_a_partial_one_says_what_is_missing(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        cosmae.main(TINY + ["--init", str(tmp_path / "other.pt"), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "none of its 1 weights is an encoder weight" in capsys.readouterr().err
    sd = {k: v for k, v in tiny_model().state_dict().items() if k.startswith("patch_embed")}
    torch.save({"model": sd}, tmp_path / "part.pt")
    runner.load_init(tiny_model(), str(tmp_path / "part.pt"))  # as a run's --init
    out = capsys.readouterr().out
    assert "encoder weights NOT loaded" in out and "cls_token" in out
    other_model = MAE(**MODELS["vit_tiny"]).state_dict()  # another --model: the shapes do not fit
    for bad, message in (({"model": other_model}, "weights do not fit this model"),
                         ({"model": {"note": "not weights"}}, "none of its 1 weights is an encoder weight"),
                         ([1, 2], "cannot be read as a weights-only torch dict")):
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(SystemExit) as e:
            cosmae.main(TINY + ["--init", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "c").exists()


def test_a_corrupt_json_file_is_a_clear_error(tmp_path, finished_run):
    cfg = copy_run(finished_run, tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text('{"completed": 1, "trai')  # a torn write of an older version
    with pytest.raises(rs_data.DataError, match="summary.json is corrupt"):
        train(cfg)


def test_cache_goes_to_the_user_cache_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    make_uavid(tmp_path / "d")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_writable = rs_data.writable
    monkeypatch.setattr(rs_data, "writable", lambda d: str(tmp_path / "d") not in str(d) and real_writable(d))
    logs = []
    tiles = rs_data.task_tiles("uavid", tmp_path / "d", "train", log=logs.append)
    assert (tiles == 77).all() and not (tmp_path / "d" / ".cosmae_cache").exists()
    assert list((tmp_path / "xdg" / "cosmae").glob("d-*/uavid_train.npy")) and any("xdg" in m for m in logs)
    monkeypatch.setattr(rs_data, "writable", real_writable)  # a cache built inside a (then) writable data folder
    rs_data.task_tiles("uavid", tmp_path / "d", "val", log=logs.append)
    monkeypatch.setattr(rs_data, "writable", lambda d: False)  # ... is used read-only once the folder is not
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    assert rs_data.task_tiles("uavid", tmp_path / "d", "val", log=logs.append).shape == (6, 3, 256, 256)
    shutil.rmtree(tmp_path / "xdg")  # a split with no cache anywhere, and nowhere to write one
    with pytest.raises(rs_data.DataError, match="no writable place for the tile cache.*--cache-dir"):
        rs_data.task_tiles("uavid", tmp_path / "d", "train", log=logs.append)


def test_a_failed_cache_build_leaves_no_temporary_file(tmp_path, monkeypatch):
    make_uavid(tmp_path / "d")
    real, calls = rs_data.read_rgb, []

    def fail_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(rs_data, "read_rgb", fail_on_second)
    with pytest.raises(OSError):
        rs_data.task_tiles("uavid", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None)
    assert list((tmp_path / "c").iterdir()) == []


@pytest.mark.parametrize("row,message", [("airplane00\t1\t0", "line 2: expected an image name and 17 values"),
                                         ("airplane00\t" + "\t".join(["1"] * 16) + "\tx", "got 17 values"),
                                         ("airplane00\t" + "\t".join(["2"] * 17), "values 0 or 1")])
def test_ucmerced_label_file_is_checked_row_by_row(tmp_path, row, message):
    make_ucmerced(tmp_path / "U", n_per_class=2)
    path = tmp_path / "U" / "LandUse_Multilabeled.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], row] + lines[2:]) + "\n")
    with pytest.raises(rs_data.DataError, match=re.escape(message)):
        rs_data.ucmerced_splits(tmp_path / "U", tmp_path / "c", log=lambda m: None)


def test_resume_trusts_only_this_runs_task_files_in_order(tmp_path, capsys):
    three = dict(tasks=["synth_red", "synth_green", "synth_blue"])
    full = train(tiny_cfg(tmp_path, **three, out=str(tmp_path / "full")))
    cut = tmp_path / "cut"
    train(tiny_cfg(tmp_path, **three, out=str(cut)))
    shutil.copy(cut / "task1_synth_red.pt", cut / "task1_synth_red_backup.pt")  # a copy kept by hand: never used
    (cut / "task2_synth_green.pt").unlink()  # a middle checkpoint deleted: task 3 cannot stand in for it
    shutil.copy(cut / "task1_synth_red.pt", cut / "last.pt")  # not a mid-task checkpoint of task 2: set aside
    capsys.readouterr()
    again = train(tiny_cfg(tmp_path, **three, out=str(cut)))
    out = capsys.readouterr().out
    assert "task1_synth_red_backup.pt: not a checkpoint of this run: ignored" in out
    assert "set aside as task3_synth_blue.pt.set_aside" in out and (cut / "task3_synth_blue.pt.set_aside").exists()
    assert "resuming" in out and "tasks 1..1 already done" in out and "set aside as last.pt.set_aside" in out
    a, b = encoder_of(full["checkpoints"][-1]), encoder_of(again["checkpoints"][-1])
    assert all(torch.equal(a[k], b[k]) for k in a)  # tasks 2 and 3 trained again, as in one go
    steps = [(r["task"], r["step"]) for r in records(cut)]
    assert steps == [(r["task"], r["step"]) for r in records(tmp_path / "full")]


def test_a_run_folder_without_config_json_is_still_checked_against_the_command(tmp_path, finished_run):
    cfg = copy_run(finished_run, tmp_path / "run")
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(rs_data.DataError, match=r"task1_synth_red.pt belongs to a run with other settings .*'lr'"):
        train(dataclasses.replace(cfg, lr=0.01))
    with pytest.raises(rs_data.DataError, match=r"other settings .*'method'"):
        train(tiny_cfg(tmp_path, method="finetune"))
    train(dataclasses.replace(cfg, eval=False))  # the same command: accepted (finished)


@pytest.mark.parametrize("case", ["not_a_checkpoint", "other_run", "corrupt_bytes", "list"])
def test_a_task_checkpoint_of_the_wrong_content_is_one_line_before_config_json(tmp_path, case, capsys, finished_run):
    copy_run(finished_run, tmp_path / "run")
    path = tmp_path / "run" / "task1_synth_red.pt"
    if case == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "other_run":  # task 1 of this run, task 2 of another run with the same settings (another lineage)
        ck = torch.load(tmp_path / "run" / "task2_synth_green.pt", weights_only=True)
        ck["lineage"] = ["another run"] + ck["lineage"][1:]
        torch.save(ck, tmp_path / "run" / "task2_synth_green.pt")
    elif case == "corrupt_bytes":  # a valid zip whose tensor bytes changed
        ck = torch.load(path, weights_only=True)
        ck["model"]["blocks.0.attn.qkv.weight"][0, 0] += 1
        torch.save(ck, path)
    else:
        torch.save([torch.zeros(1)], path)
    if case != "other_run":
        (tmp_path / "run" / "task2_synth_green.pt").unlink()
    (tmp_path / "run" / "config.json").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cosmae.main(TINY + ["--out", str(tmp_path / "run"), "--warmup-epochs", "0.5"])
    err = capsys.readouterr().err
    want = {"not_a_checkpoint": "is not a checkpoint of task 1 of this", "other_run": "task2_synth_green.pt is not a",
            "corrupt_bytes": "do not match the digest saved with them", "list": "cannot be read as a weights"}[case]
    assert e.value.code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("key", ["model", "projector", "buffer"])
def test_a_checkpoint_whose_parts_do_not_fit_is_one_line(tmp_path, capsys, finished_run, key):
    copy_run(finished_run, tmp_path / "run")
    path = tmp_path / "run" / "task2_synth_green.pt"
    ck = torch.load(path, weights_only=True)  # written by hand, with a digest that fits
    ck[key] = {("x" if key == "buffer" else "") + k: v[..., :1] for k, v in ck[key].items()}
    ck["digest"] = runner.digest(ck)
    torch.save(ck, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cosmae.main(TINY + ["--out", str(tmp_path / "run"), "--warmup-epochs", "0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"task2_synth_green.pt ({key}): its weights do not fit" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name,content,message", [
    ("config.json", "[1, 2]", "config.json holds a list, expected a JSON dict"),
    ("eval.json", '{"task": 0}', "expected a JSON list"),
    ("metrics.jsonl", '{"task": 1, "step": 1}\n[1]\n{"task": 1, "step": 2}\n', "metrics.jsonl line 2 is not a "
                                                                               "metrics record"),
    ("summary.json", '"done"', "summary.json holds a str")])
def test_hand_edited_json_of_the_wrong_shape_is_one_line(tmp_path, capsys, small_eval, finished_run, name, content,
                                                         message):
    args = TINY + ["--out", str(tmp_path / "run"), "--eval", "--warmup-epochs", "0.5"]
    copy_run(finished_run, tmp_path / "run")
    (tmp_path / "run" / "task2_synth_green.pt").unlink()  # a resume that trains task 2 again reads every file
    (tmp_path / "run" / name).write_text(content)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cosmae.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_out_that_cannot_be_written_is_refused_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rs_data, "synth_task", lambda *a: (_ for _ in ()).throw(AssertionError("data read")))
    (tmp_path / "file").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: a folder it cannot write in, as a user meets it
        monkeypatch.setattr(tempfile, "TemporaryFile", lambda **k: (_ for _ in ()).throw(PermissionError(13, "Denied")))
    cases = [("", "--out : must be a run folder"), ("./", "--out ./: must be a run folder, not the current one"),
             ("sub/..", "not the current one"), (str(tmp_path / "file"), "cannot be created or written (File exists)"),
             (str(tmp_path / "file" / "sub"), "cannot be created or written"),
             (str(tmp_path / ("x" * 300)), "cannot be created or written (File name too long)"),
             (str(tmp_path / "ro"), "ro cannot be created or written (")]
    for out, message in cases:
        with pytest.raises(SystemExit) as e:
            cosmae.main(TINY + ["--out", out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (out, err)


ENV = dict(os.environ, OMP_NUM_THREADS="1")  # one thread, as this process (conftest): the same numbers


def test_one_process_per_run_folder_and_ctrl_c_says_where_and_how_to_resume_exit_130(tmp_path, capsys):
    cmd = [sys.executable, "-u", "cosmae.py", *TINY, "--epochs", "200", "--save-every", "1", "--log-every", "1",
           "--out", str(tmp_path / "r")]
    # SIGINT as a terminal gives it, even where pytest itself was started with SIGINT ignored (a background job)
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in first.stdout:
            if line.startswith("task 1 synth_red | ep 2/"):
                break
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:  # the same command again (here, in this process) while it trains
            cosmae.main(cmd[3:])
        second = capsys.readouterr().err
        assert e.value.code == 2 and f"is in use by process {first.pid}" in second and len(second.splitlines()) == 1
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err
    assert "interrupted in task 1 (synth_red), epoch" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err and (tmp_path / "r" / "last.pt").exists()


def test_sigkill_then_rerun_frees_the_lock_and_resumes_bit_identically(tmp_path, capsys):
    args = TINY + ["--epochs", "3", "--save-every", "1", "--log-every", "1", "--warmup-epochs", "0.5"]
    train(tiny_cfg(tmp_path, out=str(tmp_path / "full"), epochs=3, save_every=1, log_every=1))  # as the command
    cut = subprocess.Popen([sys.executable, "-u", "cosmae.py", *args, "--out", str(tmp_path / "cut")], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in cut.stdout:
        if line.startswith("task 2 synth_green | ep 2/"):
            cut.kill()
            break
    cut.wait()
    assert not (tmp_path / "cut" / "task2_synth_green.pt").exists()
    capsys.readouterr()
    cosmae.main(args + ["--out", str(tmp_path / "cut")])  # the lock died with the process
    assert "resuming task 2 after epoch" in capsys.readouterr().out
    a, b = (encoder_of(tmp_path / d / "task2_synth_green.pt") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, cut_log = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [(r["task"], r["step"], r["loss/total"]) for r in full] == [(r["task"], r["step"], r["loss/total"])
                                                                     for r in cut_log]


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_after_freeing_space_resumes(tmp_path, capsys):
    args = TINY + ["--out", str(tmp_path / "run"), "--warmup-epochs", "0.5"]
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, limits[1]))  # writes past 60 kB fail (EFBIG), as on a full disk
    try:
        with pytest.raises(SystemExit) as e:
            cosmae.main(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no space left on the device writing" in err and "task1_synth_red.pt" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / "task1_synth_red.pt").exists()
    cosmae.main(args)  # space freed
    assert (tmp_path / "run" / "task2_synth_green.pt").exists()


def test_lam1_per_image_mixes_each_image_with_its_own_lambda(tmp_path, monkeypatch):
    """Eq. (2) with --lam1-per image: row i of the mixed batch is λ1_i·x_i + (1 − λ1_i)·x_M,i."""
    seen = []
    real = cosmae.mix_batch
    monkeypatch.setattr(cosmae, "mix_batch", lambda x, xm, lam: seen.append((x, xm, lam)) or real(x, xm, lam))
    train(tiny_cfg(tmp_path, lam1_per="image", model_mixup=False))
    x, xm, lam = seen[0]
    assert lam.shape == (8, 1, 1, 1) and len(set(lam.flatten().tolist())) == 8  # one draw per image
    mixed = real(x, xm, lam)
    for i in range(8):
        assert torch.allclose(mixed[i], lam[i, 0, 0, 0] * x[i] + (1 - lam[i, 0, 0, 0]) * xm[i])
    recs = [r for r in records(tmp_path / "run") if r["task"] == 2]
    assert all(0 < r["lam1"] < 1 for r in recs)  # the mean λ1 of the batch is logged


def test_teacher_every_epoch_keeps_one_teacher_for_the_epoch(tmp_path, monkeypatch):
    rebuilt = []
    real = cosmae.MixupTeacher.rebuild
    monkeypatch.setattr(cosmae.MixupTeacher, "rebuild", lambda self, lam2: rebuilt.append(lam2) or real(self, lam2))
    train(tiny_cfg(tmp_path, teacher_every="epoch", epochs=2, log_every=1))
    assert len(rebuilt) == 2  # task 2, two epochs: one teacher each
    lam2 = [(r["epoch"], r["lam2"]) for r in records(tmp_path / "run") if r["task"] == 2]
    assert [l for e, l in lam2 if e == 0] == [rebuilt[0]] * 4 and [l for e, l in lam2 if e == 1] == [rebuilt[1]] * 4
    train(tiny_cfg(tmp_path, out=str(tmp_path / "step"), epochs=2))
    assert len(rebuilt) == 2 + 8  # the default: a new teacher every step


def test_a_fresh_start_drops_stale_results_and_a_resume_keeps_its_own(tmp_path, finished_run):
    """No config.json and no finished task: eval.json and summary.json of an older run go; *.tmp files of a
    killed write go at every start; a resume whose summary.json was deleted gets the training seconds back."""
    cfg = copy_run(finished_run, tmp_path / "run")
    run = Path(cfg.out)
    (run / "summary.json").unlink()
    (run / "task2_synth_green.pt.4242.abcd.tmp").write_bytes(b"half a checkpoint")
    with runner.Run(cfg) as r:
        ck = torch.load(run / "task2_synth_green.pt", weights_only=True)
        assert r.summary["train_seconds"] == ck["train_seconds"] > 0 and (run / "eval.json").exists()
    assert not list(run.glob("*.tmp"))
    (run / "config.json").unlink()
    for p in run.glob("task*.pt"):
        p.unlink()
    with runner.Run(dataclasses.replace(cfg, seed=1)) as r:
        assert not (run / "eval.json").exists() and not (run / "summary.json").exists() and r.summary["seed"] == 1


def test_resume_refuses_other_data_and_warns_about_another_thread_count(tmp_path, finished_run, monkeypatch, capsys):
    cfg = dataclasses.replace(copy_run(finished_run, tmp_path / "run"), eval=False)
    config = Path(cfg.out) / "config.json"
    recorded = json.loads(config.read_text())
    assert recorded["task_data"]["synth_red"].startswith("32 images, ") and recorded["threads"] == 1
    config.write_text(json.dumps(dict(recorded, threads=7)))
    train(cfg)  # finished: nothing to train, a warning, config.json rewritten
    assert "warning: 7 torch threads before, 1 now" in capsys.readouterr().err
    before = config.read_text()
    monkeypatch.setattr(rs_data, "DATA_SEED", 1)  # other images under the same names (as another --data-root)
    with pytest.raises(rs_data.DataError, match=r"task synth_red: other data than the run's \(32 images, \w+ → 32 "
                                                 r"images, \w+\); its --data-root\?"):
        train(cfg)
    assert config.read_text() == before
