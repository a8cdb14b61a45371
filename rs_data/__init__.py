"""Remote-sensing data for CoSMAE: every task is one uint8 array of RGB tiles [n, 3, S, S].

- The four task datasets of the paper (US3D, UAVid, Potsdam, TreeSatAI) and UCMerced multi-label, read from
  their official layouts under a folder the user names (nothing is downloaded), cut into 256×256 patches and
  written once into a memory-mapped tile cache.
- The built-in synthetic default: procedurally drawn RS-like tiles of four domains, and a synthetic
  multi-label evaluation set.
- What the model sees of a batch of raw tiles: the paper's augmentation (§III-B: random resized crop to 224
  with scale 0.8-1, random horizontal flip) and ImageNet normalisation, and an epoch of batches read ahead.

cosmae.py (training) and eval_mlknn.py (evaluation) read their data through this file only.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
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


DATA_SEED = 0  # which patches and splits are drawn: the same in every run; --seed varies the model's
# initialisation, the data order and the augmentation (the paper: "three randomly initialised models")


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
    """One procedurally drawn RS-like tile: ([size, size, 3] uint8, [5] 0/1 presence of SYNTH_LABELS).
    Each element has its own shape and texture (rippled water behind a wavy shore, a straight road with a dashed
    centre line, shaded round crowns, striped roofs with shadows, cars with windscreens). Every colour (ground
    included) is moved by up to ±jitter·255 per channel around its palette value, so that, as with real roofs
    or fields, colour alone does not tell the labels: at jitter 0 the per-image colour mean and std alone
    give 89.5 micro mAP, and a random-init encoder beats minutes of MAE pretraining (README, "What `python
    cosmae.py` shows")."""
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


SENSOR_NOISE = 140.0  # std of the sensors' noise, in grey levels (README, "What `python cosmae.py` shows")
SYNTH_TASKS = {  # the synthetic default: every region, seen by four sensors in turn → the band that holds the scene
    "synth_pan": None,  # panchromatic: the scene's brightness in all three bands, colour noise across them
    "synth_red": 0,  # the scene in band 1 (red), noise in bands 2 and 3
    "synth_green": 1,  # the scene in band 2 (green), noise in bands 1 and 3
    "synth_blue": 2,  # the scene in band 3 (blue), noise in bands 1 and 2
}


def sense(brightness: np.ndarray, band, rng: np.random.Generator, noise: float = SENSOR_NOISE) -> np.ndarray:
    """What a sensor records of scenes of brightness [n, S, S] (float, 0-255) → uint8 [n, 3, S, S]. A one-band
    sensor (band 0, 1 or 2) puts the brightness into its band and white noise of std `noise` around grey into the
    two others; the panchromatic one (band None) puts it into all three and adds noise of the same std to each,
    whose mean over the bands is zero (the brightness is untouched, the colour is noise)."""
    e = rng.normal(0, noise, (len(brightness), 3, *brightness.shape[1:])).astype(np.float32)
    if band is None:
        out = brightness[:, None] + (e - e.mean(1, keepdims=True)) * np.sqrt(1.5)
    else:
        out = 128 + e
        out[:, band] = brightness
    return np.clip(out, 0, 255).astype(np.uint8)


def synth_scenes(n: int, size: int, seed: int, p=(0.5,) * 5) -> tuple:
    """n RS-like scenes, regions city, farm, forest, coast in turn (each element with probability p) →
    (brightness float32 [n, S, S], labels uint8 [n, 5])."""
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
    """A task's own labelled evaluation set, never trained on (its 'test' tiles are also the held-out tiles of
    Eq. (1)): {'train', 'test'}: (uint8 tiles, labels of the five elements), SYNTH_EVAL['own'] images each."""
    n = SYNTH_EVAL["own"]
    x, y = synth_task(name, 2 * n, size, DATA_SEED + 1000)
    return {"train": (x[:n], y[:n]), "test": (x[n:], y[n:])}


def synthetic_eval_set(size: int, tasks=None) -> dict:
    """The synthetic multi-label set (labels = which land-cover elements are drawn), UCMerced-sized splits
    (SYNTH_EVAL): the tiles of the given tasks in turn (default: all four)."""
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
    """What each evaluation point uses: the multi-label set 'main' (UCMerced, or the synthetic one), each task's
    own labelled set 'own' (synthetic tasks only: the accuracy matrix A) and each task's held-out tiles
    'held_out' (Eq. (1) → the reconstruction matrix R, and the pictures): the first REC_TILES test tiles of a
    synthetic task's own set, or a fixed random REC_TILES of a real task's val split."""
    synth = [t for t in tasks if t in SYNTH_TASKS]
    main = ucmerced_splits(ucmerced, cache_dir) if ucmerced else synthetic_eval_set(size, synth or None)
    own = [synth_task_eval(t, size) if t in SYNTH_TASKS else None for t in tasks]
    held_out = [o["test"][0][:REC_TILES] if o else subset(task_tiles(t, data_root, "val", cache_dir,
                                                                     treesat_resize=treesat_resize), REC_TILES)
                for t, o in zip(tasks, own)]
    return dict(main=main, own=own if all(own) else None, held_out=held_out)


# --- real remote-sensing datasets: official layouts → one cached uint8 array per split --------------------
# Every image is cut into non-overlapping 256×256 RGB patches (TreeSatAI: the centre 256×256), the paper's
# counts are drawn with a fixed seed, and the patches of a split are written once into a memory-mapped .npy
# (atomic write + a manifest of the source files: a changed folder is rebuilt, a half-written file never read).
REAL_TASKS = ("us3d", "uavid", "potsdam", "treesat")
PAPER_COUNTS = {"us3d": (21081, 3072), "uavid": (24560, 8640), "potsdam": (15870, 1058), "treesat": (15000, 1000)}
DATASETS = {  # folder names under --data-root, the files looked for, where to get the data
    "us3d": (("US3D", "us3d", "DFC2019", "dfc2019"), "JAX_*_RGB.tif (uint8, 3 bands) or JAX_*_MSI.tif (uint16, "
             "8 bands) 1024×1024 tiles; validation tiles in a folder whose name contains 'val'",
             "US3D / 2019 IEEE GRSS Data Fusion Contest track data (IEEE DataPort)"),
    "uavid": (("UAVid", "uavid"), "uavid_train/seqN/Images/*.png and uavid_val/seqN/Images/*.png",
              "UAVid (uavid.nl)"),
    "potsdam": (("Potsdam", "potsdam", "ISPRS_Potsdam"), "4_Ortho_RGBIR/top_potsdam_*_RGBIR.tif (R,G,B,IR) or "
                "2_Ortho_RGB/top_potsdam_*_RGB.tif, 6000×6000", "ISPRS 2D semantic labelling, Potsdam"),
    "treesat": (("TreeSatAI", "treesat", "TreeSat"), "aerial/60m/*.tif, 304×304, 4 bands IR,G,B,R",
                "TreeSatAI benchmark archive (Zenodo)"),
}
PATCH = 256


def find_dataset(name: str, data_root) -> Path:
    names, layout, source = DATASETS[name]
    for n in names:
        if (Path(data_root) / n).is_dir():
            return Path(data_root) / n
    raise DataError(f"{name}: no folder {' or '.join(str(Path(data_root) / n) for n in names)}. Expected inside "
                    f"it: {layout}. Get the data from: {source}; or point --data-root at the folder holding it.")


def read_rgb(path: Path, bands=(0, 1, 2), n_bands=3, bits=8) -> np.ndarray:
    """An RGB uint8 image [3, H, W] from a PNG or a TIFF ([H, W, C] or [C, H, W]) with n_bands bands. A file
    that cannot be read whole (truncated, corrupt) is a DataError naming it (read_png, read_tiff)."""
    if path.suffix.lower() == ".png":
        return read_png(path)
    a = read_tiff(path, pixels=True)
    check_bands(path, a.shape, a.dtype, n_bands, bits)
    a = a if a.shape[0] == n_bands and a.shape[-1] != n_bands else a.transpose(2, 0, 1)  # → [C, H, W]
    rgb = a[list(bands)].astype(np.float32)
    if bits == 8:
        return rgb.astype(np.uint8)
    return np.clip(rgb * (255 / (2 ** bits - 1)), 0, 255).round().astype(np.uint8)


def check_bands(path: Path, shape: tuple, dtype, n_bands: int, bits: int):
    """A TIFF of n_bands bands ([H, W, C] or [C, H, W]) of uint8 (bits 8) or uint16 (bits > 8), else a DataError."""
    if len(shape) != 3 or n_bands not in (shape[0], shape[-1]):
        raise DataError(f"{path}: shape {tuple(shape)}, expected {n_bands} bands ([H, W, {n_bands}] or "
                        f"[{n_bands}, H, W])")
    if dtype != (np.uint8 if bits == 8 else np.uint16):
        raise DataError(f"{path}: dtype {dtype}, expected {'uint8' if bits == 8 else 'uint16'}")


def image_size(path: Path, n_bands=None, bits=8) -> tuple:
    """(H, W) from the header alone. A TIFF whose header shows it truncated or corrupt is a DataError naming
    it (read_tiff); with n_bands, so is a TIFF of other bands or dtype (the messages of read_rgb), found before
    any pixel is read instead of the image being skipped as 'no patch'."""
    if path.suffix.lower() == ".png":
        with image_errors(path):
            from PIL import Image
            with Image.open(path) as im:
                w, h = im.size
            return h, w
    s, dtype = read_tiff(path, pixels=False)
    if n_bands is not None:
        check_bands(path, s, dtype, n_bands, bits)
    return (s[1], s[2]) if len(s) == 3 and s[0] < min(s[1], s[2]) else (s[0], s[1])


def broken(path: Path, why: str) -> DataError:
    """The one line for an image file that cannot be read whole."""
    return DataError(f"cannot read {path}: truncated or corrupt ({why}); re-copy it or remove it from the folder")


@contextmanager
def image_errors(path: Path):
    """Any error while an image is read → one line naming the file: the OS's reason for an OSError that has one
    (missing, no permission, I/O error), what to install for a TIFF codec that is missing, else broken()."""
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


class _Errors(logging.Handler):
    """Keeps the ERROR records of a logger (tifffile logs one, and goes on, where it skips part of a file)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def read_tiff(path: Path, pixels: bool):
    """A TIFF's first series: its pixels (pixels=True, what tifffile.imread gives) or (shape, dtype) from the
    header alone. Refused, as one line naming the file, where tifffile would return an image that is not the
    file's (a truncated copy of a tiled Potsdam orthophoto reads with missing tiles, or as its first page only
    when the page chain is cut, which has no 256×256 patch and was skipped silently): any image data that
    lies past the end of the file, and anything tifffile logs as an ERROR (an unreadable page, tag or series
    it skips). Tiles or strips of byte count 0 are the TIFF way to store empty ones, not an error."""
    import tifffile
    errors, log = _Errors(), logging.getLogger("tifffile")
    log.addHandler(errors)
    try:
        with image_errors(path), tifffile.TiffFile(path) as tif:
            end, series = tif.filehandle.size, tif.series[0]
            past = next(((page.index, o + n) for page in tif.pages for o, n in zip(page.dataoffsets,
                                                                                    page.databytecounts)
                         if n and o + n > end), None)
            if past:
                raise broken(path, f"page {past[0]} needs {past[1]} bytes, the file has {end}")
            out = tif.asarray() if pixels and not errors.messages else (tuple(series.shape), series.dtype)
    finally:
        log.removeHandler(errors)
    if errors.messages:
        raise broken(path, f"tifffile: {errors.messages[0][:120]}")
    return out


def read_png(path: Path) -> np.ndarray:
    """A PNG as uint8 [3, H, W]: 8-bit RGB as it is, palette, grey or with alpha converted to RGB (Pillow, as
    UAVid's frames always were), 16 bits per channel scaled to 8 as round(value · 255 / 65535). Pillow keeps
    only the high byte of 16-bit colour (1000 → 3, not 4) and saturates 16-bit grey at 255, so these are read
    on their own (png16). A truncated PNG is an error even where a library set Pillow's LOAD_TRUNCATED_IMAGES."""
    from PIL import Image, ImageFile
    with image_errors(path):
        with open(path, "rb") as f:
            head = f.read(26)
        depth = head[24] if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else 8
        truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            if depth == 16:
                return png16(path)
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def png16(path: Path) -> np.ndarray:
    """A PNG of 16 bits per channel → uint8 [3, H, W], each value v as round(v · 255 / 65535). Pillow gives 16-bit
    grey whole; of 16-bit colour it keeps the high bytes, so the low bytes come from a second decoding of the same
    data with the little-endian raw mode (the same bytes per pixel, so the same PNG unfiltering), or, for grey +
    alpha, with the 4-byte raw mode RGBA (= L high, L low, A high, A low). A Pillow that cannot do either:
    a DataError that says to convert the file to 8 bits."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # grey: the values themselves
            v = np.asarray(im).astype(np.float64)[None]
        else:
            rawmode = im.tile[0][3] if im.tile else ""
            low = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}.get(rawmode)
            if low is None:
                raise DataError(f"cannot read {path}: a 16-bit PNG (Pillow mode {im.mode}, raw mode {rawmode!r}) that "
                                "this Pillow cannot read at 16 bits; convert it to an 8-bit PNG")
            with Image.open(path) as again:
                again.tile = [t._replace(args=low) if hasattr(t, "_replace") else (*t[:3], low) for t in again.tile]
                lo = np.asarray(again).astype(np.uint16)
            if rawmode == "LA;16B":  # RGBA = L high, L low, A high, A low
                v = (lo[..., 0] << 8 | lo[..., 1]).astype(np.float64)[None]
            else:
                hi = np.asarray(im).astype(np.uint16)
                v = (hi << 8 | lo)[..., :3].transpose(2, 0, 1).astype(np.float64)
    out = np.round(v * (255 / 65535)).astype(np.uint8)
    return np.repeat(out, 3, 0) if len(out) == 1 else out


def split_files(name: str, folder: Path, seed: int) -> dict:
    """{'train': [paths], 'val': [paths]} and how each file is read, in the dataset's official layout."""
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
    """Top-left corners of the non-overlapping 256×256 patches of an H×W image (TreeSatAI: the centre one, or
    the whole image once resized to 256×256)."""
    if resized:
        return [(0, 0)]
    if name == "treesat":
        return [((h - PATCH) // 2, (w - PATCH) // 2)] if min(h, w) >= PATCH else []
    return [(r, c) for r in range(0, h - PATCH + 1, PATCH) for c in range(0, w - PATCH + 1, PATCH)]


def task_tiles(name: str, data_root, split: str, cache_dir="", seed: int = DATA_SEED, log=None,
               treesat_resize: bool = False) -> np.ndarray:
    """uint8 [N, 3, 256, 256] patches of one task split ('train' or 'val'), memory-mapped from the tile cache.
    treesat_resize: TreeSatAI's 304×304 images resized to 256×256 instead of their centre 256×256 kept."""
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
    """uint8 [3, H, W] → [3, size, size], bilinear."""
    from PIL import Image
    return np.asarray(Image.fromarray(img.transpose(1, 2, 0)).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def subset(tiles, n: int, seed: int = DATA_SEED) -> np.ndarray:
    """A fixed random subset of at most n tiles (in their stored order), read into memory."""
    pick = np.sort(np.random.default_rng([seed, 11]).permutation(len(tiles))[:n])
    return np.asarray(tiles[pick])


def atomic_write(path: Path, write, todo: str = ""):
    """write(temporary path), then rename: a crash never leaves a half-written file, and no temporary file stays
    behind (every file the project writes goes through here). The temporary file `<name>.<pid>.<random>.tmp`
    lies in the same folder (the rename stays on one file system) and is unique per process and call: two
    processes writing the same file never write into one temporary file, the last rename wins whole. A full
    disk is one line naming `path` (disk_errors; todo: what to do instead of its default)."""
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
    """Around any write of `path`: a full disk becomes DataError('no space left on the device writing PATH
    (why); TODO'), one line for the CLIs, instead of a traceback. Full means an OSError with errno ENOSPC,
    EDQUOT or EFBIG (what a file size limit, `ulimit -f`, gives), or a write error that carries no errno
    (np.save's 'n requested and m written', torch.save's RuntimeError from its C++ writer) while the folder has
    under LOW_SPACE free or a file size limit is set. Every other error passes through unchanged. The caller
    removes what it half-wrote (atomic_write does); the check runs before, while the space is still taken."""
    path = Path(path)
    try:
        yield
    except (OSError, RuntimeError) as e:
        why = out_of_space(e, path)
        if why is None:
            raise
        raise DataError(f"no space left on the device writing {path} ({why}); {todo}") from None


def out_of_space(e: BaseException, path: Path):
    """Why the write error e of `path` is a full disk (a short reason), or None when it is something else."""
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
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), None)
    try:
        free = shutil.disk_usage(folder).free if folder else None
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE:
        return f"{free >> 20} MB free after {type(e).__name__}: {str(e)[:80]}"
    return None


# --- from raw tiles to model input: augmentation (paper §III-B), normalisation, batches ---------------------

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics, as MAE
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@functools.cache
def mean_std(device: torch.device) -> tuple:
    """MEAN and STD on `device`, copied there once: a plain copy to a GPU inside a training step makes the host
    wait until the GPU has run everything queued before it (a host sync)."""
    return MEAN.to(device), STD.to(device)


def to_device(a: np.ndarray, device) -> torch.Tensor:
    """A host array on `device` without a host sync: through pinned memory, non-blocking, on a GPU."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.pin_memory() if torch.device(device).type == "cuda" else t).to(device, non_blocking=True)


def augment(tiles: torch.Tensor, size: int, gen: torch.Generator | None) -> torch.Tensor:
    """Random resized crop (area 0.8-1, aspect 3/4-4/3) + horizontal flip, per sample in one batched
    affine_grid/grid_sample, then normalisation. gen None = no augmentation (plain resize, for evaluation).
    tiles: uint8 [N, 3, S, S] on the device → float [N, 3, size, size]."""
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
    """One epoch of raw uint8 batches [B, 3, S, S] on `device` (shuffled by `rng`, drop_last). The next batch is
    read (memory-mapped cache → pinned memory) in a background thread while the current one trains.
    share (i, n): only rows [i·B/n, (i+1)·B/n) of every batch (process i of n under torchrun)."""
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

def user_cache() -> Path:
    """The user's cache folder (XDG convention): $XDG_CACHE_HOME/cosmae, else ~/.cache/cosmae."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cosmae"


def cache_dirs(data_folder: Path, cache_dir: str = "") -> list:
    """Where a tile cache may be: --cache-dir alone when given; else DATA/.cosmae_cache (used while it is
    writable or already holds the cache: a shared read-only dataset can ship one), then the user's cache
    folder, one sub-folder per dataset folder."""
    if cache_dir:
        return [Path(cache_dir)]
    key = hashlib.sha1(str(Path(data_folder).resolve()).encode()).hexdigest()[:12]
    return [Path(data_folder) / ".cosmae_cache", user_cache() / f"{Path(data_folder).resolve().name}-{key}"]


def writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cached_tiles(dirs: list, key: str, root: Path, files: list, seed: int, select, read, log):
    """The cache: `key.npy` [N, 3, 256, 256] and `key.json` (source files with sizes and mtimes, seed, and the
    array's shape). A cache whose manifest matches the folder and whose .npy is whole (valid_cache) is used
    (read-only, memory-mapped) wherever it is among `dirs`, without writing anything there: a read-only folder
    can hold one. Otherwise it is built in the first writable one, under an exclusive lock `key.lock` (two runs
    started together on a fresh dataset: the second waits, then uses what the first built), into a temporary
    file that is renamed when full; a failed build leaves nothing behind, a full disk is one line."""
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
        for stale in (*d.glob(f"{key}.npy.*tmp"), *d.glob(f"{key}.json.*tmp")):  # of a killed build: under the
            stale.unlink(missing_ok=True)  # lock no other process writes them
        man.unlink(missing_ok=True)
        cells = select()
        if not cells:
            raise DataError(f"{key}: no 256×256 patch in the {len(files)} images under {root}")
        gb = len(cells) * 3 * PATCH * PATCH / 1e9
        log(f"{key}: building the tile cache {npy} ({len(cells)} patches, {gb:.2f} GB)")
        todo = f"the cache needs {f'{gb:.2f} GB' if gb >= 0.1 else f'{gb * 1e3:.1f} MB'}: {todo}"
        atomic_write(npy, lambda tmp: fill_cache(tmp, cells, files, read, key, log), todo)
        manifest["shape"] = [len(cells), 3, PATCH, PATCH]
        atomic_write(man, lambda tmp: tmp.write_text(json.dumps(manifest)), todo)  # last: the cache is complete
        return np.load(npy, mmap_mode="r")


def find_cache(dirs: list, key: str, manifest: dict, log):
    """The first valid cache of `key` among dirs, memory-mapped read-only, or None."""
    for d in dirs:
        npy, man = d / f"{key}.npy", d / f"{key}.json"
        if valid_cache(npy, man, manifest):
            log(f"{key}: tile cache {npy}")
            return np.load(npy, mmap_mode="r")
    return None


def valid_cache(npy: Path, man: Path, manifest: dict) -> bool:
    """Whether the cache npy is trusted: its manifest man equals `manifest` (the same source files, sizes,
    mtimes, seed) and the .npy is whole: uint8 [N, 3, 256, 256], N as the manifest says (manifests written
    before it held the shape: N >= 1), and the file exactly as long as its header says (a truncated copy, or a
    disk that lost the end of it, is rebuilt instead of read as zeros or a crash)."""
    try:
        stored = json.loads(man.read_text())
        if not isinstance(stored, dict):
            return False
        shape = stored.pop("shape", None)
        if stored != manifest:
            return False
        with open(npy, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            got, fortran, dtype = read_header(f)
            size = os.fstat(f.fileno()).st_size
            return (dtype == np.uint8 and not fortran and len(got) == 4 and tuple(got[1:]) == (3, PATCH, PATCH)
                    and got[0] >= 1 and (shape is None or list(got) == shape)
                    and size == f.tell() + math.prod(got))
    except (OSError, ValueError, TypeError, KeyError):
        return False  # missing, unreadable or half-written: rebuilt


@contextmanager
def cache_lock(path: Path, log):
    """An exclusive lock on the file `path` while the block runs (fcntl.flock; the OS releases it when a
    process dies, so a killed build never blocks the next one). The lock file is removed before the lock is
    released, so no lock file stays behind; a process that was waiting then holds a lock on a removed file,
    sees that `path` is no longer (or another) file, and locks again. Without flock (not POSIX, or a file
    system that refuses it) the block runs unlocked: two builds then both work, and the last rename wins."""
    fd = lock_file(path, log) if fcntl is not None else None
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)


def lock_file(path: Path, log):
    """The open, exclusively locked file `path` (see cache_lock), or None where flock is not supported."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"{path.name}: waiting for another process that builds this tile cache ({path})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            st, own = os.stat(path), os.fstat(fd)
            if (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev):
                return fd
        except FileNotFoundError:
            pass  # removed by the process that held it: lock again, below
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                path.unlink(missing_ok=True)  # flock not supported on this file system: unlocked
                return None
            raise
        os.close(fd)  # the file was removed (and maybe made again) by the process that held it: lock again


def fill_cache(path: Path, cells: list, files: list, read, key: str, log):
    """Write the patches `cells` [(file index, row, col)] into a new .npy at `path`, one image read at a time.
    The whole file is reserved before the first image is read (reserve): a disk too small fails at once with
    an OSError (→ disk_errors), not after hours of reading, nor as the SIGBUS that a write into a memory-mapped
    sparse file gets on a full disk. The patches are written with plain file writes (never through a memory
    map), and the file is synced before it is renamed into place, so that a valid manifest never names a .npy
    whose data is still only in memory."""
    shape = (len(cells), 3, PATCH, PATCH)
    t0, by_file = time.time(), {}
    for n, (i, r, c) in enumerate(cells):
        by_file.setdefault(i, []).append((n, r, c))
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, dict(descr=np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     fortran_order=False, shape=shape))
        offset, tile = f.tell(), 3 * PATCH * PATCH
        reserve(f, offset, len(cells) * tile)
        for done, (i, group) in enumerate(by_file.items(), 1):
            img = read(files[i])  # [3, H, W]
            for n, r, c in group:
                patch = np.ascontiguousarray(img[:, r:r + PATCH, c:c + PATCH], dtype=np.uint8)
                if patch.shape != (3, PATCH, PATCH):  # the pixels are smaller than the header said
                    raise broken(files[i], f"{img.shape[1]}×{img.shape[2]} pixels, no patch at row {r}, column {c} "
                                           "that its header promised")
                f.seek(offset + n * tile)
                f.write(patch.data)
            if done % 50 == 0 or done == len(by_file):
                rate = done / (time.time() - t0)
                log(f"{key}: caching {done}/{len(by_file)} images, {len(cells)} patches, {rate:.1f} img/s, "
                    f"ETA {(len(by_file) - done) / rate:.0f} s")
        f.flush()
        os.fsync(f.fileno())


def reserve(f, offset: int, size: int):
    """Allocate the disk blocks of bytes [offset, offset + size) of the open file f now, so that a full disk is
    an OSError here: os.posix_fallocate; where the file system or OS has none (EOPNOTSUPP, EINVAL, ENOSYS;
    glibc already emulates it on most), zeros are written over the range instead."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is not None and size:
        try:
            allocate(f.fileno(), offset, size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", 0)):
                raise
    f.seek(offset)
    zeros = bytes(min(size, 64 << 20))
    for start in range(0, size, len(zeros) or 1):
        f.write(zeros[:min(len(zeros), size - start)])
    f.flush()


# --- UCMerced multi-label (the evaluation set of the paper) --------------------------------------------

MLKNN_K = 10  # ML-kNN's k (eval_mlknn.K, the paper's): the training split must hold more images than this


def ucmerced_splits(folder, cache_dir="", seed: int = DATA_SEED, log=None, k: int = MLKNN_K) -> dict:
    """UCMerced multi-label (Chaudhuri et al. 2018 labels): `Images/<class>/<class>NN.tif` and
    `LandUse_Multilabeled.txt` (tab-separated, header `IMAGE\\LABEL` + 17 names, one 0/1 row per image).
    → {'train', 'val', 'test': (uint8 [n, 3, 256, 256], uint8 [n, 17]), 'labels': names}; 1000/300/800 images
    drawn with `seed` (the same proportions when the folder holds fewer than 2100); the 44 images that are not
    256×256 are resized to it (bilinear). A folder whose training split would not hold more than k images (ML-kNN
    finds k neighbours of each image among the others) is a DataError that says how many are needed."""
    folder, log = Path(folder), log or (lambda msg: print(msg, flush=True))
    found = sorted(folder.glob("LandUse_Multilabeled.txt")) + sorted(folder.glob("*/LandUse_Multilabeled.txt"))
    if not (folder / "Images").is_dir() or not found:
        raise DataError(f"{folder}: expected Images/<class>/<class>NN.tif and LandUse_Multilabeled.txt "
                        "(UC Merced Land Use images from UC Merced, multi-labels of Chaudhuri et al. 2018)")
    names, rows, y = read_label_file(found[0])
    n_train = round(len(rows) * 1000 / 2100)
    if n_train <= k:
        need = next(n for n in range(len(rows), 10 ** 6) if round(n * 1000 / 2100) > k)
        raise DataError(f"{found[0]}: {len(rows)} images, so the training split holds {n_train} (1000 of every 2100); "
                        f"ML-kNN with k = {k} neighbours needs more than {k} training images: list at least {need} "
                        "images")
    files = [folder / "Images" / r.rstrip("0123456789") / f"{r}.tif" for r in rows]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} images listed in {found[0]} are missing, e.g. {missing[0]}")

    def read(path):
        img = read_rgb(path)
        return resize_rgb(img, PATCH) if img.shape[1:] != (PATCH, PATCH) else img  # the cache holds 256×256

    x = cached_tiles(cache_dirs(folder, cache_dir), "ucmerced", folder, files, 0,
                     lambda: [(i, 0, 0) for i in range(len(files))], read, log)
    order = np.random.default_rng([seed, 2100]).permutation(len(files))
    n_train, n_val = round(len(files) * 1000 / 2100), round(len(files) * 300 / 2100)
    parts = dict(train=order[:n_train], val=order[n_train:n_train + n_val], test=order[n_train + n_val:])
    return {**{k: (np.asarray(x[np.sort(v)]), y[np.sort(v)]) for k, v in parts.items()}, "labels": names}


def read_label_file(path: Path) -> tuple:
    """LandUse_Multilabeled.txt → (label names, image names, uint8 [n, Q]); every row checked: one image name
    and Q values, each 0 or 1, else an error naming the line. Empty cells at the end of the header or of a row
    (a trailing tab, as editors and spreadsheets write them) are dropped; an image listed twice is an error
    naming both lines, and so is a file whose label values are all 0 (not the multi-label file, or its labels
    lost); a label that no image has is fine."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    head = lines[0].split("\t") if lines else []
    names = [n.strip() for n in head[1:]]
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
