"""CoSMAE's data: each task is a uint8 array of RGB tiles [n, 3, S, S], synthetic or read from the paper's datasets'
official layouts (US3D, UAVid, Potsdam, TreeSatAI; UCMerced to evaluate) into a memory-mapped tile cache."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging.handlers
import math
import os
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # the tile cache's build lock (POSIX); without it two builds of one cache just both work
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """A problem with the user's input (data, task name, checkpoint): the CLIs print it and exit with 2."""


def read_json(path, kind, todo: str = ""):
    """The object in JSON file `path`, a `kind` (dict or list), else a one-line DataError naming it (+ "; todo")."""
    path, todo = Path(path), f"; {todo}" if todo else ""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file{todo}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}{todo}") from None
    except ValueError as e:  # not JSON, or not text
        raise DataError(f"{path} is corrupt ({e}){todo}") from None
    if not isinstance(obj, kind):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a JSON {kind.__name__}{todo}")
    return obj


DATA_SEED = 0  # which patches and splits are drawn, the same in every run (--seed varies model, order, augmentation)


# --- the built-in synthetic default -----------------------------------------------------------------------
SYNTH_LABELS = ("building", "road", "tree", "water", "car")
SYNTH_DOMAINS = {  # ground colour, sensor tint, object scale, P(element present) for SYNTH_LABELS
    "synth_city": dict(ground=(125, 120, 112), tint=(1.0, 1.0, 1.05), scale=0.8, p=(0.8, 0.7, 0.4, 0.3, 0.6)),
    "synth_farm": dict(ground=(150, 138, 78), tint=(1.05, 1.0, 0.9), scale=1.3, p=(0.4, 0.5, 0.6, 0.3, 0.3)),
    "synth_forest": dict(ground=(78, 100, 55), tint=(0.9, 1.05, 0.95), scale=1.0, p=(0.3, 0.4, 0.9, 0.4, 0.3)),
    "synth_coast": dict(ground=(205, 188, 140), tint=(1.0, 1.0, 1.1), scale=1.5, p=(0.5, 0.4, 0.3, 0.8, 0.4)),
}


def synth_image(rng: np.random.Generator, size: int, ground, tint, scale: float, p, jitter: float = 0.5,
                noise: float = 6.0) -> tuple:
    """One RS-like tile → ([S, S, 3] uint8, [5] 0/1 SYNTH_LABELS); colours jittered ±jitter·255 per channel."""
    col = lambda c: np.clip(np.asarray(c, np.float32) + rng.uniform(-jitter, jitter, 3) * 255, 20, 235)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [S, S] coordinates in [0, 1)
    f = rng.uniform(2, 6, 2)
    img = col(ground) * (1 + 0.1 * np.sin(f[0] * 6.3 * xx + rng.uniform(0, 6)) * np.cos(f[1] * 6.3 * yy))[..., None]
    present = rng.random(5) < np.asarray(p)
    if present[3]:  # water: a region behind a wavy shore line, with ripples parallel to the shore
        shore = rng.uniform(0.3, 0.7) + 0.08 * np.sin(rng.uniform(4, 12) * xx + rng.uniform(0, 6))
        water = yy > shore if rng.random() < 0.5 else yy < shore
        ripple = 1 + 0.25 * np.sin(2 * np.pi * (yy - shore) * size / 5)
        img[water] = col((40, 80, 140)) * ripple[water, None]
    road = None
    if present[1]:  # road: a straight band with a dashed centre line
        a, c, w = rng.uniform(0, np.pi), rng.uniform(0.3, 0.7), 0.05 * scale
        road = (xx - c) * np.cos(a) + (yy - c) * np.sin(a)
        img[np.abs(road) < w] = col((105, 105, 108))
        along = -(xx - c) * np.sin(a) + (yy - c) * np.cos(a)
        img[(np.abs(road) < 0.008) & (np.sin(along * 60) > 0)] = (235, 235, 235)
    if present[2]:  # trees: round crowns, bright at the top-left, dark at the rim
        tree = col((35, 75, 30))
        for _ in range(rng.integers(4, 16)):
            cy, cx, r = rng.random(), rng.random(), 0.05 * scale * rng.uniform(0.6, 1.4)
            d = ((yy - cy + r / 3) ** 2 + (xx - cx + r / 3) ** 2) / (r * r)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[inside] = tree * (1.5 - d[inside, None])
    if present[0]:  # buildings: rectangles with a two-tone striped roof and a shadow
        roof = col(rng.choice([(170, 80, 60), (150, 150, 155), (90, 90, 100)]))
        for _ in range(rng.integers(1, 5)):
            y0, x0 = rng.uniform(0.05, 0.75, 2)
            h, w = 0.12 * scale * rng.uniform(0.7, 1.5, 2)
            box = lambda dy, dx: (yy >= y0 + dy) & (yy < y0 + h + dy) & (xx >= x0 + dx) & (xx < x0 + w + dx)
            img[box(0.02, 0.02) & ~box(0, 0)] *= 0.45
            stripes = 1 + 0.3 * np.sign(np.sin(2 * np.pi * xx * size / 3))
            img[box(0, 0)] = roof * stripes[box(0, 0), None] * np.where(yy[box(0, 0)] < y0 + h / 2, 0.75, 1)[:, None]
    if present[4]:  # cars: small bright rectangles with a dark windscreen, on the road when there is one
        for _ in range(rng.integers(1, 6)):
            cy, cx = rng.uniform(0.05, 0.9, 2)
            if road is not None:
                on = np.argwhere(np.abs(road) < 0.02)
                cy, cx = on[rng.integers(len(on))] / size
            car = (np.abs(yy - cy) < 0.025) & (np.abs(xx - cx) < 0.04)
            img[car] = col(rng.choice([(220, 30, 30), (240, 240, 240), (30, 60, 200), (240, 200, 20)]))
            img[car & (xx > cx + 0.01)] *= 0.3
    img = img * np.asarray(tint, np.float32) + rng.normal(0, noise * rng.random(), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), present.astype(np.uint8)


SENSOR_NOISE = 140.0  # std of the sensors' noise, in grey levels
# the synthetic default: the scenes seen by four sensors in turn → the band that holds the scene (None: all three)
SYNTH_TASKS = {"synth_pan": None, "synth_red": 0, "synth_green": 1, "synth_blue": 2}


def sense(brightness: np.ndarray, band, rng: np.random.Generator, noise: float = SENSOR_NOISE) -> np.ndarray:
    """Scenes [n, S, S] (0-255) → uint8 [n, 3, S, S]: brightness in `band`, grey + noise in the others (None: all
    three bands, plus zero-mean colour noise)."""
    e = rng.normal(0, noise, (len(brightness), 3, *brightness.shape[1:])).astype(np.float32)
    if band is None:
        out = brightness[:, None] + (e - e.mean(1, keepdims=True)) * np.sqrt(1.5)
    else:
        out = 128 + e
        out[:, band] = brightness
    return np.clip(out, 0, 255).astype(np.uint8)


def synth_scenes(n: int, size: int, seed: int, p=(0.5,) * 5) -> tuple:
    """n scenes, regions city, farm, forest, coast in turn → (brightness float32 [n, S, S], labels uint8 [n, 5])."""
    rng, names = np.random.default_rng([seed, 17]), list(SYNTH_DOMAINS)
    imgs, labels = np.empty((n, size, size), np.float32), np.empty((n, 5), np.uint8)
    for i in range(n):
        img, labels[i] = synth_image(rng, size, **dict(SYNTH_DOMAINS[names[i % 4]], p=p))
        imgs[i] = img.astype(np.float32).mean(-1)
    return imgs, labels


def synth_task(name: str, n: int, size: int, seed: int) -> tuple:
    """n tiles of synthetic task `name`: scenes seen by its sensor → (uint8 [n, 3, S, S], uint8 [n, 5] labels)."""
    k = list(SYNTH_TASKS).index(name)
    brightness, labels = synth_scenes(n, size, seed * 10 + k)
    return sense(brightness, SYNTH_TASKS[name], np.random.default_rng([seed, k, 77])), labels


SYNTH_EVAL = dict(own=1000, train=1000, test=800)  # images: per task and split of its own set; the multi-label set


def synth_task_eval(name: str, size: int) -> dict:
    """A task's own labelled set, never trained on: {'train', 'test'}: (tiles, labels), SYNTH_EVAL['own'] each."""
    n = SYNTH_EVAL["own"]
    x, y = synth_task(name, 2 * n, size, DATA_SEED + 1000)
    return {"train": (x[:n], y[:n]), "test": (x[n:], y[n:])}


def synthetic_eval_set(size: int, tasks=None) -> dict:
    """The synthetic multi-label set, UCMerced-sized splits (SYNTH_EVAL): the given tasks' tiles in turn."""
    n_train, n_test = SYNTH_EVAL["train"], SYNTH_EVAL["test"]
    tasks, n = list(tasks or SYNTH_TASKS), n_train + n_test
    parts = [synth_task(name, -(-n // len(tasks)), size, DATA_SEED + 2000) for name in tasks]
    x = np.stack([p[0] for p in parts], 1).reshape(-1, 3, size, size)[:n]  # [n, 3, S, S]: the tasks in turn
    y = np.stack([p[1] for p in parts], 1).reshape(-1, len(SYNTH_LABELS))[:n]
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:]), "labels": list(SYNTH_LABELS)}


REC_TILES = 512  # held-out tiles per task for the reconstruction matrix R


def tile_size(tasks: list, img_size: int) -> int:
    """Raw tile side S: 256 for the real datasets; for synthetic tasks the same S/img ratio as 256/224."""
    return PATCH if tasks[0] in REAL_TASKS else round(img_size * PATCH / 224)


def evaluation_sets(tasks: list, size: int, ucmerced="", data_root="data", cache_dir="", treesat_resize=False) -> dict:
    """main: the multi-label set; own: each synthetic task's own labelled set (matrix A); held_out: each task's
    REC_TILES held-out tiles (matrix R): its own 'test', or a fixed subset of its val split."""
    synth = [t for t in tasks if t in SYNTH_TASKS]
    main = ucmerced_splits(ucmerced, cache_dir) if ucmerced else synthetic_eval_set(size, synth or None)
    own, held_out = [synth_task_eval(t, size) if t in SYNTH_TASKS else None for t in tasks], []
    for t, o in zip(tasks, own):
        if o is not None:
            held_out.append(o["test"][0][:REC_TILES])
        else:  # a fixed random subset of the val split, in its stored order
            tiles = task_tiles(t, data_root, "val", cache_dir, treesat_resize=treesat_resize)
            pick = np.random.default_rng([DATA_SEED, 11]).permutation(len(tiles))[:REC_TILES]
            held_out.append(np.asarray(tiles[np.sort(pick)]))
    return dict(main=main, own=own if all(own) else None, held_out=held_out)


# --- real datasets: official layouts → non-overlapping 256×256 patches (TreeSatAI: the centre one) -----------
REAL_TASKS = ("us3d", "uavid", "potsdam", "treesat")
PAPER_COUNTS = {"us3d": (21081, 3072), "uavid": (24560, 8640), "potsdam": (15870, 1058), "treesat": (15000, 1000)}
DATASETS = {  # folder names under --data-root, the files looked for, where to get the data
    "us3d": (("US3D", "us3d", "DFC2019", "dfc2019"), "JAX_*_RGB.tif (uint8, 3 bands) or JAX_*_MSI.tif (uint16, "
             "8 bands) 1024×1024 tiles; validation tiles in a folder whose name contains 'val'",
             "US3D / 2019 IEEE GRSS Data Fusion Contest track data (IEEE DataPort)"),
    "uavid": (("UAVid", "uavid"), "uavid_train/seqN/Images/*.png and uavid_val/seqN/Images/*.png", "uavid.nl"),
    "potsdam": (("Potsdam", "potsdam", "ISPRS_Potsdam"), "4_Ortho_RGBIR/top_potsdam_*_RGBIR.tif (R,G,B,IR) or "
                "2_Ortho_RGB/top_potsdam_*_RGB.tif, 6000×6000", "ISPRS 2D semantic labelling, Potsdam"),
    "treesat": (("TreeSatAI", "treesat", "TreeSat"), "aerial/60m/*.tif, 304×304, IR,G,B,R", "TreeSatAI (Zenodo)"),
}
PATCH = 256


def find_dataset(name: str, data_root) -> Path:
    names, layout, source = DATASETS[name]
    for n in names:
        if (Path(data_root) / n).is_dir():
            return Path(data_root) / n
    raise DataError(f"{name}: no folder {' or '.join(str(Path(data_root) / n) for n in names)}. Expected inside "
                    f"it: {layout}. Get the data from: {source}; or point --data-root at the folder holding it.")


def broken(path: Path, why: str) -> DataError:
    return DataError(f"cannot read {path}: truncated or corrupt ({why}); re-copy it or remove it from the folder")


@contextmanager
def image_errors(path: Path):
    """Any error reading an image → one line naming it: the OS's reason, the missing codec, else broken()."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        what = f"{type(e).__name__}: {str(e)[:160]}"
        if isinstance(e, OSError) and e.errno is not None:
            raise DataError(f"cannot read {path}: {e.strerror or what}") from None
        if "imagecodecs" in str(e):
            raise DataError(f"cannot read {path}: {what} (LZW/JPEG TIFFs need: pip install imagecodecs)") from None
        raise broken(path, what) from None


def read_tiff(path: Path, pixels: bool):
    """A TIFF's pixels, or (shape, dtype) from its header; data past the end or an ERROR tifffile logs: broken."""
    import tifffile
    errors = logging.handlers.BufferingHandler(10_000)
    errors.setLevel(logging.ERROR)
    logging.getLogger("tifffile").addHandler(errors)
    try:
        with image_errors(path), tifffile.TiffFile(path) as tif:
            end, series = tif.filehandle.size, tif.series[0]
            for page in tif.pages:
                for o, n in zip(page.dataoffsets, page.databytecounts):
                    if n and o + n > end:  # byte count 0: an empty tile, not an error
                        raise broken(path, f"page {page.index} needs {o + n} bytes, the file has {end}")
            out = tif.asarray() if pixels and not errors.buffer else (tuple(series.shape), series.dtype)
    finally:
        logging.getLogger("tifffile").removeHandler(errors)
    if errors.buffer:
        raise broken(path, f"tifffile: {errors.buffer[0].getMessage()[:120]}")
    return out


def check_bands(path: Path, shape: tuple, dtype, n_bands: int, bits: int):
    """n_bands bands ([H, W, C] or [C, H, W]) of uint8 (bits 8) or uint16, else a DataError."""
    if len(shape) != 3 or n_bands not in (shape[0], shape[-1]):
        raise DataError(f"{path}: shape {tuple(shape)}, expected {n_bands} bands ([H, W, C] or [C, H, W])")
    want = np.dtype(np.uint8 if bits == 8 else np.uint16)
    if dtype != want:
        raise DataError(f"{path}: dtype {dtype}, expected {want}")


def image_size(path: Path, n_bands=None, bits=8) -> tuple:
    """(H, W) from the header alone; a broken TIFF, or with n_bands one of other bands or dtype, is a DataError."""
    if path.suffix.lower() == ".png":
        from PIL import Image
        with image_errors(path), Image.open(path) as im:
            return im.height, im.width
    s, dtype = read_tiff(path, pixels=False)
    if n_bands is not None:
        check_bands(path, s, dtype, n_bands, bits)
    return (s[1], s[2]) if len(s) == 3 and s[0] < min(s[1], s[2]) else (s[0], s[1])


def read_rgb(path: Path, bands=(0, 1, 2), n_bands=3, bits=8) -> np.ndarray:
    """uint8 [3, H, W]: a PNG, or `bands` of an n_bands TIFF ([H, W, C] or [C, H, W]) of `bits` scaled to 8."""
    if path.suffix.lower() == ".png":
        return read_png(path)
    a = read_tiff(path, pixels=True)
    check_bands(path, a.shape, a.dtype, n_bands, bits)
    a = a if a.shape[0] == n_bands and a.shape[-1] != n_bands else a.transpose(2, 0, 1)  # → [C, H, W]
    rgb = a[list(bands)].astype(np.float32)
    if bits == 8:
        return rgb.astype(np.uint8)
    return np.clip(rgb * (255 / (2 ** bits - 1)), 0, 255).round().astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    """uint8 [3, H, W]; 16 bits → round(v · 255 / 65535) (Pillow keeps the high byte); truncated: always an error."""
    from PIL import Image, ImageFile
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with image_errors(path), Image.open(path) as im:
            rawmode = im.tile[0][3] if im.tile else ""
            if im.mode.startswith("I"):  # 16-bit grey: the values themselves
                v = np.asarray(im).astype(np.float64)[None]
            elif rawmode.endswith(";16B"):  # the low bytes: the same data decoded again, little-endian
                low = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}.get(rawmode)
                if low is None:
                    raise DataError(f"cannot read {path}: a 16-bit PNG (raw mode {rawmode!r}) that this Pillow "
                                    "cannot read at 16 bits; convert it to an 8-bit PNG")
                with Image.open(path) as again:
                    again.tile = [(*t[:3], low) for t in again.tile]
                    lo = np.asarray(again).astype(np.uint16)
                if rawmode == "LA;16B":  # RGBA = L high, L low, A high, A low
                    v = (lo[..., 0] << 8 | lo[..., 1]).astype(np.float64)[None]
                else:
                    v = (np.asarray(im).astype(np.uint16) << 8 | lo)[..., :3].transpose(2, 0, 1).astype(np.float64)
            else:
                return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    out = np.round(v * (255 / 65535)).astype(np.uint8)
    return np.repeat(out, 3, 0) if len(out) == 1 else out


def split_files(name: str, folder: Path, seed: int) -> dict:
    """{'train': [paths], 'val': [paths], 'files': all, 'read': read_rgb's arguments}, by the official layout."""
    rng, srt = np.random.default_rng([seed, 42]), lambda ps: sorted(ps, key=str)
    if name == "us3d":
        files = srt(folder.rglob("*_RGB.tif")) or srt(folder.rglob("*_MSI.tif"))
        val = [p for p in files if "val" in str(p.parent.relative_to(folder)).lower()]
        train = [p for p in files if p not in val]
        if not val and len(train) > 1:  # one pool of tiles: hold out the paper's share of tiles for validation
            val = [train[i] for i in rng.permutation(len(train))[:max(1, round(len(train) * 3072 / 24153))]]
            train = [p for p in train if p not in val]
        msi = bool(files) and files[0].name.endswith("_MSI.tif")
        read = dict(bands=(4, 2, 1), n_bands=8, bits=11) if msi else {}
    elif name == "uavid":
        files = srt(folder.rglob("uavid_*/*/Images/*.png"))
        train, val = [p for p in files if "uavid_train" in p.parts], [p for p in files if "uavid_val" in p.parts]
        read = {}
    elif name == "potsdam":  # split by whole orthophotos: 1058 = 2×529 val, 15870 = 30×529 train patches
        files = srt((folder / "4_Ortho_RGBIR").glob("*.tif")) or srt((folder / "2_Ortho_RGB").glob("*.tif"))
        order = [files[i] for i in rng.permutation(len(files))]
        n_val = 2 if len(files) >= 32 else int(len(files) >= 2)
        val, train = order[:n_val], order[n_val:n_val + 30]
        read = dict(n_bands=4) if files and "RGBIR" in files[0].name else {}
    else:  # treesat: IR,G,B,R → RGB = bands 3, 1, 2; a random selection of whole images
        files = srt((folder / "aerial" / "60m").glob("*.tif"))
        order = [files[i] for i in rng.permutation(len(files))]
        n_val = min(1000, max(int(len(files) >= 2), len(files) // 16))
        val, train = order[:n_val], order[n_val:]
        read = dict(bands=(3, 1, 2), n_bands=4)
    if not files:
        raise DataError(f"{name}: no images found in {folder}; expected {DATASETS[name][1]}")
    return dict(train=train, val=val, read=read, files=files)


def patch_grid(name: str, h: int, w: int, resized: bool = False) -> list:
    """Top-left corners of the non-overlapping 256×256 patches of an H×W image (TreeSatAI: the centre one)."""
    if resized:
        return [(0, 0)]
    if name == "treesat":
        return [((h - PATCH) // 2, (w - PATCH) // 2)] if min(h, w) >= PATCH else []
    return [(r, c) for r in range(0, h - PATCH + 1, PATCH) for c in range(0, w - PATCH + 1, PATCH)]


def task_tiles(name: str, data_root, split: str, cache_dir="", seed: int = DATA_SEED, log=None,
               treesat_resize: bool = False) -> np.ndarray:
    """uint8 [N, 3, 256, 256] patches of split 'train' or 'val', memory-mapped from the tile cache; treesat_resize:
    TreeSatAI's 304×304 images resized to 256×256 instead of cropped."""
    log = log or (lambda msg: print(msg, flush=True))
    if name not in DATASETS:
        raise DataError(f"unknown task {name!r}; known: {list(DATASETS)}")
    folder = find_dataset(name, data_root)
    s = split_files(name, folder, seed)
    files, want = s[split], PAPER_COUNTS[name][split == "val"]
    resize = name == "treesat" and treesat_resize

    def select():  # the paper's count of patches, drawn at random from every patch of the split (headers only)
        shape = dict(n_bands=s["read"].get("n_bands", 3), bits=s["read"].get("bits", 8))  # checked in the headers
        cells = [(i, r, c) for i, p in enumerate(files) for r, c in patch_grid(name, *image_size(p, **shape), resize)]
        if len(cells) < want:
            log(f"{name} {split}: {len(cells)} patches found, the paper uses {want}: using {len(cells)}")
        pick = np.sort(np.random.default_rng([seed, 7]).permutation(len(cells))[:want])
        return [cells[i] for i in pick]

    def read(p):
        img = read_rgb(p, **s["read"])
        return resize_rgb(img, PATCH) if resize else img

    return cached_tiles(cache_dirs(Path(data_root), cache_dir), f"{name}_{split}" + ("_resized" * resize), folder,
                        files, seed, select, read, log)


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [3, H, W] → [3, size, size], bilinear (unchanged when it is that size)."""
    if img.shape[1:] == (size, size):
        return img
    from PIL import Image
    return np.asarray(Image.fromarray(img.transpose(1, 2, 0)).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def atomic_write(path: Path, write, todo: str = ""):
    """write(`<name>.<pid>.<random>.tmp`), then rename: never a half-written or leftover file; a full disk: one line."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with disk_errors(path, todo or DISK_TODO):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


DISK_TODO = "free space (or choose another folder) and rerun"
SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}  # full, file too big, quota
LOW_SPACE = 64 << 20  # bytes: below this, a write error without an errno is taken for a full disk


@contextmanager
def disk_errors(path, todo: str = DISK_TODO):
    """A full disk while writing `path` → one-line DataError (why; todo); every other error passes unchanged."""
    path = Path(path)
    try:
        yield
    except (OSError, RuntimeError) as e:
        why = out_of_space(e, path)
        if why is None:
            raise
        raise DataError(f"no space left on the device writing {path} ({why}); {todo}") from None


def out_of_space(e: BaseException, path: Path):
    """Why e is a full disk: ENOSPC, EDQUOT, EFBIG (`ulimit -f`), or no errno (np.save, torch.save's RuntimeError)
    under a file size limit or with under LOW_SPACE free; else None."""
    if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
        return e.strerror or errno.errorcode.get(e.errno, str(e.errno))
    if isinstance(e, OSError) and e.errno is not None:
        return None  # a named error that is not about space (permissions, I/O, ...)
    try:
        import resource
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return f"file size limit (ulimit -f) reached: {type(e).__name__}: {str(e)[:80]}"
    except (ImportError, OSError, ValueError):
        pass
    try:
        free = shutil.disk_usage(next(p for p in (path.parent, *path.parents) if p.exists())).free
    except (OSError, StopIteration):
        return None
    return f"{free >> 20} MB free after {type(e).__name__}: {str(e)[:80]}" if free < LOW_SPACE else None


# --- from raw tiles to model input: augmentation (paper §III-B), normalisation, batches ---------------------
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics, as MAE
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@functools.cache
def mean_std(device: torch.device) -> tuple:
    """MEAN and STD on `device`, copied once (not a host sync in every step)."""
    return MEAN.to(device), STD.to(device)


def to_device(a: np.ndarray, device) -> torch.Tensor:
    """A host array on `device`, through pinned memory and non-blocking on a GPU."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.pin_memory() if torch.device(device).type == "cuda" else t).to(device, non_blocking=True)


def augment(tiles: torch.Tensor, size: int, gen: torch.Generator | None) -> torch.Tensor:
    """uint8 [N, 3, S, S] → normalised float [N, 3, size, size]: a random resized crop (area 0.8-1, aspect 3/4-4/3)
    and horizontal flip per sample; gen None: a plain resize (evaluation)."""
    x = tiles.float().div_(255)
    n = x.shape[0]
    if gen is None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        u = torch.rand((n, 5), generator=gen, device=x.device)  # per sample: area, aspect, x, y, flip
        area, log_r = 0.8 + 0.2 * u[:, 0], math.log(3 / 4) + math.log(16 / 9) * u[:, 1]
        w = (area * log_r.exp()).sqrt().clamp(max=1)  # crop width and height as fractions of the tile
        h = (area / log_r.exp()).sqrt().clamp(max=1)
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=x.device)  # [N, 2, 3] output grid → input coordinates
        theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
        theta[:, 0, 2], theta[:, 1, 2] = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)  # [N, size, size, 2]
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean, std = mean_std(x.device)
    return (x - mean) / std


def batches(tiles, batch_size: int, rng: np.random.Generator, device, share=(0, 1)):
    """One epoch of shuffled uint8 batches on `device` (drop_last), the next read ahead in a thread; share (i, n):
    rows [i·B/n, (i+1)·B/n) of each batch (process i of n)."""
    from concurrent.futures import ThreadPoolExecutor
    order, pin, n = rng.permutation(len(tiles)), torch.device(device).type == "cuda", len(tiles) // batch_size
    rows = slice(share[0] * batch_size // share[1], (share[0] + 1) * batch_size // share[1])

    def read(i):
        b = torch.from_numpy(np.ascontiguousarray(tiles[np.sort(order[i * batch_size:(i + 1) * batch_size])[rows]]))
        return b.pin_memory() if pin else b

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(read, 0)
        for i in range(n):
            cur, nxt = nxt.result(), pool.submit(read, i + 1) if i + 1 < n else None
            yield cur.to(device, non_blocking=True)


# --- the tile cache: one uint8 .npy per split, memory-mapped --------------------------------------------------
def cache_dirs(data_folder: Path, cache_dir: str = "") -> list:
    """--cache-dir alone when given; else DATA/.cosmae_cache, then $XDG_CACHE_HOME/cosmae/<data folder>-<hash>."""
    if cache_dir:
        return [Path(cache_dir)]
    key = hashlib.sha1(str(Path(data_folder).resolve()).encode()).hexdigest()[:12]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cosmae"
    return [Path(data_folder) / ".cosmae_cache", user / f"{Path(data_folder).resolve().name}-{key}"]


def writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cached_tiles(dirs: list, key: str, root: Path, files: list, seed: int, select, read, log):
    """`key.npy` [N, 3, 256, 256] + manifest `key.json` (files, sizes, mtimes, seed, shape): a valid one in `dirs`
    used without a lock, else built in the first writable one under `key.lock` (a second process waits)."""
    manifest = dict(version=1, seed=seed, files=[[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
                                                 for p in files])
    found = find_cache(dirs, key, manifest, log)
    if found is not None:
        return found
    d = next((d for d in dirs if writable(d)), None)
    if d is None:
        raise DataError(f"{key}: no writable place for the tile cache ({', '.join(map(str, dirs))}); name one "
                        "with --cache-dir")
    npy, man = d / f"{key}.npy", d / f"{key}.json"
    todo = "free space, or name a folder on another disk with --cache-dir, and rerun"
    with disk_errors(npy, todo), cache_lock(d / f"{key}.lock", log):
        found = find_cache(dirs, key, manifest, log)  # built by another process while this one waited
        if found is not None:
            return found
        for stale in (*d.glob(f"{key}.npy.*tmp"), *d.glob(f"{key}.json.*tmp")):  # a killed build's
            stale.unlink(missing_ok=True)
        man.unlink(missing_ok=True)
        cells = select()
        if not cells:
            raise DataError(f"{key}: no 256×256 patch in the {len(files)} images under {root}")
        gb = len(cells) * 3 * PATCH * PATCH / 1e9
        log(f"{key}: building the tile cache {npy} ({len(cells)} patches, {gb:.2f} GB)")
        todo = f"the cache needs {f'{gb:.2f} GB' if gb >= 0.1 else f'{gb * 1e3:.1f} MB'}: {todo}"
        atomic_write(npy, lambda tmp: fill_cache(tmp, cells, files, read, key, log), todo)
        manifest["shape"] = [len(cells), 3, PATCH, PATCH]
        atomic_write(man, lambda tmp: tmp.write_text(json.dumps(manifest)), todo)
        return np.load(npy, mmap_mode="r")


def find_cache(dirs: list, key: str, manifest: dict, log):
    """The first cache with this manifest and a whole uint8 .npy of its shape (none stored: any [N, 3, 256, 256])."""
    for d in dirs:
        npy = d / f"{key}.npy"
        try:
            stored = read_json(d / f"{key}.json", dict)
            shape = stored.pop("shape", None)
            x = np.load(npy, mmap_mode="r")  # a truncated .npy: ValueError
        except (DataError, OSError, ValueError):
            continue
        if (stored == manifest and x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (3, PATCH, PATCH)
                and len(x) and shape in (None, list(x.shape)) and npy.stat().st_size == x.offset + x.nbytes):
            log(f"{key}: tile cache {npy}")
            return x
    return None


@contextmanager
def cache_lock(path: Path, log):
    """An exclusive flock on `path` while the block runs, the file removed before release (a waiter then locks
    again); without flock (no fcntl, or a file system without it) the block runs unlocked."""
    fd = None
    while fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"{path.name}: waiting for another process that builds this tile cache ({path})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                break
        except FileNotFoundError:
            pass  # removed by the process that held it: lock again
        except OSError as e:
            os.close(fd)
            fd = None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                path.unlink(missing_ok=True)  # flock not supported on this file system: unlocked
                break
            raise
        os.close(fd)  # the file was removed (and maybe made again) by the process that held it: lock again
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)


def fill_cache(path: Path, cells: list, files: list, read, key: str, log):
    """Patches `cells` [(file, row, col)] into a new .npy, its blocks allocated first (a full disk: not a SIGBUS)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(cells), 3, PATCH, PATCH))
    with open(path, "r+b") as f:
        try:  # not on macOS, nor on every file system: there the writes into the map allocate
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        t0, by_file = time.time(), {}
        for n, (i, r, c) in enumerate(cells):
            by_file.setdefault(i, []).append((n, r, c))
        for done, (i, group) in enumerate(by_file.items(), 1):
            img = read(files[i])  # [3, H, W]
            for n, r, c in group:
                patch = img[:, r:r + PATCH, c:c + PATCH]
                if patch.shape != (3, PATCH, PATCH):  # fewer pixels than the header said
                    raise broken(files[i], f"{img.shape[1]}×{img.shape[2]} pixels, fewer than its header said")
                out[n] = patch
            if done % 50 == 0 or done == len(by_file):
                rate = done / (time.time() - t0)
                log(f"{key}: caching {done}/{len(by_file)} images, {len(cells)} patches, {rate:.1f} img/s, "
                    f"ETA {(len(by_file) - done) / rate:.0f} s")
        out.flush()
        os.fsync(f.fileno())


# --- UCMerced multi-label (the evaluation set of the paper) --------------------------------------------
MLKNN_K = 10  # ML-kNN's k (eval_mlknn.K, the paper's): the training split must hold more images than this


def ucmerced_splits(folder, cache_dir="", seed: int = DATA_SEED, log=None, k: int = MLKNN_K) -> dict:
    """UCMerced multi-label → {'train', 'val', 'test': (uint8 [n, 3, 256, 256], uint8 [n, 17]), 'labels'}:
    1000/300/800 of every 2100 images, drawn with `seed`; images that are not 256×256 resized."""
    folder, log = Path(folder), log or (lambda msg: print(msg, flush=True))
    found = sorted(folder.glob("LandUse_Multilabeled.txt")) + sorted(folder.glob("*/LandUse_Multilabeled.txt"))
    if not (folder / "Images").is_dir() or not found:
        raise DataError(f"{folder}: expected Images/<class>/<class>NN.tif and LandUse_Multilabeled.txt (UC Merced "
                        "Land Use images, multi-labels of Chaudhuri et al. 2018)")
    names, rows, y = read_label_file(found[0])
    n_train, n_val = round(len(rows) * 1000 / 2100), round(len(rows) * 300 / 2100)
    if n_train <= k:  # ML-kNN finds k neighbours of each image among the others
        need = next(n for n in range(len(rows), 10 ** 6) if round(n * 1000 / 2100) > k)
        raise DataError(f"{found[0]}: {len(rows)} images, so {n_train} to train on (1000 of every 2100); ML-kNN with "
                        f"k = {k} needs more than {k}: list at least {need} images")
    files = [folder / "Images" / r.rstrip("0123456789") / f"{r}.tif" for r in rows]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} images listed in {found[0]} are missing, e.g. {missing[0]}")
    x = cached_tiles(cache_dirs(folder, cache_dir), "ucmerced", folder, files, 0,
                     lambda: [(i, 0, 0) for i in range(len(files))], lambda p: resize_rgb(read_rgb(p), PATCH), log)
    order = np.random.default_rng([seed, 2100]).permutation(len(files))
    parts = dict(train=order[:n_train], val=order[n_train:n_train + n_val], test=order[n_train + n_val:])
    return {**{k: (np.asarray(x[np.sort(v)]), y[np.sort(v)]) for k, v in parts.items()}, "labels": names}


def read_label_file(path: Path) -> tuple:
    """LandUse_Multilabeled.txt (tab-separated, trailing tabs dropped) → (label names, image names, uint8 [n, Q])."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    names = [n.strip() for n in (lines[0].split("\t")[1:] if lines else [])]
    while names and not names[-1]:  # a trailing tab
        names.pop()
    if not names:
        raise DataError(f"{path} line 1: expected a header 'IMAGE\\LABEL<TAB>name<TAB>...', got {lines[:1]}")
    rows, y, seen = [], [], {}
    for i, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split("\t")]
        while len(cells) > 1 and not cells[-1]:  # a trailing tab
            cells.pop()
        if len(cells) != len(names) + 1 or any(c not in ("0", "1") for c in cells[1:]):
            raise DataError(f"{path} line {i}: expected an image name and {len(names)} values 0 or 1 (tab-separated), "
                            f"got {len(cells) - 1} values: {line.strip()[:120]!r}")
        if cells[0] in seen:
            raise DataError(f"{path} lines {seen[cells[0]]} and {i}: image {cells[0]!r} is listed twice; keep one row "
                            "per image")
        seen[cells[0]] = i
        rows.append(cells[0])
        y.append([int(c) for c in cells[1:]])
    if not rows:
        raise DataError(f"{path}: no image rows after the header")
    y = np.array(y, np.uint8)
    if not y.any():
        raise DataError(f"{path}: every label value is 0 in its {len(rows)} rows (no image has any of the "
                        f"{len(names)} labels); use the multi-label file of Chaudhuri et al. 2018, 0/1 per label")
    return names, rows, y
