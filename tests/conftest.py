"""Shared by the tests in this folder: tiny configurations, runs, fake datasets in the official layouts."""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's modules

import baselines  # noqa: E402
import cosmae
import eval_mlknn
import rs_data
import runner
from cosmae import MAE, MODELS, Config

torch.set_num_threads(1)  # tiny models: one thread is as fast, and many times faster on a busy machine


def tiny_cfg(tmp_path, **kw) -> Config:
    base = dict(tasks=["synth_red", "synth_green"], model="vit_test", epochs=1, batch_size=8, synth_train=32,
                memory_size=20, eval=False, log_every=2, out=str(tmp_path / "run"), device="cpu", warmup_epochs=0.5)
    base.update(kw)
    cls = baselines.BaselineConfig if base.get("method") in baselines.BASELINES else Config
    return (baselines.resolve if cls is not Config else cosmae.resolve)(cls(**base))


def train(cfg) -> dict:
    """A run as `python cosmae.py` (or baselines.py) makes it, in process: its run folder (runner.Run), the
    evaluation callback, the baseline object of cfg.method → {'model', 'checkpoints', 'eval'}."""
    method = baselines.make(cfg) if isinstance(cfg, baselines.BaselineConfig) else None
    with runner.Run(cfg, method, [eval_mlknn.Evaluation(cfg)] if cfg.eval else []) as run:
        model = cosmae.train(cfg, run, method.step) if method else cosmae.train(cfg, run)
    return dict(model=model, checkpoints=[p for _, _, p in runner.finished_tasks(cfg.out, cfg.tasks)],
                eval=eval_mlknn.read_rows(cfg.out))


SMALL_EVAL = dict(SYNTH_EVAL=dict(own=60, train=60, test=40), REC_TILES=24)


@pytest.fixture
def small_eval(monkeypatch):
    """Small synthetic evaluation sets, so that runs with evaluation stay quick."""
    for k, v in SMALL_EVAL.items():
        monkeypatch.setattr(rs_data, k, v)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The config of a tiny finished run (tiny_cfg with evaluation on small_eval's sets), made once per session.
    Read it only; copy_run gives a copy to change."""
    saved = {k: getattr(rs_data, k) for k in SMALL_EVAL}
    vars(rs_data).update(SMALL_EVAL)
    try:
        cfg = tiny_cfg(tmp_path_factory.mktemp("finished"), eval=True)
        train(cfg)
    finally:
        vars(rs_data).update(saved)
    return cfg


def copy_run(cfg, out) -> Config:
    """A copy of the run folder of cfg in `out` → its config."""
    shutil.copytree(cfg.out, out)
    return dataclasses.replace(cfg, out=str(out))


def tiny_model(**kw) -> MAE:
    torch.manual_seed(0)
    return MAE(**{**MODELS["vit_test"], **kw})


def encoder_of(path):
    return torch.load(path, weights_only=True)["encoder"]


def records(run):
    return [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]


def bands_image(values, h, w, dtype, chw=False):
    """An image whose band b is the constant values[b]: [H, W, C] (or [C, H, W])."""
    a = np.stack([np.full((h, w), v, dtype) for v in values])
    return a if chw else a.transpose(1, 2, 0)


def write_packbits_tiled(path, img):
    """A tiled, PackBits-compressed TIFF. tifffile reads PackBits on its own but needs imagecodecs to write
    it, so the test lends it a plain PackBits encoder (literal runs of up to 128 bytes) for the write only."""
    import tifffile.tifffile as tt

    def packbits_encode(data, *args, **kwargs):
        raw, out = np.ascontiguousarray(data).tobytes(), bytearray()
        for i in range(0, len(raw), 128):
            out += bytes([len(raw[i:i + 128]) - 1]) + raw[i:i + 128]
        return bytes(out)

    had = hasattr(tt.imagecodecs, "packbits_encode")
    if not had:
        tt.imagecodecs.packbits_encode = packbits_encode
    try:
        tifffile.imwrite(path, img, tile=(256, 256), compression="packbits", photometric="minisblack",
                         planarconfig="contig")
    finally:
        if not had:
            del tt.imagecodecs.packbits_encode
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == 32773 and tif.pages[0].is_tiled


def make_uavid(root: Path):
    for split, seq in (("uavid_train", "seq1"), ("uavid_train", "seq2"), ("uavid_val", "seq16")):
        d = root / "UAVid" / split / seq / "Images"
        d.mkdir(parents=True)
        Image.fromarray(np.full((512, 768, 3), 77, np.uint8)).save(d / "000000.png")


def make_datasets(root: Path):
    make_uavid(root)
    (root / "US3D" / "Train-Track1-MSI").mkdir(parents=True)
    (root / "US3D" / "Validate-Track1-MSI").mkdir(parents=True)
    for i, sub in ((1, "Train-Track1-MSI"), (2, "Train-Track1-MSI"), (3, "Validate-Track1-MSI")):
        tifffile.imwrite(root / "US3D" / sub / f"JAX_{i:03d}_007_MSI.tif",
                         bands_image([100 * (b + 1) for b in range(8)], 512, 512, np.uint16),
                         photometric="minisblack", planarconfig="contig")  # one page of 8 samples, as WorldView-3
    ortho = root / "Potsdam" / "4_Ortho_RGBIR"
    ortho.mkdir(parents=True)
    for i in range(3):
        write_packbits_tiled(ortho / f"top_potsdam_2_{10 + i}_RGBIR.tif",
                             bands_image([10, 20, 30, 40 + i], 512, 768, np.uint8))
    aerial = root / "TreeSatAI" / "aerial" / "60m"
    aerial.mkdir(parents=True)
    for name in ("Abies_alba_1_10000_WEFL_NLF.tif", "Picea_abies_3_46_2.5_WEFL.tif", "Pinus_sylvestris_5_1.1.tif"):
        tifffile.imwrite(aerial / name, bands_image([1, 2, 3, 4], 304, 304, np.uint8, chw=True),  # IR, G, B, R
                         photometric="minisblack", planarconfig="separate")  # one page, [C, H, W]


def make_ucmerced(root: Path, n_per_class=14):
    classes = ["airplane", "beach", "tenniscourt"]
    names = ["airplane", "bare-soil", "buildings", "cars", "chaparral", "court", "dock", "field", "grass",
             "mobile-home", "pavement", "sand", "sea", "ship", "tanks", "trees", "water"]
    lines = ["IMAGE\\LABEL\t" + "\t".join(names)]
    for ci, c in enumerate(classes):
        (root / "Images" / c).mkdir(parents=True)
        for i in range(n_per_class):
            size = (247, 256) if (ci, i) == (0, 3) else (256, 256)
            img = np.random.default_rng(i + 100 * ci).integers(0, 255, (*size, 3), dtype=np.uint8)
            img[..., ci] = 250  # a class colour
            tifffile.imwrite(root / "Images" / c / f"{c}{i:02d}.tif", img)
            labels = [int(j == ci or (j == 16 and i % 2)) for j in range(17)]
            lines.append(f"{c}{i:02d}\t" + "\t".join(map(str, labels)))
    (root / "LandUse_Multilabeled.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return names

QUIET = dict(log=lambda m: None)


def ucm(root: Path, **kw):
    return rs_data.ucmerced_splits(root, root.parent / "c", **QUIET, **kw)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is as fast, and many times faster on a busy machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
