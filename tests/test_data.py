import errno
import json
import multiprocessing
import os
import re
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import cosmae
import eval_mlknn
import rs_data
import runner
from cosmae import MODELS, Config
from rs_data import DataError
from conftest import QUIET, bands_image, make_datasets, make_ucmerced, tiny_cfg, ucm
from _children import build_under_limit, potsdam_train, run, slow_build, write_many, write_under_limit

import tifffile  # noqa: E402

from PIL import Image, ImageFile  # noqa: E402


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The four fake datasets (conftest.make_datasets), made once: read them only. Their default tile cache
    (DATA/.cosmae_cache) is shared: Potsdam's PackBits tiles are decoded once."""
    root = tmp_path_factory.mktemp("datasets") / "d"
    make_datasets(root)
    return root


def test_us3d_msi_bands_4_2_1_scaled_from_11_bit_and_official_splits(tmp_path, datasets):
    logs = []
    train = rs_data.task_tiles("us3d", datasets, "train", tmp_path / "c", log=logs.append)
    val = rs_data.task_tiles("us3d", datasets, "val", tmp_path / "c", log=logs.append)
    assert train.shape == (8, 3, 256, 256) and val.shape == (4, 3, 256, 256) and train.dtype == np.uint8
    want = [round(v * 255 / 2047) for v in (500, 300, 200)]  # bands 4, 2, 1 (0-based) hold 500, 300, 200
    assert [int(train[0, c, 5, 5]) for c in range(3)] == want and (train == train[:1, :, :1, :1]).all()
    assert any("8 patches found, the paper uses 21081" in m for m in logs)


def test_potsdam_packbits_tiles_rgb_order_and_split_by_whole_images(datasets):
    train = rs_data.task_tiles("potsdam", datasets, "train", **QUIET)  # cached in DATA/.cosmae_cache
    val = rs_data.task_tiles("potsdam", datasets, "val", **QUIET)
    assert train.shape == (12, 3, 256, 256) and val.shape == (6, 3, 256, 256)  # 2 + 1 images of 2×3 patches
    assert (train[:, 0] == 10).all() and (train[:, 1] == 20).all() and (train[:, 2] == 30).all()  # IR dropped


def test_treesat_name_with_dots_centre_crop_and_ir_g_b_r_order(tmp_path, datasets):
    train = rs_data.task_tiles("treesat", datasets, "train", tmp_path / "c", **QUIET)
    val = rs_data.task_tiles("treesat", datasets, "val", tmp_path / "c", **QUIET)
    assert len(train) == 2 and len(val) == 1 and train.shape[1:] == (3, 256, 256)
    assert [int(train[0, c, 0, 0]) for c in range(3)] == [4, 2, 3]  # bands IR,G,B,R = 1,2,3,4 → R,G,B
    files = rs_data.split_files("treesat", datasets / "TreeSatAI", 0)["files"]
    assert any(p.name == "Picea_abies_3_46_2.5_WEFL.tif" for p in files)


def test_uavid_png_patch_counts(tmp_path, datasets):
    train = rs_data.task_tiles("uavid", datasets, "train", tmp_path / "c", **QUIET)
    val = rs_data.task_tiles("uavid", datasets, "val", tmp_path / "c", **QUIET)
    assert train.shape == (12, 3, 256, 256) and val.shape == (6, 3, 256, 256) and (train == 77).all()


def test_tiff_layouts_hwc_and_chw_and_wrong_bands_or_dtype(tmp_path):
    tifffile.imwrite(tmp_path / "hwc.tif", bands_image([1, 2, 3], 16, 16, np.uint8))
    tifffile.imwrite(tmp_path / "chw.tif", bands_image([1, 2, 3], 16, 16, np.uint8, chw=True),
                     photometric="minisblack", planarconfig="separate")
    for f in ("hwc.tif", "chw.tif"):
        assert rs_data.read_rgb(tmp_path / f).shape == (3, 16, 16) and rs_data.read_rgb(tmp_path / f)[2, 0, 0] == 3
    with pytest.raises(rs_data.DataError, match="hwc.tif.*expected 8 bands"):
        rs_data.read_rgb(tmp_path / "hwc.tif", bands=(4, 2, 1), n_bands=8, bits=11)
    tifffile.imwrite(tmp_path / "u16.tif", bands_image([1, 2, 3], 8, 8, np.uint16))
    with pytest.raises(rs_data.DataError, match="u16.tif: dtype uint16, expected uint8"):
        rs_data.read_rgb(tmp_path / "u16.tif")


def test_lzw_tiff_without_imagecodecs_says_how_to_fix(tmp_path):
    try:
        import imagecodecs  # noqa: F401
        pytest.skip("imagecodecs is installed: LZW reads fine")
    except ImportError:
        pass
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, bands_image([1, 2, 3], 8, 8, np.uint8))
    with tifffile.TiffFile(path, mode="r+b") as tif:  # relabel the (uncompressed) strips as LZW
        tif.pages[0].tags["Compression"].overwrite(5)
    with pytest.raises(rs_data.DataError, match="lzw.tif.*pip install imagecodecs"):
        rs_data.read_rgb(path)


def test_data_errors_missing_empty_corrupt_unknown(tmp_path, capsys):
    with pytest.raises(rs_data.DataError, match=r"us3d: no folder .*US3D.*JAX_\*_RGB.tif.*DFC 2019"):
        rs_data.task_tiles("us3d", tmp_path, "train", tmp_path / "c")
    (tmp_path / "TreeSatAI" / "aerial" / "60m").mkdir(parents=True)
    with pytest.raises(rs_data.DataError, match="treesat: no images found"):
        rs_data.task_tiles("treesat", tmp_path, "train", tmp_path / "c")
    (tmp_path / "TreeSatAI" / "aerial" / "60m" / "link.tif").symlink_to(tmp_path / "gone.tif")
    with pytest.raises(rs_data.DataError, match=r"cannot read .*link.tif: no such file \(a dangling link\?\)"):
        rs_data.task_tiles("treesat", tmp_path, "train", tmp_path / "c")
    (tmp_path / "TreeSatAI" / "aerial" / "60m" / "link.tif").unlink()
    (tmp_path / "TreeSatAI" / "aerial" / "60m" / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(rs_data.DataError, match="cannot read .*bad.tif"):
        rs_data.task_tiles("treesat", tmp_path, "train", tmp_path / "c")
    with pytest.raises(SystemExit) as e:
        cosmae.main(["--tasks", "potsdam", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "potsdam: no folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the data is found


def test_cache_reused_rebuilt_on_change_and_partial_files_not_trusted(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    first = np.array(potsdam_train(tmp_path / "d", tmp_path / "c"))
    real = rs_data.read_rgb
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    assert np.array_equal(first, potsdam_train(tmp_path / "d", tmp_path / "c"))  # from the cache, no image read
    monkeypatch.setattr(rs_data, "read_rgb", real)
    for src in (tmp_path / "d" / "Potsdam" / "4_Ortho_RGBIR").glob("*.tif"):  # the folder changed
        tifffile.imwrite(src, bands_image([11, 21, 31, 40], 256, 512, np.uint8))
    rebuilt = np.array(potsdam_train(tmp_path / "d", tmp_path / "c"))
    assert rebuilt.shape == first.shape and (rebuilt[:, 0] == 11).all()
    (tmp_path / "c" / "potsdam_train.json").unlink()  # as if a build died before writing its manifest
    (tmp_path / "c" / "potsdam_train.tmp.npy").write_bytes(b"half")
    calls = count_reads(monkeypatch)
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), rebuilt) and calls  # rebuilt


def test_split_is_deterministic_under_a_seed(datasets):
    for name in ("potsdam", "treesat", "us3d"):
        folder = datasets / {"potsdam": "Potsdam", "treesat": "TreeSatAI", "us3d": "US3D"}[name]
        a, b = (rs_data.split_files(name, folder, 0) for _ in range(2))
        assert a["train"] == b["train"] and a["val"] == b["val"]
    vals = {tuple(rs_data.split_files("potsdam", datasets / "Potsdam", s)["val"]) for s in range(6)}
    assert len(vals) > 1  # another seed, another validation image


def test_ucmerced_labels_crlf_resize_and_split_sizes(tmp_path):
    names = make_ucmerced(tmp_path / "UCMerced_LandUse")
    s = rs_data.ucmerced_splits(tmp_path / "UCMerced_LandUse", tmp_path / "c", seed=0, log=lambda m: None)
    assert s["labels"] == names
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [20, 6, 16]  # 42 images in 1000:300:800
    x = np.concatenate([s[k][0] for k in ("train", "val", "test")])
    y = np.concatenate([s[k][1] for k in ("train", "val", "test")])
    assert x.shape[1:] == (3, 256, 256) and y.shape[1] == 17
    for img, lab in zip(x, y):  # class c has colour channel c at 250 and label column c set
        assert lab[int(np.argmax(img.reshape(3, -1).mean(1)))] == 1


def test_end_to_end_four_fake_datasets_with_evaluation_on_fake_ucmerced(tmp_path, capsys, datasets):
    make_ucmerced(tmp_path / "UCMerced_LandUse")
    ucm = str(tmp_path / "UCMerced_LandUse")
    cosmae.main(["--tasks", "us3d", "uavid", "potsdam", "treesat", "--data-root", str(datasets),
                 "--ucmerced", ucm, "--model", "vit_test", "--epochs", "1", "--batch-size", "2",
                 "--warmup-epochs", "0.5", "--device", "cpu", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "T4 (treesat)" in out and "UCMerced" in out and "R[t][j]" in out and "A[t][j]" not in out
    tasks = ["us3d", "uavid", "potsdam", "treesat"]
    assert [p.name for _, _, p in runner.finished_tasks(tmp_path / "run", tasks)][-1] == "task4_treesat.pt"
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(rows) == 5 and all(r["per_task"] is None and len(r["rec_loss"]) == 4 for r in rows)  # no labels
    assert "final_avg_map" not in json.loads((tmp_path / "run" / "summary.json").read_text())
    eval_mlknn.main([str(tmp_path / "run")])
    assert "T4 (treesat)" in capsys.readouterr().out


def test_treesat_resize_instead_of_centre_crop(tmp_path, datasets):
    shutil.copytree(datasets / "TreeSatAI", tmp_path / "d" / "TreeSatAI")
    aerial = tmp_path / "d" / "TreeSatAI" / "aerial" / "60m"
    img = np.zeros((4, 304, 304), np.uint8)
    img[3, :24] = 200  # R band: a bright strip along the top, outside the centre 256×256
    for p in aerial.glob("*.tif"):
        tifffile.imwrite(p, img, photometric="minisblack", planarconfig="separate")
    crop = rs_data.task_tiles("treesat", tmp_path / "d", "train", tmp_path / "c", **QUIET)
    full = rs_data.task_tiles("treesat", tmp_path / "d", "train", tmp_path / "c", **QUIET, treesat_resize=True)
    assert crop[:, 0].max() == 0 and full[:, 0, :10].min() > 150  # the strip: cut off, or kept (resized)
    assert runner.parse_args(Config, ["--treesat-resize"]).treesat_resize


def test_presets_paper_for_real_tasks_synthetic_otherwise_explicit_flags_win():
    paper = cosmae.resolve(Config(tasks=["us3d", "uavid"]))
    assert (paper.model, paper.epochs, paper.batch_size, paper.warmup_epochs) == ("vit_base", 300, 128, 10)
    assert paper.norm_pix_loss is False  # the paper does not mention MAE's normalised target
    synth = cosmae.resolve(Config(warmup_epochs=0.0, epochs=2))
    assert (synth.model, synth.epochs, synth.warmup_epochs, synth.norm_pix_loss) == ("vit_tiny", 2, 0.0, True)
    assert cosmae.resolve(runner.parse_args(Config, ["--no-norm-pix-loss"])).norm_pix_loss is False
    assert cosmae.resolve(runner.parse_args(Config, ["--tasks", "us3d", "--norm-pix-loss"])).norm_pix_loss is True
    assert MODELS["vit_base"] == dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                      decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def test_evaluating_a_task_again_replaces_its_row(tmp_path, monkeypatch):
    """A run that crashed in task 1 evaluates the random init again when resumed: one row per task."""
    cfg = tiny_cfg(tmp_path, eval=True)
    scores = iter([dict(micro=m, micro_binary=m + 1) for m in (1.0, 3.0, 5.0)])
    monkeypatch.setattr(eval_mlknn, "evaluation_row", lambda *a: (dict(next(scores), per_task=None, rec_loss=[1.0]),
                                                                  []))
    with runner.Run(cfg) as run:
        ev = eval_mlknn.Evaluation(cfg)
        ev.rows = []
        ev.evaluate(run, 0, "init", None)
        ev.evaluate(run, 1, "synth_red", None)
        ev.evaluate(run, 0, "init", None)
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [(r["task"], r["micro"], r["micro_binary"]) for r in rows] == [(0, 5.0, 6.0), (1, 3.0, 4.0)]
    assert eval_mlknn.read_rows(tmp_path / "run") == rows  # and a resumed run reads them back

CHILD = multiprocessing.get_context("forkserver")
CHILD.set_forkserver_preload(["rs_data"])  # imported once, by the fork server (from the working directory)


def make_potsdam(root: Path, n=3, h=256, w=512, seed=0) -> list:
    """n Potsdam orthophotos as ISPRS ships them: one page, 4 bands R,G,B,IR interleaved, 256×256 tiles, random
    pixels (h×w: 2 patches each). 1 image is drawn for validation, the others train."""
    ortho = root / "Potsdam" / "4_Ortho_RGBIR"
    ortho.mkdir(parents=True)
    g, paths = np.random.default_rng(seed), []
    for i in range(n):
        paths.append(ortho / f"top_potsdam_2_{10 + i}_RGBIR.tif")
        tifffile.imwrite(paths[-1], g.integers(0, 256, (h, w, 4), dtype=np.uint8), tile=(256, 256),
                         photometric="minisblack", planarconfig="contig")
    return paths


def truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])

UCM_NAMES = ["airplane", "bare-soil", "buildings", "cars", "chaparral", "court", "dock", "field", "grass",
             "mobile-home", "pavement", "sand", "sea", "ship", "tanks", "trees", "water"]


def ucmerced_folder(root: Path, n_per_class=8, sep="\t", end="") -> Path:
    """UCMerced_LandUse: Images/<class>/<class>NN.tif (random 256×256 RGB) and LandUse_Multilabeled.txt (CRLF);
    `end` is appended to the header and every row (a trailing tab). Only labels 0-2 and 16 occur."""
    classes = ["airplane", "beach", "tenniscourt"]
    lines = ["IMAGE\\LABEL" + sep + sep.join(UCM_NAMES) + end]
    for ci, c in enumerate(classes):
        (root / "Images" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = np.random.default_rng(i + 100 * ci).integers(0, 255, (256, 256, 3), dtype=np.uint8)
            tifffile.imwrite(root / "Images" / c / f"{c}{i:02d}.tif", img)
            labels = [int(j == ci or (j == 16 and i % 2)) for j in range(17)]
            lines.append(f"{c}{i:02d}" + sep + sep.join(map(str, labels)) + end)
    path = root / "LandUse_Multilabeled.txt"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def in_child(target, *args):
    """Run target(*args) in a child process; → (exit code, what it returned or the text of what it raised). The
    child comes from a fork server started clean: a child forked from a process whose OpenMP threads already ran
    (torch in the other tests) can hang in its first parallel region."""
    q = CHILD.Queue()
    p = CHILD.Process(target=run, args=(q, target, args))
    p.start()
    try:
        out = q.get(timeout=120)
    except Exception:
        out = ("nothing", None)
    p.join(30)
    return p.exitcode, out


def test_atomic_write_temporary_names_are_unique_per_call_and_process(tmp_path):
    seen = []
    for text in ("a", "b"):
        rs_data.atomic_write(tmp_path / "x.json", lambda tmp: seen.append(tmp) or tmp.write_text(text))
    assert seen[0] != seen[1] and all(t.parent == tmp_path and t.name.endswith(".tmp") for t in seen)
    assert all(re.fullmatch(rf"x\.json\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", t.name) for t in seen)
    assert (tmp_path / "x.json").read_text() == "b" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_two_processes_writing_one_file_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "summary.json"
    procs = [CHILD.Process(target=write_many, args=(target, b, 15)) for b in (b"a", b"b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]  # a shared temporary file: one rename finds it gone
    data = target.read_bytes()
    assert len(data) == 8 * 4096 and len(set(data)) == 1  # one writer's file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    (tmp_path / "ck.pt").write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        rs_data.atomic_write(tmp_path / "ck.pt", fail)
    with pytest.raises(ValueError):
        rs_data.atomic_write(tmp_path / "new.pt", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"] and (tmp_path / "ck.pt").read_text() == "old"


@pytest.mark.parametrize("how", ["text", "numpy", "torch"])
def test_full_disk_in_atomic_write_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, how):
    code, (kind, message) = in_child(write_under_limit, tmp_path / "task1.pt", how)
    assert code == 0 and kind == "raised" and message.startswith("DataError: no space left on the device writing ")
    assert str(tmp_path / "task1.pt") in message and "free space" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_read_json_names_the_file_and_what_was_expected(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "torn.json").write_text('{"a": 1')
    assert rs_data.read_json(tmp_path / "list.json", list) == [1, 2]
    for name, kind, message in (("list.json", dict, "list.json holds a list, expected a JSON dict"),
                                ("torn.json", dict, "torn.json is corrupt (Expecting"),
                                ("gone.json", list, "gone.json: No such file or directory; rerun"),
                                (".", dict, f"cannot read {tmp_path}: Is a directory")):
        with pytest.raises(DataError, match=re.escape(message)) as e:
            rs_data.read_json(tmp_path / name, kind, "rerun" if name == "gone.json" else "")
        assert "\n" not in str(e.value)


def test_disk_errors_names_only_space_problems(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=re.escape(f"no space left on the device writing {tmp_path / 'm.json'} (")):
        with rs_data.disk_errors(tmp_path / "m.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DataError, match="Disk quota exceeded.*; delete old runs"):
        with rs_data.disk_errors(tmp_path / "m.json", "delete old runs"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError):  # not about space: unchanged
        with rs_data.disk_errors(tmp_path / "m.json"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(RuntimeError, match="writer failed"):  # no errno and plenty of space: unchanged
        with rs_data.disk_errors(tmp_path / "m.json"):
            raise RuntimeError("writer failed")
    monkeypatch.setattr(rs_data.shutil, "disk_usage", lambda p: type("U", (), dict(free=1 << 20))())
    with pytest.raises(DataError, match=r"no space left.*\(1 MB free, RuntimeError: writer failed\)"):
        with rs_data.disk_errors(tmp_path / "m.json"):  # ... and on an (almost) full disk: named
            raise RuntimeError("writer failed")


def test_full_disk_while_building_the_cache_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    code, (kind, message) = in_child(build_under_limit, tmp_path / "d", tmp_path / "c")
    assert code == 0, "killed (SIGBUS is -7) instead of an error"
    assert kind == "raised" and message.startswith("DataError: no space left on the device writing ")
    assert str(tmp_path / "c" / "potsdam_train.npy") in message and "the cache needs 0.8 MB" in message
    assert "--cache-dir" in message and "\n" not in message
    assert list((tmp_path / "c").iterdir()) == []  # no .tmp, no .lock, no manifest
    want = np.array(potsdam_train(tmp_path / "d", tmp_path / "c"))  # with room, it builds
    assert want.shape == (4, 3, 256, 256)
    unsupported = lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "Operation not supported"))
    monkeypatch.setattr(rs_data.os, "posix_fallocate", unsupported)  # a file system without fallocate
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c2"), want)


def test_two_processes_building_one_cache_at_once_both_succeed_with_one_build(tmp_path):
    make_potsdam(tmp_path / "d")
    with CHILD.Manager() as manager, CHILD.Pool(2) as pool:
        start = manager.Barrier(2)
        results = [pool.apply_async(slow_build, (tmp_path / "d", tmp_path / "c", start)) for _ in range(2)]
        (a, logs_a), (b, logs_b) = [r.get(timeout=60) for r in results]
    assert a.shape == (4, 3, 256, 256) and np.array_equal(a, b)
    builds = [m for m in logs_a + logs_b if "building the tile cache" in m]
    assert len(builds) == 1, logs_a + logs_b  # the second waited, then used the first one's cache
    assert any("waiting for another process" in m for m in logs_a + logs_b)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["potsdam_train.json", "potsdam_train.npy"]
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), a)


def test_cache_lock_excludes_and_a_waiter_relocks_after_the_file_is_removed(tmp_path):
    path, inside, clashes, done = tmp_path / "k.lock", [], [], []

    def worker():
        for _ in range(15):
            with rs_data.cache_lock(path, lambda m: None):
                inside.append(1)
                if len(inside) > 1:
                    clashes.append(1)
                time.sleep(0.002)
                inside.pop()
            done.append(1)

    threads = [threading.Thread(target=worker) for _ in range(3)]  # flock: one lock per open file, so threads
    for t in threads:  # of one process exclude each other as processes do
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 45 and not clashes and not path.exists()


def test_a_valid_cache_in_a_read_only_folder_is_used_without_any_lock(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = np.array(rs_data.task_tiles("potsdam", tmp_path / "d", "train", **QUIET))  # in DATA/.cosmae_cache
    before = sorted(p.name for p in (tmp_path / "d" / ".cosmae_cache").iterdir())
    monkeypatch.setattr(rs_data, "writable", lambda d: False)
    monkeypatch.setattr(rs_data, "cache_lock", lambda *a: (_ for _ in ()).throw(AssertionError("locked")))
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    assert np.array_equal(rs_data.task_tiles("potsdam", tmp_path / "d", "train", **QUIET), first)
    assert sorted(p.name for p in (tmp_path / "d" / ".cosmae_cache").iterdir()) == before


def count_reads(monkeypatch) -> list:
    real, calls = rs_data.read_rgb, []
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_cache_whose_npy_is_truncated_or_of_another_shape_is_rebuilt(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    first = np.array(potsdam_train(tmp_path / "d", tmp_path / "c"))
    npy, man = tmp_path / "c" / "potsdam_train.npy", tmp_path / "c" / "potsdam_train.json"
    assert rs_data.json.loads(man.read_text())["shape"] == [4, 3, 256, 256]
    calls = count_reads(monkeypatch)
    truncate(npy, 0.6)  # a copy cut short, the manifest intact
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and calls
    calls.clear()
    np.save(npy, np.zeros((3, 3, 256, 256), np.uint8))  # whole, but not what the manifest says
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and calls
    calls.clear()
    stored = rs_data.json.loads(man.read_text())  # a manifest of an older version, without the shape: rebuilt
    del stored["shape"]
    man.write_text(rs_data.json.dumps(stored))
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and calls
    calls.clear()
    np.save(npy, np.zeros((4, 3, 256, 256), np.uint16))  # the right shape, not uint8
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and calls


def test_the_temporary_file_of_a_killed_build_is_removed_by_the_next_build(tmp_path):
    make_potsdam(tmp_path / "d")
    (tmp_path / "c").mkdir()
    for name in ("potsdam_train.npy.4242.0badf00d.tmp", "potsdam_train.npy.tmp", "potsdam_val.npy.1.2.tmp"):
        (tmp_path / "c" / name).write_bytes(b"\0" * 1000)
    potsdam_train(tmp_path / "d", tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [  # another cache's file is not touched
        "potsdam_train.json", "potsdam_train.npy", "potsdam_val.npy.1.2.tmp"]

BROKEN = r"cannot read {}: .*; re-copy or remove it \(LZW/JPEG TIFFs need: pip install imagecodecs\)$"


def test_truncated_potsdam_orthophoto_is_named_when_its_header_is_read(tmp_path, monkeypatch):
    paths = make_potsdam(tmp_path / "d")
    files = rs_data.split_files("potsdam", tmp_path / "d" / "Potsdam", 0)
    truncate(files["train"][1], 0.9)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pixels")))
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(files["train"][1])))):
        potsdam_train(tmp_path / "d", tmp_path / "c")
    assert len(paths) == 3 and list((tmp_path / "c").iterdir()) == []


def test_truncated_tiff_pixels_are_an_error_not_zeros(tmp_path):
    path = make_potsdam(tmp_path / "d", n=1)[0]
    truncate(path, 0.97)  # the last tile cut short
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(path)))) as e:
        rs_data.read_rgb(path, n_bands=4)
    assert re.search(r"page 0 needs \d+ bytes, the file has \d+", str(e.value))


def test_tiff_cut_in_its_page_chain_is_not_read_as_its_first_page(tmp_path):
    """A TIFF of many pages whose shape tifffile keeps in its metadata (the test datasets' Potsdam files), cut short
    (here: in the middle, and exactly at a page): its first page's shape, 256×4, is named, not read as the image."""
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 256, (256, 256, 4), dtype=np.uint8),
                     tile=(256, 256), photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 256 and tif.series[0].shape == (256, 256, 4)
        cut_at = tif.pages[1].offset  # the second page's header: the first page is whole
    data = path.read_bytes()
    named = re.escape(str(path)) + r"(: shape \(256, 4\), expected 4 bands|: page \d+ needs \d+ bytes)"
    for keep in (len(data) // 2, cut_at):
        path.write_bytes(data[:keep])
        for header in (True, False):
            with pytest.raises(DataError, match=named):
                rs_data.read_rgb(path, n_bands=4, header=header)


def test_tiff_with_the_wrong_bands_is_named_when_its_header_is_read(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    bad = rs_data.split_files("potsdam", tmp_path / "d" / "Potsdam", 0)["train"][0]
    tifffile.imwrite(bad, bands_image([1, 2, 3], 256, 512, np.uint8))  # RGB in the RGBIR folder
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pixels")))
    with pytest.raises(DataError, match=re.escape(f"{bad}: shape (256, 512, 3), expected 4 bands")):
        potsdam_train(tmp_path / "d", tmp_path / "c")
    tifffile.imwrite(bad, bands_image([1, 2, 3, 4], 256, 512, np.uint16))
    with pytest.raises(DataError, match=re.escape(f"{bad}: dtype uint16, expected uint8")):
        potsdam_train(tmp_path / "d", tmp_path / "c")


def make_uavid(root: Path) -> Path:
    """UAVid with one random 8-bit frame per sequence (noise: the PNG is as large as its pixels)."""
    for split, seq in (("uavid_train", "seq1"), ("uavid_train", "seq2"), ("uavid_val", "seq16")):
        (root / "UAVid" / split / seq / "Images").mkdir(parents=True)
        img = np.random.default_rng(len(seq)).integers(0, 256, (256, 512, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "UAVid" / split / seq / "Images" / "000000.png")
    return root / "UAVid" / "uavid_train" / "seq2" / "Images" / "000000.png"


@pytest.mark.parametrize("load_truncated", [False, True])
def test_truncated_png_is_named_and_no_cache_is_left(tmp_path, monkeypatch, load_truncated):
    png = make_uavid(tmp_path / "d")
    truncate(png, 0.6)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)  # some library may have set it
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(png)))):
        rs_data.task_tiles("uavid", tmp_path / "d", "train", tmp_path / "c", **QUIET)
    assert list((tmp_path / "c").iterdir()) == [] and ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated
    png.write_bytes(png.read_bytes()[:20])  # even the header cut
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(png)))):
        rs_data.task_tiles("uavid", tmp_path / "d", "train", tmp_path / "c", **QUIET)


def write_png16(path: Path, a: np.ndarray):
    """A 16-bit PNG (Pillow cannot write 16-bit colour): a [H, W, C] uint16, C = 1 grey, 2 grey + alpha, 3 RGB,
    4 RGBA. Row r uses PNG filter r % 5 (None, Sub, Up, Average, Paeth), so that decoding must unfilter right."""
    h, w, ch = a.shape
    raw = a.astype(">u2").reshape(h, w * ch).view(np.uint8).reshape(h, -1).astype(np.int32)  # big-endian bytes
    bpp, rows = 2 * ch, []
    for r in range(h):
        x = raw[r]
        up = raw[r - 1] if r else np.zeros_like(x)
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        p = left + up - upleft
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        pred = [0 * x, left, up, (left + up) // 2, paeth][r % 5]
        rows.append(bytes([r % 5]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    chunk = lambda kind, d: struct.pack(">I", len(d)) + kind + d + struct.pack(">I", zlib.crc32(kind + d))
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[ch]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4, 1, 2])
def test_16_bit_png_is_scaled_to_8_bits_not_cut_or_saturated(tmp_path, channels):
    g = np.random.default_rng(channels)
    a = g.integers(0, 65536, (7, 9, channels), dtype=np.uint16)
    a[0, :6, 0] = [0, 128, 129, 1000, 40000, 65535]  # → 0, 0, 1, 4 (Pillow's high byte: 3), 156, 255
    write_png16(tmp_path / "f.png", a)
    got = rs_data.read_rgb(tmp_path / "f.png")
    colour = a[..., :3] if channels >= 3 else np.repeat(a[..., :1], 3, -1)  # alpha dropped, grey → RGB
    want = np.round(colour.astype(np.float64) * 255 / 65535).astype(np.uint8).transpose(2, 0, 1)
    assert got.dtype == np.uint8 and np.abs(got.astype(int) - want).max() <= 1  # colour: Pillow's high byte
    assert list(got[0, 0, :6]) == ([0, 0, 1, 4, 156, 255] if channels == 1 else [0, 0, 0, 3, 156, 255])


def test_8_bit_rgb_palette_and_grey_png_read_as_before(tmp_path):
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(g.integers(0, 256, (5, 6), dtype=np.uint8), "L").convert("P").save(tmp_path / "p.png")
    Image.fromarray(g.integers(0, 256, (5, 6), dtype=np.uint8), "L").save(tmp_path / "l.png")
    Image.fromarray(g.integers(0, 256, (5, 6, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    for f in ("rgb.png", "p.png", "l.png", "rgba.png"):
        want = np.asarray(Image.open(tmp_path / f).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(rs_data.read_rgb(tmp_path / f), want)


def test_missing_or_unreadable_image_says_why(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"cannot read {tmp_path / 'gone.tif'}: No such file")):
        rs_data.read_rgb(tmp_path / "gone.tif", header=True)
    with pytest.raises(DataError, match=re.escape(f"cannot read {tmp_path / 'gone.png'}: No such file")):
        rs_data.read_rgb(tmp_path / "gone.png")
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(tmp_path / "text.png")))):
        rs_data.read_rgb(tmp_path / "text.png", header=True)


def test_ucmerced_with_too_few_images_for_ml_knn_says_how_many_are_needed(tmp_path, monkeypatch):
    labels = ucmerced_folder(tmp_path / "U", n_per_class=7)  # 21 images: 10 to train on
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    with pytest.raises(DataError, match=re.escape(f"{labels}: 21 images, 10 to train on; ML-kNN (k=10) needs 23 ")):
        ucm(tmp_path / "U")
    with pytest.raises(DataError, match=re.escape("ML-kNN (k=20) needs 44 images")):
        ucm(tmp_path / "U", k=20)
    monkeypatch.undo()
    assert len(ucm(tmp_path / "U", k=9)["train"][0]) == 10


def test_ucmerced_of_23_images_is_enough(tmp_path):
    labels = ucmerced_folder(tmp_path / "U", n_per_class=8)
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]) + "\n")  # 23 rows (the 24th image is not listed, so not used)
    s = ucm(tmp_path / "U")
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [11, 3, 9]


def test_ucmerced_label_file_of_zeros_only_is_an_error_and_a_label_nobody_has_is_fine(tmp_path):
    labels = ucmerced_folder(tmp_path / "U")
    s = ucm(tmp_path / "U")
    y = np.concatenate([s[k][1] for k in ("train", "val", "test")])
    assert not y[:, 5].any() and y[:, 16].any()  # 'court' occurs nowhere: fine
    lines = labels.read_text().splitlines()
    zeros = [lines[0]] + [ln.split("\t")[0] + "\t0" * 17 for ln in lines[1:]]
    labels.write_text("\r\n".join(zeros) + "\r\n")
    with pytest.raises(DataError, match=re.escape(f"{labels}: no label value 1 in its 24 image rows")):
        ucm(tmp_path / "U")
    labels.write_text(lines[0] + "\n")  # no image row at all
    with pytest.raises(DataError, match=re.escape(f"{labels}: no label value 1 in its 0 image rows")):
        ucm(tmp_path / "U")


def test_ucmerced_image_listed_twice_names_it_and_both_lines(tmp_path):
    labels = ucmerced_folder(tmp_path / "U")
    lines = labels.read_text().splitlines()
    lines.insert(5, lines[1])  # airplane00 again, at line 6
    labels.write_text("\r\n".join(lines) + "\r\n")
    with pytest.raises(DataError, match=re.escape(f"{labels} lines 2 and 6: image 'airplane00' is listed twice")):
        ucm(tmp_path / "U")


def test_ucmerced_trailing_tab_is_accepted_and_reads_the_same(tmp_path):
    ucmerced_folder(tmp_path / "plain" / "U")
    ucmerced_folder(tmp_path / "tabbed" / "U", end="\t")
    a, b = ucm(tmp_path / "plain" / "U"), ucm(tmp_path / "tabbed" / "U")
    assert a["labels"] == b["labels"] == UCM_NAMES
    for k in ("train", "val", "test"):
        assert np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1])
    labels = tmp_path / "tabbed" / "U" / "LandUse_Multilabeled.txt"
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 2)[0] + "\t"  # a value missing before the trailing tab: still an error
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 4: expected an image name and 17 values.*got 16 values"):
        ucm(tmp_path / "tabbed" / "U")


def test_task_eval_labels_are_the_elements_in_the_images(small_eval):
    """A task's own evaluation labels are the elements drawn in its own images (its own sensor): the labels
    come with the scenes, and the images are those scenes seen by the task's sensor."""
    size = 24
    own = rs_data.evaluation_sets(["synth_blue"], size)["own"][0]
    (x, y), (xt, yt) = own["train"], own["test"]
    assert len(x) == len(xt) == 60 and not np.array_equal(x, xt)
    scenes, labels = rs_data.synth_scenes(120, size, (rs_data.DATA_SEED + 1000) * 10 + 3)  # task 4: blue band
    assert np.array_equal(np.concatenate([y, yt]), labels)
    assert np.array_equal(np.concatenate([x, xt])[:, 2], np.clip(scenes, 0, 255).astype(np.uint8))
    main = rs_data.synthetic_eval_set(size, ["synth_pan", "synth_red"])
    assert len(main["train"][0]) == 60 and len(main["test"][0]) == 40 and main["labels"] == list(rs_data.SYNTH_LABELS)


def make_folder(root: Path) -> dict:
    """A folder task: RGB PNG, JPEG and TIFF images of several sizes (25 patches), in a sub-folder too, and a note."""
    g, images = np.random.default_rng(5), {}
    for name, (h, w) in (("a.png", (300, 520)), ("c.tif", (768, 1024)), ("e.tiff", (512, 768)),
                         ("sub/b.jpg", (256, 256)), ("sub/d.png", (520, 520))):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        images[name] = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if name.endswith((".tif", ".tiff")):
            tifffile.imwrite(root / name, images[name])
        else:
            Image.fromarray(images[name]).save(root / name)
            images[name] = np.asarray(Image.open(root / name).convert("RGB"))  # the JPEG as decoded
    Image.fromarray(images["sub/d.png"]).quantize(16).save(root / "sub" / "d.png")  # a palette PNG: colour too
    images["sub/d.png"] = np.asarray(Image.open(root / "sub" / "d.png").convert("RGB"))
    (root / "notes.txt").write_text("not an image")
    return images


def folder_tiles(folder, split, cache, **kw):
    return np.array(rs_data.task_tiles(str(folder), "", split, cache, **QUIET, **kw))


def test_a_folder_of_images_is_a_task_tiled_cached_with_a_seeded_held_out_share(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "flights")

    def patches():  # every image's 256×256 patches in file order, row by row
        return np.stack([img[r:r + 256, c:c + 256].transpose(2, 0, 1) for _, img in sorted(images.items())
                         for r in range(0, len(img) - 255, 256) for c in range(0, img.shape[1] - 255, 256)])

    want = patches()
    train, val = (folder_tiles(tmp_path / "flights", s, tmp_path / "c") for s in ("train", "val"))
    assert len(want) == 25 and len(train) == 23 and len(val) == 2  # 1 in 10 patches held out
    pick = np.sort(np.random.default_rng([rs_data.DATA_SEED, 7]).permutation(25)[:2])
    assert np.array_equal(val, want[pick]) and np.array_equal(train, np.delete(want, pick, 0))  # PNG: exact pixels
    assert np.array_equal(folder_tiles(tmp_path / "flights", "val", tmp_path / "c2"), val)  # the same draw again
    assert rs_data.task_name(str(tmp_path / "flights")) == "flights"
    assert sorted(p.name for p in (tmp_path / "c").glob("*.npy")) == [
        f"flights-{rs_data.hashlib.sha1(str(tmp_path / 'flights').encode()).hexdigest()[:8]}_{s}.npy"
        for s in ("train", "val")]  # the folder's path in the key: another folder 'flights' has its own cache
    images["a.png"] = np.zeros((300, 520, 3), np.uint8)
    Image.fromarray(images["a.png"]).save(tmp_path / "flights" / "a.png")  # the folder changed: rebuilt
    assert np.array_equal(folder_tiles(tmp_path / "flights", "train", tmp_path / "c"), np.delete(patches(), pick, 0))
    calls = count_reads(monkeypatch)
    folder_tiles(tmp_path / "flights", "train", tmp_path / "c")
    assert not calls  # unchanged: from the cache


def test_bad_folder_tasks_are_one_line_naming_the_folder_or_file(tmp_path, capsys):
    bad = tmp_path / "bad"

    def says(message):  # `error: message...`, one line, exit 2
        with pytest.raises(SystemExit) as e:
            runner.cli(rs_data.task_tiles, str(bad), "", "train", tmp_path / "c", 0, lambda m: None)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err

    bad.mkdir()
    says(f"{bad}: no PNG, JPEG or TIFF image in it")
    (bad / "x.txt").write_text("x")
    says(f"{bad}: no PNG, JPEG or TIFF image in it or its sub-folders")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(bad / "grey.png")
    says(f"{bad}: one 256×256 patch; a folder task needs 2 or more")
    Image.fromarray(np.zeros((300, 600, 3), np.uint8)).save(bad / "rgb.jpg")
    says(f"{bad}: grey and colour images mixed ({bad / 'grey.png'}, {bad / 'rgb.jpg'}): make them all RGB")
    (bad / "grey.png").unlink()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n...")
    says(f"cannot read {bad / 'broken.png'}: UnidentifiedImageError")
    (bad / "broken.png").unlink()
    Image.fromarray(np.zeros((255, 900, 3), np.uint8)).save(bad / "thin.png")
    says(f"{bad / 'thin.png'}: 900×255 pixels; a folder task needs images of at least 256")
    (bad / "thin.png").unlink()
    tifffile.imwrite(bad / "n.tif", np.zeros((256, 256, 4), np.uint8))
    says(f"{bad / 'n.tif'}: shape (256, 256, 4), expected 3 bands")
    tifffile.imwrite(bad / "n.tif", np.zeros((256, 256, 3), np.uint16))
    says(f"{bad / 'n.tif'}: dtype uint16, expected uint8")
    (bad / "n.tif").unlink()
    (bad / "link.png").symlink_to(bad / "gone.png")
    says(f"cannot read {bad / 'link.png'}: no such file (a dangling link?)")
    assert list((tmp_path / "c").iterdir()) == []
