"""CoSMAE's data: uint8 RGB tiles [n, 3, S, S] per task: synthetic, or real datasets and folders via a tile cache."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

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
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}{todo}") from None
    except ValueError as e:  # not JSON, or not text
        raise DataError(f"{path} is corrupt ({e}){todo}") from None
    if not isinstance(obj, kind):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a JSON {kind.__name__}{todo}")
    return obj


# --- the built-in synthetic default -----------------------------------------------------------------------
DATA_SEED = 0  # which patches and splits are drawn, the same in every run (--seed varies model, order, augmentation)
SYNTH_LABELS = ("building", "road", "tree", "water", "car")
SYNTH_DOMAINS = {  # ground colour, sensor tint, object scale, P(element present) for SYNTH_LABELS
    "synth_city": dict(ground=(125, 120, 112), tint=(1.0, 1.0, 1.05), scale=0.8, p=(0.8, 0.7, 0.4, 0.3, 0.6)),
    "synth_farm": dict(ground=(150, 138, 78), tint=(1.05, 1.0, 0.9), scale=1.3, p=(0.4, 0.5, 0.6, 0.3, 0.3)),
    "synth_forest": dict(ground=(78, 100, 55), tint=(0.9, 1.05, 0.95), scale=1.0, p=(0.3, 0.4, 0.9, 0.4, 0.3)),
    "synth_coast": dict(ground=(205, 188, 140), tint=(1.0, 1.0, 1.1), scale=1.5, p=(0.5, 0.4, 0.3, 0.8, 0.4)),
}
SENSOR_NOISE = 140.0  # std of the sensors' noise, in grey levels
SYNTH_TASKS = {"synth_pan": None, "synth_red": 0, "synth_green": 1, "synth_blue": 2}  # sensor → its band (None: all)
SYNTH_EVAL = dict(own=1000, train=1000, test=800)  # images: per task and split of its own set; the multi-label set
REC_TILES = 512  # held-out tiles per task for the reconstruction matrix R


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


def sense(brightness: np.ndarray, band, rng: np.random.Generator, noise: float = SENSOR_NOISE) -> np.ndarray:
    """Scenes [n, S, S] → uint8 [n, 3, S, S]: the scene in `band`, noise in the others (None: all, + colour noise)."""
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


def synthetic_eval_set(size: int, tasks=None) -> dict:
    """The synthetic multi-label set, UCMerced-sized splits (SYNTH_EVAL): the given tasks' tiles in turn."""
    n_train, n_test = SYNTH_EVAL["train"], SYNTH_EVAL["test"]
    tasks, n = list(tasks or SYNTH_TASKS), n_train + n_test
    parts = [synth_task(name, -(-n // len(tasks)), size, DATA_SEED + 2000) for name in tasks]
    x = np.stack([p[0] for p in parts], 1).reshape(-1, 3, size, size)[:n]  # [n, 3, S, S]: the tasks in turn
    y = np.stack([p[1] for p in parts], 1).reshape(-1, len(SYNTH_LABELS))[:n]
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:]), "labels": list(SYNTH_LABELS)}


def tile_size(tasks: list, img_size: int) -> int:
    """Raw tile side S: 256 for real images; for synthetic tasks the same S/img ratio as 256/224."""
    return PATCH if tasks[0] not in SYNTH_TASKS else round(img_size * PATCH / 224)


def task_arg(value: str) -> str:
    """--tasks: a synthetic or real task name, or a folder of images (its absolute path); argparse's type."""
    if value in SYNTH_TASKS or value in REAL_TASKS:
        return value
    if not os.path.isdir(value):
        import argparse
        raise argparse.ArgumentTypeError(f"{value!r}: not a task ({', '.join([*SYNTH_TASKS, *REAL_TASKS])}) or folder")
    return str(Path(value).resolve())


def task_name(task: str) -> str:  # a folder task: its folder's name
    return Path(task).name if task not in SYNTH_TASKS and task not in REAL_TASKS else task


def evaluation_sets(tasks: list, size: int, ucmerced="", data_root="data", cache_dir="", treesat_resize=False) -> dict:
    """main: the multi-label set; own: each synthetic task's own labelled set (A); held_out: REC_TILES per task (R)."""
    synth, n = [t for t in tasks if t in SYNTH_TASKS], SYNTH_EVAL["own"]
    main = ucmerced_splits(ucmerced, cache_dir) if ucmerced else synthetic_eval_set(size, synth or None)
    own, held_out = [None] * len(tasks), []
    for j, t in enumerate(tasks):
        if t in SYNTH_TASKS:  # its own labelled set, never trained on: train and test halves of n
            x, y = synth_task(t, 2 * n, size, DATA_SEED + 1000)
            own[j] = {"train": (x[:n], y[:n]), "test": (x[n:], y[n:])}
            held_out.append(x[n:][:REC_TILES])
        else:  # a fixed random subset of the val split, in its stored order
            tiles = task_tiles(t, data_root, "val", cache_dir, treesat_resize=treesat_resize)
            pick = np.random.default_rng([DATA_SEED, 11]).permutation(len(tiles))[:REC_TILES]
            held_out.append(np.asarray(tiles[np.sort(pick)]))
    return dict(main=main, own=own if all(own) else None, held_out=held_out)


# --- real images: official layouts or a folder → non-overlapping 256×256 patches (TreeSatAI: the centre one) ------
REAL_TASKS = ("us3d", "uavid", "potsdam", "treesat")
PAPER_COUNTS = {"us3d": (21081, 3072), "uavid": (24560, 8640), "potsdam": (15870, 1058), "treesat": (15000, 1000)}
DATASETS = {  # folder names under --data-root, the files looked for, where to get the data
    "us3d": (("US3D", "us3d", "DFC2019", "dfc2019"), "JAX_*_RGB.tif or JAX_*_MSI.tif (val: *val* folder)", "DFC 2019"),
    "uavid": (("UAVid", "uavid"), "uavid_train/seqN/Images/*.png and uavid_val/seqN/Images/*.png", "uavid.nl"),
    "potsdam": (("Potsdam", "potsdam", "ISPRS_Potsdam"), "4_Ortho_RGBIR/*_RGBIR.tif or 2_Ortho_RGB/*_RGB.tif", "ISPRS"),
    "treesat": (("TreeSatAI", "treesat", "TreeSat"), "aerial/60m/*.tif (IR,G,B,R)", "TreeSatAI (Zenodo)"),
}
PATCH = 256
PRINT = functools.partial(print, flush=True)  # the default log
DISK_TODO = "free space (or choose another folder) and rerun"
PIL_SUFFIXES, IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg"), (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def broken(path: Path, why: str) -> DataError:
    return DataError(f"cannot read {path}: {why}; re-copy or remove it (LZW/JPEG TIFFs need: pip install imagecodecs)")


@contextmanager
def image_errors(path: Path):
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        raise broken(path, f"{type(e).__name__}: {str(e)[:160]}") from None


def read_rgb(path: Path, bands=(0, 1, 2), n_bands=3, bits=8, header=False):
    """uint8 [3, H, W] of a PNG/JPEG (16 bits: scaled) or of a TIFF's `bands` in 8 bits; header: (H, W, 1 grey or 3)."""
    if path.suffix.lower() in PIL_SUFFIXES:
        from PIL import Image, ImageFile
        truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # truncated: an error
        try:
            with image_errors(path), Image.open(path) as im:
                if header:
                    return im.height, im.width, 1 if Image.getmodebase(im.mode) == "L" else 3
                if im.mode.startswith("I"):  # 16-bit grey: round(v · 255 / 65535)
                    return np.repeat(np.round(np.asarray(im) * (255 / 65535)).astype(np.uint8)[None], 3, 0)
                return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    import tifffile
    with image_errors(path), tifffile.TiffFile(path) as tif:  # a cut page chain: tifffile logs it, the shape is off
        end, s, dtype = tif.filehandle.size, tuple(tif.series[0].shape), tif.series[0].dtype
        for page in tif.pages:
            for o, n in zip(page.dataoffsets, page.databytecounts):
                if n and o + n > end:  # byte count 0: an empty tile, not an error
                    raise broken(path, f"page {page.index} needs {o + n} bytes, the file has {end}")
        a = tif.asarray() if not header and len(s) == 3 else None
    if len(s) != 3 or n_bands not in (s[0], s[-1]):
        raise DataError(f"{path}: shape {s}, expected {n_bands} bands ([H, W, C] or [C, H, W])")
    if dtype != np.dtype(np.uint8 if bits == 8 else np.uint16):
        raise DataError(f"{path}: dtype {dtype}, expected {np.dtype(np.uint8 if bits == 8 else np.uint16)}")
    chw = s[0] == n_bands and s[-1] != n_bands
    if header:
        return (*s[1:], 3) if chw else (*s[:2], 3)
    rgb = (a if chw else a.transpose(2, 0, 1))[list(bands)]  # [3, H, W]
    if bits == 8:
        return rgb
    return np.clip(rgb.astype(np.float32) * (255 / (2 ** bits - 1)), 0, 255).round().astype(np.uint8)


def split_files(name: str, folder: Path, seed: int) -> dict:
    """{'train': [paths], 'val': [paths], 'files': all, 'read': read_rgb's arguments}, by the official layout."""
    rng, read = np.random.default_rng([seed, 42]), {}
    if name == "us3d":
        files = sorted(folder.rglob("*_RGB.tif"), key=str) or sorted(folder.rglob("*_MSI.tif"), key=str)
        val = [p for p in files if "val" in str(p.parent.relative_to(folder)).lower()]
        train = [p for p in files if p not in val]
        if not val and len(train) > 1:  # one pool of tiles: hold out the paper's share of tiles for validation
            val = [train[i] for i in rng.permutation(len(train))[:max(1, round(len(train) * 3072 / 24153))]]
            train = [p for p in train if p not in val]
        if files and files[0].name.endswith("_MSI.tif"):
            read = dict(bands=(4, 2, 1), n_bands=8, bits=11)
    elif name == "uavid":
        files = sorted(folder.rglob("uavid_*/*/Images/*.png"), key=str)
        train, val = [p for p in files if "uavid_train" in p.parts], [p for p in files if "uavid_val" in p.parts]
    else:  # whole images drawn at random
        if name == "potsdam":  # by orthophoto: 1058 = 2×529 val, 15870 = 30×529 train patches
            files = sorted((folder / "4_Ortho_RGBIR").glob("*.tif")) or sorted((folder / "2_Ortho_RGB").glob("*.tif"))
            n_val, n_train = 2 if len(files) >= 32 else int(len(files) >= 2), 30
            read = dict(n_bands=4) if files and "RGBIR" in files[0].name else {}
        else:  # treesat: IR,G,B,R → RGB = bands 3, 1, 2
            files = sorted((folder / "aerial" / "60m").glob("*.tif"))
            n_val, n_train = min(1000, max(int(len(files) >= 2), len(files) // 16)), len(files)
            read = dict(bands=(3, 1, 2), n_bands=4)
        order = [files[i] for i in rng.permutation(len(files))]
        val, train = order[:n_val], order[n_val:n_val + n_train]
    if not files:
        raise DataError(f"{name}: no images found in {folder}; expected {DATASETS[name][1]}")
    return dict(train=train, val=val, read=read, files=files)


def task_tiles(name: str, data_root, split: str, cache_dir="", seed: int = DATA_SEED, log=PRINT,
               treesat_resize: bool = False) -> np.ndarray:
    """uint8 [N, 3, 256, 256] patches of split 'train' or 'val' of a real dataset or a folder, from the tile cache."""
    if name in DATASETS:
        names, layout, source = DATASETS[name]
        folder = next((Path(data_root) / n for n in names if (Path(data_root) / n).is_dir()), None)
        if folder is None:
            raise DataError(f"{name}: no folder {' or '.join(str(Path(data_root) / n) for n in names)} (expected: "
                            f"{layout}); get it from {source} or point --data-root at it")
        s = split_files(name, folder, seed)
        files, args, want, key = s[split], s["read"], PAPER_COUNTS[name][split == "val"], f"{name}_{split}"
        dirs = cache_dirs(Path(data_root), cache_dir)
    elif os.path.isdir(name):  # a folder task: every image under it; 1 in 10 patches held out as its 'val'
        folder, args, want = Path(name), {}, None
        files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()), key=str)
        if not files:
            raise DataError(f"{folder}: no PNG, JPEG or TIFF image in it or its sub-folders: add RGB images")
        key = f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}_{split}"
        dirs = cache_dirs(folder, cache_dir)
    else:
        raise DataError(f"unknown task {name!r}; known: {list(DATASETS)}, or a folder of images")
    resize = name == "treesat" and treesat_resize

    def select():  # the split's patches, drawn at random from every patch of its images (headers only)
        heads = [read_rgb(p, **args, header=True) for p in files]
        cells = []  # (image, row, col) of each non-overlapping patch; TreeSatAI: the centre one, or all of it resized
        for i, (h, w, _) in enumerate(heads):
            if name != "treesat":
                cells += [(i, r, c) for r in range(0, h - PATCH + 1, PATCH) for c in range(0, w - PATCH + 1, PATCH)]
            elif resize or min(h, w) >= PATCH:
                cells.append((i, 0, 0) if resize else (i, (h - PATCH) // 2, (w - PATCH) // 2))
        order = np.random.default_rng([seed, 7]).permutation(len(cells))
        if want is not None:  # a real dataset: the paper's count
            if len(cells) < want:
                log(f"{name} {split}: {len(cells)} patches found, the paper uses {want}: using {len(cells)}")
            return [cells[i] for i in np.sort(order[:want])]
        for p, (h, w, _) in zip(files, heads):
            if min(h, w) < PATCH:
                raise DataError(f"{p}: {w}×{h} pixels; a folder task needs images of at least 256×256: remove it")
        kinds = {c: p for p, (_, _, c) in zip(files, heads)}  # 1: grey, 3: colour
        if len(kinds) > 1:
            raise DataError(f"{folder}: grey and colour images mixed ({kinds[1]}, {kinds[3]}): make them all RGB")
        if len(cells) < 2:
            raise DataError(f"{folder}: one 256×256 patch; a folder task needs 2 or more (1 in 10 is held out)")
        n_val = max(1, len(cells) // 10)
        return [cells[i] for i in np.sort(order[:n_val] if split == "val" else order[n_val:])]

    def read(p):
        return resize_rgb(read_rgb(p, **args)) if resize else read_rgb(p, **args)

    return cached_tiles(dirs, key + "_resized" * resize, folder, files, seed, select, read, log)


def resize_rgb(img: np.ndarray) -> np.ndarray:
    from PIL import Image
    return img if img.shape[1:] == (PATCH, PATCH) else np.asarray(
        Image.fromarray(img.transpose(1, 2, 0)).resize((PATCH, PATCH), Image.BILINEAR)).transpose(2, 0, 1)


def atomic_write(path: Path, write, todo: str = ""):
    """write(`<name>.<pid>.<random>.tmp`), then rename: never a half-written or leftover file; a full disk: one line."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with disk_errors(path, todo or DISK_TODO):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def disk_errors(path, todo: str = DISK_TODO):
    """A full disk while writing `path` → one-line DataError (why; todo); every other error passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # a named error: about space or not
            why = e.strerror if e.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", 0)) else None
        else:  # no errno (numpy, torch): a full disk under `ulimit -f` or with under 64 MB free
            import resource
            free = shutil.disk_usage(Path(path).parent).free if Path(path).parent.is_dir() else 1 << 30
            limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
            why = f"{free >> 20} MB free, {type(e).__name__}: {str(e)[:80]}" if limited or free < 64 << 20 else None
        if why is None:
            raise
        raise DataError(f"no space left on the device writing {path} ({why}); {todo}") from None


# --- from raw tiles to model input: augmentation (paper §III-B), normalisation, batches ---------------------
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics, as MAE
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@functools.cache
def mean_std(device: torch.device) -> tuple:
    return MEAN.to(device), STD.to(device)


def to_device(a: np.ndarray, device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.pin_memory() if torch.device(device).type == "cuda" else t).to(device, non_blocking=True)


def augment(tiles: torch.Tensor, size: int, gen: torch.Generator | None) -> torch.Tensor:
    """uint8 [N, 3, S, S] → normalised [N, 3, size, size]: a random resized crop and flip each (gen None: resize)."""
    x, n = tiles.float().div_(255), tiles.shape[0]
    if gen is None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        u = torch.rand((n, 5), generator=gen, device=x.device)  # per sample: area, aspect, x, y, flip
        area, log_r = 0.8 + 0.2 * u[:, 0], math.log(3 / 4) + math.log(16 / 9) * u[:, 1]
        w, h = (area * log_r.exp()).sqrt().clamp(max=1), (area / log_r.exp()).sqrt().clamp(max=1)  # of the tile
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=x.device)  # [N, 2, 3] output grid → input coordinates
        theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
        theta[:, 0, 2], theta[:, 1, 2] = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)  # [N, size, size, 2]
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean, std = mean_std(x.device)
    return (x - mean) / std


def batches(tiles, batch_size: int, rng: np.random.Generator, device, share=(0, 1)):
    """An epoch of shuffled uint8 batches on `device` (drop_last, read ahead); share (i, n): process i's rows of n."""
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


def writable(folder: Path) -> bool:  # a file can be made in it (os.access says yes to root everywhere)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def cached_tiles(dirs: list, key: str, root: Path, files: list, seed: int, select, read, log):
    """`key.npy` [N, 3, 256, 256] + `key.json` (files, sizes, mtimes, seed, shape): a valid one, else built (locked)."""
    gone = [p for p in files if not p.exists()]
    if gone:
        raise DataError(f"cannot read {gone[0]}: no such file (a dangling link?); fix or remove it")
    manifest = dict(version=1, seed=seed, files=[[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
                                                 for p in files])
    if (found := find_cache(dirs, key, manifest, log)) is not None:
        return found
    d = next((d for d in dirs if writable(d)), None)
    if d is None:
        raise DataError(f"{key}: no writable place for the tile cache ({', '.join(map(str, dirs))}): use --cache-dir")
    npy, man = d / f"{key}.npy", d / f"{key}.json"
    todo = "free space, or name a folder on another disk with --cache-dir, and rerun"
    with disk_errors(npy, todo), cache_lock(d / f"{key}.lock", log):
        if (found := find_cache(dirs, key, manifest, log)) is not None:  # built by another process meanwhile
            return found
        for stale in (*d.glob(f"{key}.npy.*tmp"), *d.glob(f"{key}.json.*tmp")):  # a killed build's
            stale.unlink(missing_ok=True)
        man.unlink(missing_ok=True)
        cells = select()
        if not cells:
            raise DataError(f"{key}: no 256×256 patch in the {len(files)} images under {root}")
        mb = len(cells) * 3 * PATCH * PATCH / 1e6
        log(f"{key}: building the tile cache {npy} ({len(cells)} patches, {mb:.1f} MB)")
        todo = f"the cache needs {mb:.1f} MB: {todo}"
        atomic_write(npy, lambda tmp: fill_cache(tmp, cells, files, read, key, log), todo)
        manifest["shape"] = [len(cells), 3, PATCH, PATCH]
        atomic_write(man, lambda tmp: tmp.write_text(json.dumps(manifest)), todo)
        return np.load(npy, mmap_mode="r")


def find_cache(dirs: list, key: str, manifest: dict, log):
    """The first cache with this manifest and a whole uint8 .npy of the shape it records, else None."""
    for d in dirs:
        npy = d / f"{key}.npy"
        try:
            stored = read_json(d / f"{key}.json", dict)
            x = np.load(npy, mmap_mode="r")  # a truncated .npy: ValueError
        except (DataError, OSError, ValueError):
            continue
        if stored == {**manifest, "shape": list(x.shape)} and x.dtype == np.uint8 and (
                npy.stat().st_size == x.offset + x.nbytes):
            log(f"{key}: tile cache {npy}")
            return x


@contextmanager
def cache_lock(path: Path, log):
    """An exclusive flock on `path` for the block, the file removed before release; no flock: unlocked."""
    while True:
        with open(path, "a") as f:
            try:
                import fcntl
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"{path.name}: waiting for another process that builds this tile cache ({path})")
                fcntl.flock(f, fcntl.LOCK_EX)
            except (ImportError, OSError) as e:
                if getattr(e, "errno", 0) not in (0, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
            if os.fstat(f.fileno()).st_nlink:  # not a file its holder removed (then lock the new one)
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)
                return


def fill_cache(path: Path, cells: list, files: list, read, key: str, log):
    """Patches `cells` [(file, row, col)] into a new .npy, its blocks allocated first (a full disk: not a SIGBUS)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(cells), 3, PATCH, PATCH))
    with open(path, "r+b") as f:
        try:  # not on macOS, nor on every file system: there the writes into the map allocate
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except (AttributeError, OSError) as e:
            if getattr(e, "errno", errno.ENOSYS) not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        t0, done, n_images = time.time(), 0, len({i for i, _, _ in cells})  # progress, ETA
        for n, (i, r, c) in enumerate(cells):
            if n == 0 or i != cells[n - 1][0]:  # the cells come grouped by image: each image is read once
                img, done = read(files[i]), done + 1  # [3, H, W]
                if done % 50 == 0 or done == n_images:
                    eta = (time.time() - t0) * (n_images / done - 1)
                    log(f"{key}: caching {done}/{n_images} images, ETA {eta:.0f} s")
            patch = img[:, r:r + PATCH, c:c + PATCH]
            if patch.shape != (3, PATCH, PATCH):  # fewer pixels than the header said
                raise broken(files[i], f"{img.shape[1]}×{img.shape[2]} pixels, fewer than its header said")
            out[n] = patch
        out.flush()
        os.fsync(f.fileno())


# --- UCMerced multi-label (the evaluation set of the paper) --------------------------------------------
MLKNN_K = 10  # ML-kNN's k (eval_mlknn.K, the paper's): the training split must hold more images than this


def ucmerced_splits(folder, cache_dir="", seed: int = DATA_SEED, log=PRINT, k: int = MLKNN_K) -> dict:
    """UCMerced multi-label → {train, val, test: (uint8 [n, 3, 256, 256], [n, 17]), labels}: 1000/300/800 of 2100."""
    folder = Path(folder)
    found = sorted(folder.glob("LandUse_Multilabeled.txt")) + sorted(folder.glob("*/LandUse_Multilabeled.txt"))
    if not (folder / "Images").is_dir() or not found:
        raise DataError(f"{folder}: expected Images/<class>/<class>NN.tif and LandUse_Multilabeled.txt")
    names, rows, y = read_label_file(found[0])
    n_train, n_val = round(len(rows) * 1000 / 2100), round(len(rows) * 300 / 2100)
    if n_train <= k:  # ML-kNN finds k neighbours of each image among the others
        need = next(n for n in range(len(rows), 10 ** 6) if round(n * 1000 / 2100) > k)
        raise DataError(f"{found[0]}: {len(rows)} images, {n_train} to train on; ML-kNN (k={k}) needs {need} images")
    files = [folder / "Images" / r.rstrip("0123456789") / f"{r}.tif" for r in rows]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} images listed in {found[0]} are missing, e.g. {missing[0]}")
    x = cached_tiles(cache_dirs(folder, cache_dir), "ucmerced", folder, files, 0,
                     lambda: [(i, 0, 0) for i in range(len(files))], lambda p: resize_rgb(read_rgb(p)), log)
    order = np.random.default_rng([seed, 2100]).permutation(len(files))
    parts = dict(train=order[:n_train], val=order[n_train:n_train + n_val], test=order[n_train + n_val:])
    return {**{k: (np.asarray(x[np.sort(v)]), y[np.sort(v)]) for k, v in parts.items()}, "labels": names}


def read_label_file(path: Path) -> tuple:
    """LandUse_Multilabeled.txt (tab-separated, trailing tabs dropped) → (label names, image names, uint8 [n, Q])."""
    try:
        lines = [[c.strip() for c in line.rstrip().split("\t")] for line in path.read_text().splitlines()] or [[""]]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    names = lines[0][1:]
    if not names:
        raise DataError(f"{path} line 1: expected a header 'IMAGE\\LABEL<TAB>name<TAB>...', got {lines[0][0]!r}")
    y, seen = [], {}  # image name → its line
    for i, cells in enumerate(lines[1:], 2):
        if cells == [""]:
            continue
        if len(cells) != len(names) + 1 or any(c not in ("0", "1") for c in cells[1:]):
            raise DataError(f"{path} line {i}: expected an image name and {len(names)} values 0 or 1, got "
                            f"{len(cells) - 1} values")
        if cells[0] in seen:
            raise DataError(f"{path} lines {seen[cells[0]]} and {i}: image {cells[0]!r} is listed twice; keep one")
        seen[cells[0]] = i
        y.append([int(c) for c in cells[1:]])
    if not np.any(y):
        raise DataError(f"{path}: no label value 1 in its {len(y)} image rows; use Chaudhuri et al.'s 0/1 labels")
    return names, list(seen), np.array(y, np.uint8)
