"""rs_data.py for long, parallel runs: atomic writes, a full disk, the tile cache's lock and checks, broken
images, UCMerced's label file. Every user-facing problem is one rs_data.DataError line naming the file.
Tiny files in the datasets' official layouts; the processes that must run apart are forked (Linux)."""
import errno
import multiprocessing
import re
import resource
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageFile

import rs_data
from rs_data import DataError

CHILD = multiprocessing.get_context("forkserver")
QUIET = dict(log=lambda m: None)


# --- tiny files in the official layouts ------------------------------------------------------------------

def bands_image(values, h, w, dtype, chw=False):
    """An image whose band b is the constant values[b]: [H, W, C] (or [C, H, W])."""
    a = np.stack([np.full((h, w), v, dtype) for v in values])
    return a if chw else a.transpose(1, 2, 0)


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


def potsdam_train(root: Path, cache: Path, **kw) -> np.ndarray:
    return rs_data.task_tiles("potsdam", root, "train", cache, **{**QUIET, **kw})


def truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


UCM_NAMES = ["airplane", "bare-soil", "buildings", "cars", "chaparral", "court", "dock", "field", "grass",
             "mobile-home", "pavement", "sand", "sea", "ship", "tanks", "trees", "water"]


def make_ucmerced(root: Path, n_per_class=8, sep="\t", end="") -> Path:
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


def _child(q, target, args):
    try:
        q.put(("ok", target(*args)))
    except BaseException as e:  # noqa: B902 (reported to the parent)
        q.put(("raised", f"{type(e).__name__}: {e}"))


def in_child(target, *args):
    """Run target(*args) in a child process; → (exit code, what it returned or the text of what it raised). The
    child comes from a fork server started clean: a child forked from a process whose OpenMP threads already ran
    (torch in the other tests) can hang in its first parallel region."""
    q = CHILD.Queue()
    p = CHILD.Process(target=_child, args=(q, target, args))
    p.start()
    try:
        out = q.get(timeout=120)
    except Exception:
        out = ("nothing", None)
    p.join(30)
    return p.exitcode, out


def limit_file_size(nbytes: int):
    """What a full disk does to a write, in this process only: writes past nbytes fail with EFBIG (Python
    ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


# --- atomic_write and disk_errors ---------------------------------------------------------------------

def test_atomic_write_temporary_names_are_unique_per_call_and_process(tmp_path):
    seen = []
    for text in ("a", "b"):
        rs_data.atomic_write(tmp_path / "x.json", lambda tmp: seen.append(tmp) or tmp.write_text(text))
    assert seen[0] != seen[1] and all(t.parent == tmp_path and t.name.endswith(".tmp") for t in seen)
    assert all(re.fullmatch(rf"x\.json\.{__import__('os').getpid()}\.[0-9a-f]{{8}}\.tmp", t.name) for t in seen)
    assert (tmp_path / "x.json").read_text() == "b" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _write_many(path: Path, byte: bytes, n: int):
    def write(tmp):
        with open(tmp, "wb") as f:
            for _ in range(8):  # slowly, in pieces: the other process writes at the same time
                f.write(byte * 4096)
                time.sleep(0.001)
    for _ in range(n):
        rs_data.atomic_write(path, write)
    return "done"


def test_two_processes_writing_one_file_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "summary.json"
    procs = [CHILD.Process(target=_write_many, args=(target, b, 15)) for b in (b"a", b"b")]
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


def _write_under_limit(path: Path, how: str):
    limit_file_size(100_000)
    writers = {"text": lambda tmp: tmp.write_text("x" * 300_000),  # OSError EFBIG
               "numpy": lambda tmp: np.save(open(tmp, "wb"), np.zeros(100_000)),  # OSError without errno
               "torch": lambda tmp: torch.save({"w": torch.zeros(100_000)}, tmp)}  # RuntimeError of its writer
    rs_data.atomic_write(path, writers[how])


@pytest.mark.parametrize("how", ["text", "numpy", "torch"])
def test_full_disk_in_atomic_write_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, how):
    code, (kind, message) = in_child(_write_under_limit, tmp_path / "task1.pt", how)
    assert code == 0 and kind == "raised" and message.startswith("DataError: no space left on the device writing ")
    assert str(tmp_path / "task1.pt") in message and "free space" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


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
    with pytest.raises(DataError, match=r"no space left.*\(1 MB free after RuntimeError: writer failed\)"):
        with rs_data.disk_errors(tmp_path / "m.json"):  # ... and on an (almost) full disk: named
            raise RuntimeError("writer failed")


# --- the tile cache: full disk, two builders, checks ---------------------------------------------------------

def _build_under_limit(root: Path, cache: Path):
    limit_file_size(300_000)  # the train cache is 4 patches, 786 kB
    potsdam_train(root, cache)


def test_full_disk_while_building_the_cache_is_one_line_and_leaves_nothing(tmp_path):
    make_potsdam(tmp_path / "d")
    code, (kind, message) = in_child(_build_under_limit, tmp_path / "d", tmp_path / "c")
    assert code == 0, "killed (SIGBUS is -7) instead of an error"
    assert kind == "raised" and message.startswith("DataError: no space left on the device writing ")
    assert str(tmp_path / "c" / "potsdam_train.npy") in message and "the cache needs 0.8 MB" in message
    assert "--cache-dir" in message and "\n" not in message
    assert list((tmp_path / "c").iterdir()) == []  # no .tmp, no .lock, no manifest
    assert potsdam_train(tmp_path / "d", tmp_path / "c").shape == (4, 3, 256, 256)  # with room, it builds


def test_reserve_falls_back_to_writing_zeros_where_fallocate_is_not_supported(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    want = np.array(potsdam_train(tmp_path / "d", tmp_path / "c1"))
    calls = []

    def unsupported(fd, offset, size):
        calls.append(size)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(rs_data.os, "posix_fallocate", unsupported)
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c2"), want)
    assert calls == [4 * 3 * 256 * 256]
    monkeypatch.setattr(rs_data.os, "posix_fallocate",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output"):  # any other error of fallocate is not hidden
        potsdam_train(tmp_path / "d", tmp_path / "c3")
    assert list((tmp_path / "c3").iterdir()) == []


def _slow_build(root: Path, cache: Path):
    real = rs_data.read_rgb

    def slow(*a, **k):
        time.sleep(0.3)  # the other process starts while this one builds
        return real(*a, **k)

    rs_data.read_rgb = slow
    logs = []
    tiles = rs_data.task_tiles("potsdam", root, "train", cache, log=logs.append)
    return np.array(tiles), logs


def test_two_processes_building_one_cache_at_once_both_succeed_with_one_build(tmp_path):
    make_potsdam(tmp_path / "d")
    with CHILD.Pool(2) as pool:
        results = [pool.apply_async(_slow_build, (tmp_path / "d", tmp_path / "c")) for _ in range(2)]
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
    stored = rs_data.json.loads(man.read_text())  # a manifest written before it held the shape: still trusted
    del stored["shape"]
    man.write_text(rs_data.json.dumps(stored))
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and not calls
    np.save(npy, np.zeros((4, 3, 256, 256), np.float32)[..., :1])  # ... unless its .npy is not uint8 tiles
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and calls


def test_the_temporary_file_of_a_killed_build_is_removed_by_the_next_build(tmp_path):
    make_potsdam(tmp_path / "d")
    (tmp_path / "c").mkdir()
    for name in ("potsdam_train.npy.4242.0badf00d.tmp", "potsdam_train.npy.tmp", "potsdam_val.npy.1.2.tmp"):
        (tmp_path / "c" / name).write_bytes(b"\0" * 1000)
    potsdam_train(tmp_path / "d", tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [  # another cache's file is not touched
        "potsdam_train.json", "potsdam_train.npy", "potsdam_val.npy.1.2.tmp"]


# --- broken images: one line naming the file ---------------------------------------------------------------

BROKEN = r"cannot read {}: truncated or corrupt \(.*\); re-copy it or remove it from the folder$"


def test_truncated_potsdam_orthophoto_is_named_when_its_header_is_read(tmp_path, monkeypatch):
    paths = make_potsdam(tmp_path / "d")
    files = rs_data.split_files("potsdam", tmp_path / "d" / "Potsdam", 0)
    truncate(files["train"][1], 0.9)
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pixels read")))
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
    """The report's 'truncated Potsdam tile skipped silently': a TIFF of many pages whose shape tifffile keeps
    in its metadata (the test datasets' Potsdam files) cut short was read as its first page, 256×4, which has no
    256×256 patch. Here: 256 deflated pages; the cut and a page chain cut exactly at a page."""
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 256, (256, 256, 4), dtype=np.uint8),
                     tile=(256, 256), photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 256 and tif.series[0].shape == (256, 256, 4)
        cut_at = tif.pages[1].offset  # the second page's header: the first page is whole
    data = path.read_bytes()
    for keep in (len(data) // 2, cut_at):
        path.write_bytes(data[:keep])
        with pytest.raises(DataError, match=BROKEN.format(re.escape(str(path)))):
            rs_data.image_size(path, n_bands=4)
        with pytest.raises(DataError, match=BROKEN.format(re.escape(str(path)))):
            rs_data.read_rgb(path, n_bands=4)


def test_tiff_with_the_wrong_bands_is_named_when_its_header_is_read(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    bad = rs_data.split_files("potsdam", tmp_path / "d" / "Potsdam", 0)["train"][0]
    tifffile.imwrite(bad, bands_image([1, 2, 3], 256, 512, np.uint8))  # RGB in the RGBIR folder
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pixels read")))
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
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert list(got[0, 0, :6]) == [0, 0, 1, 4, 156, 255]


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
        rs_data.image_size(tmp_path / "gone.tif")
    with pytest.raises(DataError, match=re.escape(f"cannot read {tmp_path / 'gone.png'}: No such file")):
        rs_data.read_rgb(tmp_path / "gone.png")
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(tmp_path / "text.png")))):
        rs_data.image_size(tmp_path / "text.png")


# --- UCMerced: the label file and the size of the folder -----------------------------------------------------

def ucm(root: Path, **kw):
    return rs_data.ucmerced_splits(root, root.parent / "c", **QUIET, **kw)


def test_ucmerced_with_too_few_images_for_ml_knn_says_how_many_are_needed(tmp_path, monkeypatch):
    labels = make_ucmerced(tmp_path / "U", n_per_class=7)  # 21 images: 10 to train on
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    with pytest.raises(DataError, match=re.escape(f"{labels}: 21 images, so the training split holds 10 (1000 of "
                                                  "every 2100); ML-kNN with k = 10 neighbours needs more than 10 "
                                                  "training images: list at least 23 images")):
        ucm(tmp_path / "U")
    with pytest.raises(DataError, match="k = 20 neighbours.*at least 44 images"):
        ucm(tmp_path / "U", k=20)
    monkeypatch.undo()
    assert len(ucm(tmp_path / "U", k=9)["train"][0]) == 10


def test_ucmerced_of_23_images_is_enough(tmp_path):
    labels = make_ucmerced(tmp_path / "U", n_per_class=8)
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]) + "\n")  # 23 rows (the 24th image is not listed, so not used)
    s = ucm(tmp_path / "U")
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [11, 3, 9]


def test_ucmerced_label_file_of_zeros_only_is_an_error_and_a_label_nobody_has_is_fine(tmp_path):
    labels = make_ucmerced(tmp_path / "U")
    s = ucm(tmp_path / "U")
    y = np.concatenate([s[k][1] for k in ("train", "val", "test")])
    assert not y[:, 5].any() and y[:, 16].any()  # 'court' occurs nowhere: fine
    lines = labels.read_text().splitlines()
    zeros = [lines[0]] + [ln.split("\t")[0] + "\t0" * 17 for ln in lines[1:]]
    labels.write_text("\r\n".join(zeros) + "\r\n")
    with pytest.raises(DataError, match=re.escape(f"{labels}: every label value is 0 in its 24 rows")):
        ucm(tmp_path / "U")


def test_ucmerced_image_listed_twice_names_it_and_both_lines(tmp_path):
    labels = make_ucmerced(tmp_path / "U")
    lines = labels.read_text().splitlines()
    lines.insert(5, lines[1])  # airplane00 again, at line 6
    labels.write_text("\r\n".join(lines) + "\r\n")
    with pytest.raises(DataError, match=re.escape(f"{labels} lines 2 and 6: image 'airplane00' is listed twice")):
        ucm(tmp_path / "U")


def test_ucmerced_trailing_tab_is_accepted_and_reads_the_same(tmp_path):
    make_ucmerced(tmp_path / "plain" / "U")
    make_ucmerced(tmp_path / "tabbed" / "U", end="\t")
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
