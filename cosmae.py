"""CoSMAE: continual self-supervised learning with masked autoencoders for remote sensing.

L. Möllenbrok, B. Rasti, B. Demir, "Masked Autoencoders in Continual Self-Supervised Learning for Remote
Sensing", IEEE GRSL, arXiv:2506.21312. Official code: https://git.tu-berlin.de/rsim/CoSMAE (announced in
the paper, not available to us and NOT consulted: everything here is written from the paper's text).

Method. A ViT MAE f = (e, d) learns the tasks T_1..T_T one after another. From task 2 on, two regularisers
fight forgetting: (i) data mixup, Eq. (2): each image is mixed with a random image of a small memory buffer
of past tasks; (ii) model-mixup knowledge distillation, Eq. (3)-(4): a teacher whose weights interpolate the
previous encoder θ_{t−1} and the current one θ_t encodes the unmasked mixed image, and the student's
projected features g(c) are pulled to the teacher's c̃ with a symmetric temperature-scaled cross-entropy.
After each task the frozen encoder is scored by ML-kNN (eval_mlknn.py).

Index of equations → code (grep "Eq. (" to find each tag at the line that computes it):
    Eq. (1) masked-patch MSE          → MAE.forward_loss
    Eq. (2) data mixup                → mix_batch          (memory buffer: ReplayBuffer)
    Eq. (3) model-mixup teacher       → MixupTeacher.rebuild
    Eq. (4) MIM loss                  → mim_loss           (projector g: make_projector)
    Eq. (5) total loss                → cosmae_loss        (one optimisation step: train_step)

Notation: N batch, L patches, D width, p patch size, H×W image; λ1 = lam1, λ2 = lam2, τ = tau, β = beta,
θ_{t−1} = theta_prev; mask convention as in MAE: 1 = removed, 0 = kept.

Run:
    python cosmae.py                                   # tiny CPU run on 4 synthetic RS-like tasks (~5 min)
    python cosmae.py --method finetune --seeds 0 1 2   # the sequential-MAE baseline, three seeds
    python cosmae.py --tasks us3d uavid potsdam treesat --data-root DATA --ucmerced DATA/UCMerced_LandUse
    python baselines.py --method er                    # the other rows of Table II: er ewc der pfr
    python eval_mlknn.py runs/cosmae                   # the tables of finished runs
    python cosmae.py --help                            # every flag, with the paper symbol and default source

Every choice the paper leaves open, and every deviation, is listed in README.md ("Inferred choices").
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_mlknn
import rs_data
from rs_data import DataError, atomic_write


# --- Configuration ---------------------------------------------------------------------------------------

def arg(default, help, **kw):
    """A Config field whose --help text is `help` (the CLI below is built from the fields)."""
    return field(default_factory=lambda: copy.copy(default), metadata=dict(help=help, **kw))


@dataclass
class Config:
    # experiment
    method: str = arg("cosmae", "cosmae, or its Table I/II switches: finetune (no mixup, no KD), lump (data "
                      "mixup only); ER, EWC, DER, PFR: baselines.py", choices=["cosmae", "finetune", "lump"])
    tasks: list = arg(list(rs_data.SYNTH_TASKS), "task sequence T_1..T_T: synthetic (default) or the paper's "
                      "us3d uavid potsdam treesat")
    data_root: str = arg("data", "folder holding the real datasets (README: 'Data layout')")
    cache_dir: str = arg("", "tile cache folder ('' = DATA_ROOT/.cosmae_cache if writable, else the user cache)")
    ucmerced: str = arg("", "UCMerced_LandUse folder: ML-kNN on it after each task (else the synthetic set)")
    out: str = arg("runs/cosmae", "run folder: config.json, metrics.jsonl, task checkpoints; rerun to resume")
    seed: int = arg(0, "seed of model init, data order, augmentation, masking, buffer and λ draws")
    seeds: list = arg([], "several seeds: one run each under OUT/seed<s> (the paper averages 3)")
    device: str = arg("auto", "auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    eval: bool = arg(True, "evaluation before task 1 and after every task (ML-kNN, Eq. (1) per task, pictures)")
    mlknn_count_self: bool = arg(False, "ML-kNN counts a training image as its own neighbour (scikit-multilearn; "
                                        "Zhang & Zhou do not)")
    log_every: int = arg(20, "steps between progress lines / metrics.jsonl records")
    save_every: int = arg(10, "epochs between resumable mid-task checkpoints (last.pt)")
    # MAE (paper §III-B)
    model: str = arg("", "vit_base (paper), vit_tiny (CPU default), vit_test (unit tests); '' = by tasks")
    mask_ratio: float = arg(0.75, "r, mask ratio of Eq. (1) (paper §III-B)")
    norm_pix_loss: bool | None = arg(None, "MAE's per-patch normalised target (paper: not mentioned, off; "
                                           "synthetic preset: on); unset = by preset")
    pool: str = arg("mean", "features c: mean of patch tokens or the cls token (inferred)", choices=["mean", "cls"])
    init: str = arg("", "optional MAE checkpoint (e.g. official mae_pretrain_vit_base.pth) to start from")
    # CoSMAE (paper §II)
    data_mixup: bool = arg(True, "Eq. (2) data mixup with the memory buffer (t ≥ 2)")
    model_mixup: bool = arg(True, "Eq. (3)-(4) model-mixup knowledge distillation (t ≥ 2)")
    lam1: str = arg("beta", "λ1 sampling: beta (Beta(α1,α1)), uniform (U[0,1]) or constant",
                    choices=["beta", "uniform", "constant"])
    alpha1: float = arg(0.4, "α1 of λ1 ~ Beta(α1, α1) (paper §III-B)")
    lam1_value: float = arg(0.5, "λ1 when --lam1 constant")
    lam2: str = arg("beta", "λ2 sampling: beta, uniform or constant (constant 0 = plain old encoder as teacher)",
                    choices=["beta", "uniform", "constant"])
    alpha2: float = arg(0.4, "α2 of λ2 ~ Beta(α2, α2) (paper §III-B)")
    lam2_value: float = arg(0.5, "λ2 when --lam2 constant (Fig. 2c: 0.5 and 0)")
    beta: float = arg(0.1, "β of Eq. (5), weight of the MIM loss (paper §III-C, Fig. 2b)")
    tau: float = arg(0.5, "τ of Eq. (4), temperature (paper §III-B)")
    mim_form: str = arg("paper", "Eq. (4): paper (as printed, positive left out of each denominator), infonce "
                        "(positive kept), simclr (NT-Xent over all 2N, as CSMAE's code)",
                        choices=["paper", "infonce", "simclr"])
    proj_hidden: int = arg(128, "hidden width of the 2-layer projector g (paper §III-B)")
    memory_size: int = arg(1000, "M, images in the memory buffer (paper §III-B)")
    # optimisation (paper §III-B)
    epochs: int = arg(0, "epochs per task (paper 300; 0 = by preset)")
    batch_size: int = arg(0, "images per step (paper 128; 0 = by preset)")
    lr: float = arg(1e-3, "AdamW learning rate, absolute (paper §III-B; not MAE's base lr × batch/256)")
    weight_decay: float = arg(0.05, "AdamW weight decay (MAE's value; the paper does not say)")
    warmup_epochs: float = arg(-1.0, "linear warm-up epochs, then cosine (paper 10; -1 = by preset)")
    amp: bool = arg(True, "bf16 autocast on CUDA (ignored on CPU; inferred: the paper does not say)")
    compile: bool = arg(False, "torch.compile the MAE and the teacher's encoder")
    # data
    synth_train: int = arg(1024, "training images per synthetic task")
    treesat_resize: bool = arg(False, "TreeSatAI: resize each 304×304 image to 256 (default: its centre 256×256)")


MODELS = {  # encoder width/depth/heads, decoder width/depth/heads, image and patch size
    "vit_base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_tiny": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                     decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=3),
    "vit_test": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
}
PRESETS = {  # the paper's for real data; a few-minute CPU run for synthetic (README, "Synthetic data")
    "paper": dict(model="vit_base", epochs=300, batch_size=128, warmup_epochs=10, norm_pix_loss=False),
    "synthetic": dict(model="vit_tiny", epochs=16, batch_size=32, warmup_epochs=1, norm_pix_loss=True),
}
UNSET = dict(model="", epochs=0, batch_size=0, warmup_epochs=-1.0, norm_pix_loss=None)  # = "by preset"


def parse_args(argv=None, config_cls=Config):
    """argparse built from the fields of `config_cls`: `--help` shows each field's text and default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(config_cls):
        default, meta = f.default_factory(), dict(f.metadata)
        kw = dict(default=default, help=f"{meta.pop('help')} [default: {default}]".replace("%", "%%"), **meta)
        if "bool" in f.type:
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw.update(nargs="+", type=int if f.name == "seeds" else str)
        else:
            kw["type"] = type(default)
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return config_cls(**vars(p.parse_args(argv)))


def resolve(cfg: Config) -> Config:
    """Fill the preset-dependent fields and the method's switches once, right after parsing; then check every
    flag against its meaning, before anything is read or written."""
    unknown = [t for t in cfg.tasks if t not in rs_data.SYNTH_TASKS and t not in rs_data.REAL_TASKS]
    if unknown:
        raise DataError(f"unknown task name(s) {unknown}; known: real {list(rs_data.REAL_TASKS)}, "
                        f"synthetic {list(rs_data.SYNTH_TASKS)}")
    synthetic = [t in rs_data.SYNTH_TASKS for t in cfg.tasks]
    if any(synthetic) and not all(synthetic):
        raise DataError(f"--tasks {' '.join(cfg.tasks)}: synthetic and real tasks cannot be mixed in one sequence")
    preset = PRESETS["synthetic" if all(synthetic) else "paper"]
    for k, v in preset.items():
        if getattr(cfg, k) == UNSET[k]:
            setattr(cfg, k, v)
    if cfg.method != "cosmae":  # Table I/II rows: their own switches, not the ablation flags
        cfg.data_mixup, cfg.model_mixup = cfg.method == "lump", False
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.out = os.path.normpath(cfg.out)  # runs/x/ and runs/x are one run folder
    check_flags(cfg)
    return cfg


def enforce(cfg, rules: list):
    """rules [(field, holds, what is allowed)] → a DataError naming the first flag that breaks its rule."""
    for name, ok, allowed in rules:
        if not ok:
            raise DataError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {allowed}")


def check_flags(cfg: Config):
    """One line naming the flag, its value and what is allowed (exit 2); called before anything is written."""
    grid = MODELS.get(cfg.model, {}).get("img_size", 0) // MODELS.get(cfg.model, {}).get("patch_size", 1)
    rules = [("model", cfg.model in MODELS, f"one of {list(MODELS)}"),
             ("epochs", cfg.epochs >= 1, "≥ 1 (0 = by preset)"),
             ("batch_size", cfg.batch_size >= 1, "≥ 1 (0 = by preset)"),
             ("warmup_epochs", 0 <= cfg.warmup_epochs <= cfg.epochs, "between 0 and --epochs (-1 = by preset)"),
             ("mask_ratio", 0 < cfg.mask_ratio < 1 and 1 <= int(grid ** 2 * (1 - cfg.mask_ratio)) < grid ** 2,
              f"in (0, 1), leaving at least one of the {grid ** 2} patches visible and one masked"),
             ("lr", cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, "≥ 0"), ("tau", cfg.tau > 0, "> 0"),
             ("beta", cfg.beta >= 0, "≥ 0"), ("alpha1", cfg.alpha1 > 0, "> 0 (Beta(α1, α1))"),
             ("alpha2", cfg.alpha2 > 0, "> 0 (Beta(α2, α2))"), ("lam1_value", 0 <= cfg.lam1_value <= 1, "in [0, 1]"),
             ("lam2_value", 0 <= cfg.lam2_value <= 1, "in [0, 1]"), ("proj_hidden", cfg.proj_hidden >= 1, "≥ 1"),
             ("memory_size", cfg.memory_size >= (1 if cfg.data_mixup else 0),
              "≥ 1 with data mixup (Eq. (2) draws from the buffer; --no-data-mixup allows 0)"),
             ("log_every", cfg.log_every >= 1, "≥ 1"), ("save_every", cfg.save_every >= 1, "≥ 1"),
             ("synth_train", cfg.synth_train >= cfg.batch_size or cfg.tasks[0] in rs_data.REAL_TASKS,
              f"≥ --batch-size ({cfg.batch_size})"),
             ("seed", cfg.seed >= 0, "≥ 0"), ("seeds", all(s >= 0 for s in cfg.seeds), "≥ 0 each"),
             ("init", not cfg.init or Path(cfg.init).is_file(), "an existing checkpoint file")]
    enforce(cfg, rules)
    try:
        dev = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise DataError(f"--device {cfg.device}: not a device name; use auto, cpu, cuda or cuda:N") from None
    n_gpu = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and (dev.index or 0) >= n_gpu):
        raise DataError(f"--device {cfg.device}: this machine has {n_gpu} CUDA device(s); use auto, cpu"
                        + (f" or cuda:0..cuda:{n_gpu - 1}" if n_gpu else ""))


# --- III-A. Data: task stream, augmentation, memory buffer ------------------------------------------------
# Every task is an array of raw uint8 tiles [n, 3, S, S] (rs_data.py: the synthetic default, or the real
# datasets through a memory-mapped tile cache). Batches of raw tiles go to the device and are augmented
# there, so the buffer can store raw tiles and augment them afresh each time they are drawn.

def tile_size(cfg: Config) -> int:
    """Raw tile side S: 256 for the real datasets; for synthetic tasks the same S/img ratio as 256/224."""
    return 256 if cfg.tasks[0] in rs_data.REAL_TASKS else round(MODELS[cfg.model]["img_size"] * 256 / 224)


def task_data(name: str, cfg: Config) -> np.ndarray:
    """uint8 [n, 3, S, S] training tiles of one task."""
    if name in rs_data.SYNTH_TASKS:
        return rs_data.synth_task(name, cfg.synth_train, tile_size(cfg), rs_data.DATA_SEED)[0]
    return rs_data.task_tiles(name, cfg.data_root, "train", cfg.cache_dir, treesat_resize=cfg.treesat_resize)


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics, as MAE
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def augment(tiles: torch.Tensor, size: int, gen: torch.Generator | None) -> torch.Tensor:
    """Random resized crop (area 0.8-1, aspect 3/4-4/3) + horizontal flip, per sample in one batched
    affine_grid/grid_sample, then normalisation. gen None = no augmentation (plain resize, for evaluation).
    tiles: uint8 [N, 3, S, S] on the device → float [N, 3, size, size]."""
    x = tiles.float().div_(255)
    n = x.shape[0]
    if gen is None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        u = shard_rand((n, 5), gen, x.device)  # = torch.rand(n, 5); see the multi-GPU block
        area, log_r = 0.8 + 0.2 * u[:, 0], math.log(3 / 4) + math.log(16 / 9) * u[:, 1]
        w = (area * log_r.exp()).sqrt().clamp(max=1)  # crop width and height as fractions of the tile
        h = (area / log_r.exp()).sqrt().clamp(max=1)
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=x.device)  # [N, 2, 3] output grid → input coordinates
        theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
        theta[:, 0, 2], theta[:, 1, 2] = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)  # [N, size, size, 2]
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - MEAN.to(x.device)) / STD.to(x.device)


class ReplayBuffer:
    """Memory buffer M_t of raw tiles of past tasks (paper §II-B): ⌊M/t⌋ images of each of the t past
    tasks, chosen uniformly at random; drawn uniformly, augmented afresh when drawn."""

    def __init__(self, size: int):
        self.size, self.tiles, self._flat = size, {}, None  # tiles: {task: uint8 [m, 3, S, S]}, random order

    def add_task(self, t: int, tiles, rng: np.random.Generator):
        """After task t: keep the first ⌊M/t⌋ of every stored (randomly ordered) task, add ⌊M/t⌋ of task t."""
        per = self.size // t
        self.tiles = {k: v[:per] for k, v in self.tiles.items()}
        chosen = np.asarray(tiles[np.sort(rng.choice(len(tiles), min(per, len(tiles)), replace=False))])
        self.tiles[t] = torch.from_numpy(chosen[rng.permutation(len(chosen))])  # shuffled: a kept prefix is
        self._flat = None  # again a uniform sample of the task

    def __len__(self):
        return sum(len(v) for v in self.tiles.values())

    def draw(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        """n indices into the stored tiles (task order), uniform with replacement → int64 [n] on `device`."""
        return (shard_rand((n,), gen, gen.device) * len(self)).long().to(device)

    def flat(self, device) -> torch.Tensor:
        """Every stored tile, task after task → uint8 [len, 3, S, S] on `device` (kept until the buffer changes)."""
        if self._flat is None:
            self._flat = torch.cat(list(self.tiles.values()))
        self._flat = self._flat.to(device)  # a no-op once it is there
        return self._flat

    def sample(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        """n tiles drawn uniformly with replacement → uint8 [n, 3, S, S] on `device`."""
        return self.flat(device)[self.draw(n, gen, device)]

    def state_dict(self) -> dict:
        return {f"task{k}": v for k, v in self.tiles.items()}

    def load_state_dict(self, sd: dict):
        self.tiles, self._flat = {int(k[4:]): v for k, v in sd.items()}, None


def batches(tiles, batch_size: int, rng: np.random.Generator, device):
    """One epoch of raw uint8 batches [B, 3, S, S] on `device` (shuffled, drop_last). The next batch is read
    (memory-mapped cache → pinned memory) in a background thread while the current one trains. Under torchrun
    each rank gets its rows [rank·B/W, (rank+1)·B/W) of the same global batch."""
    from concurrent.futures import ThreadPoolExecutor
    order, pin, n = rng.permutation(len(tiles)), torch.device(device).type == "cuda", len(tiles) // batch_size
    share = slice(DIST["rank"] * batch_size // DIST["world"], (DIST["rank"] + 1) * batch_size // DIST["world"])

    def read(i):
        b = torch.from_numpy(np.ascontiguousarray(tiles[np.sort(order[i * batch_size:(i + 1) * batch_size])[share]]))
        return b.pin_memory() if pin else b

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(read, 0)
        for i in range(n):
            cur, nxt = nxt.result(), pool.submit(read, i + 1) if i + 1 < n else None
            yield cur.to(device, non_blocking=True)


# --- III-B. The MAE (ViT encoder, lightweight ViT decoder) -------------------------------------------------
# Follows facebookresearch/mae `models_mae.py` (names, init, masking, loss); differences: no timm, attention
# through F.scaled_dot_product_attention, forward() also returns the encoder tokens (for Eq. (4)), and
# encode() gives pooled features of the unmasked image (teacher and evaluation).

def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with a zero row for cls → [1, 1 + grid², dim] (as MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [D/4]
    gy, gx = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out = [torch.cat([(g.reshape(-1, 1) * omega).sin(), (g.reshape(-1, 1) * omega).cos()], 1) for g in (gx, gy)]
    emb = torch.cat(out, 1)  # [grid², D]: first half encodes x (w), second half y (h)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float().unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):  # x: [N, L, D]
        n, l, d = x.shape
        q, k, v = self.qkv(x).view(n, l, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, D/heads]
        return self.proj(x.transpose(1, 2).reshape(n, l, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):  # [N, 3, H, W] → [N, L, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class MAE(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
                 decoder_num_heads, norm_pix_loss=False):
        super().__init__()
        self.p, self.grid, self.norm_pix_loss = patch_size, img_size // patch_size, norm_pix_loss
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, self.grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)
        self.initialize_weights()

    def initialize_weights(self):
        """MAE init: xavier-uniform Linear and patch projection (as a Linear), N(0, .02) tokens, unit LayerNorm."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs):
        """imgs: [N, 3, H, W] → x: [N, L, p²·3]"""
        n, p, g = imgs.shape[0], self.p, self.grid
        x = imgs.reshape(n, 3, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, g * g, p * p * 3)

    def unpatchify(self, x):
        """x: [N, L, p²·3] → imgs: [N, 3, H, W]"""
        n, p, g = x.shape[0], self.p, self.grid
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, g, g, p, p, 3))
        return x.reshape(n, 3, g * p, g * p)

    def random_masking(self, x, mask_ratio: float):
        """Per-sample random masking by argsort of uniform noise. x: [N, L, D] → x_kept [N, len_keep, D],
        mask [N, L] (1 = removed, 0 = kept, in the original patch order), ids_restore [N, L]."""
        n, l, d = x.shape
        len_keep = int(l * (1 - mask_ratio))
        noise = shard_rand((n, l), None, x.device)  # = torch.rand(n, l); see the multi-GPU block
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, len_keep, D]
        mask = torch.ones(n, l, device=x.device)
        mask[:, :len_keep] = 0
        return x_kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs, mask_ratio: float):
        """→ latent [N, 1 + len_keep, D] (cls first), mask [N, L], ids_restore [N, L]; mask_ratio 0 = no
        masking and no shuffle (the teacher's and the evaluation's unmasked input)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # [N, L, D]
        mask = ids_restore = None
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [N, 1 + len_keep, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """latent [N, 1 + len_keep, D] → pred [N, L, p²·3]"""
        x = self.decoder_embed(x)  # [N, 1 + len_keep, D_dec]
        n, l = ids_restore.shape
        masks = self.mask_token.expand(n, l + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], masks], dim=1)  # [N, L, D_dec] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # [N, 1 + L, D_dec]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # drop cls

    def target(self, imgs):
        """What Eq. (1) reconstructs: the patches [N, L, p²·3], each normalised by its own mean and std when
        norm_pix_loss (MAE's option)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """imgs [N, 3, H, W], pred [N, L, p²·3], mask [N, L] → scalar. As MAE computes it: the squared error is
        averaged over the p²·3 values of a patch, then over the masked patches (the printed ‖·‖² sums over a
        patch's values: this is it divided by p²·3, which sets the scale that β = 0.1 weighs against)."""
        # Eq. (1)  L_Recon = 1/N_r Σ_{k masked} 1/(p²·3) ‖X_k − X̂_k‖²
        loss = ((pred.float() - self.target(imgs)) ** 2).mean(dim=-1)  # [N, L], mean loss per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio: float = 0.75):
        """→ loss_rec [], pred [N, L, p²·3], mask [N, L], latent [N, 1 + len_keep, D]"""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask, latent

    def encode(self, imgs, pool: str = "mean"):
        """Features c of the unmasked image: [N, 3, H, W] → [N, D]."""
        return pool_tokens(self.forward_encoder(imgs, 0.0)[0], pool)


def pool_tokens(latent, pool: str):
    """latent [N, 1 + L', D] → [N, D]: mean of the patch tokens (default, inferred) or the cls token."""
    return latent[:, 1:].mean(dim=1) if pool == "mean" else latent[:, 0]


def is_encoder_key(name: str) -> bool:
    """Encoder weights θ (what θ_{t−1}, the teacher and the evaluation use; loadable into a timm ViT)."""
    return not (name.startswith("decoder") or name == "mask_token")


def build_model(cfg: Config) -> MAE:
    """The MAE of cfg.model, initialised under cfg.seed (optionally from --init)."""
    torch.manual_seed(cfg.seed)
    model = MAE(**MODELS[cfg.model], norm_pix_loss=cfg.norm_pix_loss)
    if cfg.init:
        sd = load_checkpoint(cfg.init, "check the --init path")
        sd = sd.get("model", sd.get("encoder", sd))
        missing = [k for k in model.state_dict() if is_encoder_key(k) and k not in sd]
        if len(missing) == sum(map(is_encoder_key, model.state_dict())):
            raise DataError(f"--init {cfg.init}: none of its {len(sd)} weights is an encoder weight of this MAE "
                            f"(e.g. {list(sd)[:3]}); expected facebookresearch/mae names such as blocks.0.attn.qkv.weight")
        try:
            model.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise DataError(f"--init {cfg.init}: weights do not fit --model {cfg.model} ({str(e)[:300]})") from None
        print(f"init from {cfg.init}: every encoder weight loaded" if not missing else
              f"init from {cfg.init}: {len(missing)} encoder weights NOT loaded (left at random init): {missing[:8]}")
    return model


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA (no loss scaler needed), nothing on CPU."""
    return torch.autocast("cuda", torch.bfloat16) if cfg.amp and device.type == "cuda" else nullcontext()


# --- II. CoSMAE: data mixup, model-mixup teacher, projector g, MIM loss ------------------------------------

def draw_lambda(rng: np.random.Generator, how: str, alpha: float, value: float) -> float:
    """λ ~ Beta(α, α) (the paper), U[0, 1] or a constant (Fig. 2 ablations); one draw per step (inferred)."""
    return float(rng.beta(alpha, alpha)) if how == "beta" else float(rng.random()) if how == "uniform" else value


def mix_batch(x, x_mem, lam1: float):
    """x, x_mem: [N, 3, H, W] current and buffer images (augmented, normalised) → mixed [N, 3, H, W]."""
    # Eq. (2)  X̃_i = λ1·X_i + (1−λ1)·X_j^M
    return lam1 * x + (1 - lam1) * x_mem


class MixupTeacher:
    """The teacher ẽ_t: a frozen copy of the encoder, rebuilt in place before every step from θ_{t−1} and the
    student's current θ_t. No gradients, no new modules or tensors per step."""

    def __init__(self, student: MAE, theta_prev: dict, compile: bool = False):
        self.net = copy.deepcopy(student).requires_grad_(False).eval()
        self.encode_fn = torch.compile(self.net.encode, dynamic=False) if compile else self.net.encode
        names = [n for n, _ in student.named_parameters() if is_encoder_key(n)]
        self.theta_t = [student.get_parameter(n) for n in names]
        self.theta_prev = [theta_prev[n].to(self.theta_t[0].device) for n in names]
        self.mixed = [self.net.get_parameter(n) for n in names]

    @torch.no_grad()
    def rebuild(self, lam2: float):
        torch._foreach_copy_(self.mixed, self.theta_prev)
        # Eq. (3)  θ̃_t = λ2·θ_t + (1−λ2)·θ_{t−1}   (lerp: θ_{t−1} + λ2·(θ_t − θ_{t−1}))
        torch._foreach_lerp_(self.mixed, self.theta_t, lam2)

    @torch.no_grad()
    def encode(self, x, pool: str):
        """Teacher features c̃ of the UNMASKED mixed image: [N, 3, H, W] → [N, D]."""
        return self.encode_fn(x, pool).float()


def make_projector(dim: int, hidden: int = 128) -> nn.Module:
    """g: 2-layer MLP (hidden 128, ReLU) from the student's features c to the teacher's space."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def mim_loss(student, teacher, tau: float = 0.5, form: str = "paper"):
    """student g(c): [N, D], teacher c̃: [N, D] → scalar. S = cosine similarity. Three forms, each one change
    from the last:
    paper:   Eq. (4) as printed: for each i, −log e^{S(g_i, c̃_i)/τ} / Σ_{q≠i} e^{S(g_i, c̃_q)/τ}, and the same
             with the roles swapped, averaged over 2N: the positive is left out of each denominator (can be < 0).
    infonce: the same symmetric cross-view loss with the positive kept in each denominator (Σ over all q):
             NT-Xent between the student batch and the teacher batch, as the paper's text names it.
    simclr:  NT-Xent over the 2N embeddings [g; c̃] (each against all 2N−1 others, same-side negatives too),
             as in the authors' earlier CSMAE code."""
    z = torch.cat([F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)])  # [2N, D]
    n = student.shape[0]
    if form == "simclr":
        s = z @ z.T / tau  # [2N, 2N] similarity of all pairs
        s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=s.device), float("-inf"))  # drop self-pairs
        positive = torch.arange(2 * n, device=s.device).roll(n)  # i ↔ i + N: g(c_i) and c̃_i
        return F.cross_entropy(s, positive)
    s = z[:n] @ z[n:].T / tau  # [N, N]: S(g_i, c̃_q)/τ; row i, column q; positives on the diagonal
    if form == "paper":
        s_neg = s.masked_fill(torch.eye(n, dtype=torch.bool, device=s.device), float("-inf"))  # 1{i ≠ q}
        # Eq. (4)  L_MIM = 1/(2N) Σ_i [−log(e^{S_ii/τ}/Σ_{q≠i} e^{S_iq/τ}) − log(e^{S_ii/τ}/Σ_{q≠i} e^{S_qi/τ})]
        return (2 * -s.diagonal() + s_neg.logsumexp(dim=1) + s_neg.logsumexp(dim=0)).sum() / (2 * n)
    return (2 * -s.diagonal() + s.logsumexp(dim=1) + s.logsumexp(dim=0)).sum() / (2 * n)  # infonce


def cosmae_loss(model, projector, teacher, x, lam2: float, cfg: Config):
    """One forward of Eq. (5) on the (mixed) batch x [N, 3, H, W] → (loss, loss_rec, loss_mim)."""
    loss_rec, _, _, latent = model(x, cfg.mask_ratio)  # Eq. (1) on the masked input
    if teacher is None:  # task 1, or --no-model-mixup
        return loss_rec, loss_rec, torch.zeros_like(loss_rec)
    teacher.rebuild(lam2)  # Eq. (3), from this step's θ_t
    c_tilde = gather(teacher.encode(x, cfg.pool))  # [N, D] teacher features of the unmasked image
    c = pool_tokens(latent, cfg.pool)  # [N, D] student features of the visible tokens
    loss_mim = mim_loss(gather(projector(c)), c_tilde, cfg.tau, cfg.mim_form)  # Eq. (4), global batch
    loss = loss_rec + cfg.beta * loss_mim  # Eq. (5)  L = L_Recon + β·L_MIM
    return loss, loss_rec, loss_mim


def train_step(model, projector, teacher, opt, raw, buffer, rng, gen, cfg: Config, mixup: bool):
    """One CoSMAE step on a raw uint8 batch [B, 3, S, S] (already on the device): augment, Eq. (2) with buffer
    images (t ≥ 2), Eq. (3)-(5), AdamW. → (loss, loss_rec, loss_mim) as device tensors (no host sync), λ1, λ2."""
    img = MODELS[cfg.model]["img_size"]
    x, lam1, lam2 = augment(raw, img, gen), 1.0, 1.0
    if mixup:
        lam1 = draw_lambda(rng, cfg.lam1, cfg.alpha1, cfg.lam1_value)
        x = mix_batch(x, augment(buffer.sample(len(x), gen, x.device), img, gen), lam1)
    if teacher is not None:
        lam2 = draw_lambda(rng, cfg.lam2, cfg.alpha2, cfg.lam2_value)
    with autocast(cfg, x.device):
        losses = cosmae_loss(model, projector, teacher, x, lam2, cfg)
    opt.zero_grad(set_to_none=True)
    losses[0].backward()
    opt.step()
    return losses, lam1, lam2


# --- III-B. Training: one task, then the task sequence ----------------------------------------------------

def make_optimizer(model: nn.Module, projector: nn.Module, cfg: Config):
    """AdamW (betas 0.9/0.95 as MAE), no weight decay on biases, norms and other 1-D parameters. fused: one
    kernel for all parameters instead of hundreds of small ones (much faster on a busy CPU, usual on CUDA)."""
    params = [p for m in (model, projector) for p in m.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)


def lr_at(step: float, total: int, warmup: float, lr: float) -> float:
    """Linear warm-up over `warmup` steps, then half-cycle cosine to 0 (MAE's schedule), per iteration."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_task(t: int, name: str, tiles, model, projector, buffer, theta_prev, cfg: Config, run: "Run", baseline=None):
    """Train on task t (1-based): a fresh optimiser and schedule; data mixup and the teacher from t = 2."""
    opt = make_optimizer(model, projector, cfg)
    teacher = MixupTeacher(model, theta_prev, cfg.compile) if t > 1 and cfg.model_mixup else None
    net, proj = wrap_ddp(model), wrap_ddp(projector)  # themselves in a single process
    net = torch.compile(net, dynamic=False) if cfg.compile else net  # static shapes: a new batch size (ER) compiles anew
    step_fn = baseline.step if baseline else train_step  # the seam: a Table II baseline's own step
    mixup, spe = t > 1 and cfg.data_mixup and len(buffer) > 0, len(tiles) // cfg.batch_size  # steps per epoch
    total, start = cfg.epochs * spe, run.resume_task(t, model, projector, opt, spe)
    meter = Meter(run, t, name, total)
    for epoch in range(start, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, t, epoch])  # order, λ1, λ2: reproducible per epoch (resume)
        gen = torch.Generator(cfg.device).manual_seed(int(rng.integers(2 ** 62)))  # augmentation, buffer draws
        torch.manual_seed(int(rng.integers(2 ** 62)))  # masking noise: a resumed epoch replays exactly
        for i, raw in enumerate(batches(tiles, cfg.batch_size, rng, cfg.device)):
            step = epoch * spe + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.warmup_epochs * spe, cfg.lr)
            losses, lam1, lam2 = step_fn(net, proj, teacher, opt, raw, buffer, rng, gen, cfg, mixup)
            meter.update(step, epoch, len(raw), *losses, lam1, lam2, opt.param_groups[0]["lr"])
        if (epoch + 1) % cfg.save_every == 0 and epoch + 1 < cfg.epochs:
            run.save_last(t, epoch + 1, model, projector, opt)


def train(cfg: Config, baseline=None) -> dict:
    """The task loop of CoSMAE. baseline: None for CoSMAE (and finetune, lump), else a Table II baseline of
    baselines.py: its step replaces train_step, start_task/end_task run around each task and its state is kept
    in the task checkpoints. Returns {'checkpoints': [paths], 'eval': [rows], 'model': the MAE}."""
    data = {name: task_data(name, cfg) for name in cfg.tasks}  # read / build every cache first: fail early
    for name, tiles in data.items():
        if len(tiles) < cfg.batch_size:
            raise DataError(f"task {name}: {len(tiles)} images is less than one batch (--batch-size {cfg.batch_size})")
    run = Run(cfg)
    model = build_model(cfg).to(cfg.device)
    projector = make_projector(model.pos_embed.shape[-1], cfg.proj_hidden).to(cfg.device)
    run.start(rs_data.evaluation_sets(cfg.tasks, tile_size(cfg), cfg.ucmerced, cfg.data_root, cfg.cache_dir,
                                      cfg.treesat_resize) if cfg.eval else None)  # inputs checked: config.json now
    buffer, theta_prev, done = ReplayBuffer(cfg.memory_size), None, len(task_checkpoints(cfg.out))
    try:
        if done:  # resume: the last finished task holds the model, projector and buffer to continue from
            theta_prev = run.load_task(done, model, projector, buffer, baseline)
            print(f"resuming {cfg.out}: tasks 1..{done} already done")
        run.evaluate_missing(done, model)
        for t, name in enumerate(cfg.tasks[done:], done + 1):
            t0 = time.time()
            if baseline:
                baseline.start_task(t, model, theta_prev)
            train_task(t, name, data[name], model, projector, buffer, theta_prev, cfg, run, baseline)
            buffer.add_task(t, data[name], np.random.default_rng([cfg.seed, t, 10 ** 6]))
            if baseline:
                baseline.end_task(t, model, data[name], buffer)
            theta_prev = {k: v.detach().clone() for k, v in model.state_dict().items() if is_encoder_key(k)}
            run.save_task(t, name, model, projector, buffer, time.time() - t0, baseline)
            run.evaluate(t, name, model)
    except KeyboardInterrupt as e:
        e.args = (run.where,)
        raise
    run.finish()
    return {"checkpoints": [p for _, _, p in task_checkpoints(cfg.out)], "eval": run.eval_rows, "model": model}


# --- [boilerplate] run folder: config, metrics log, atomic writes, resume, evaluation hook ------------------

def load_checkpoint(path, fix: str = "delete it to redo that part of the run") -> dict:
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary pickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, disallowed pickle global, ...
        raise DataError(f"checkpoint {path} is corrupt or not a weights-only torch file ({type(e).__name__}: "
                        f"{str(e)[:200]}); {fix}") from None


def task_checkpoints(out) -> list:
    """Completed task checkpoints of a run folder, in task order → [(t, name, path)]."""
    found = sorted((int(p.stem[4:].split("_")[0]), p) for p in Path(out).glob("task*_*.pt"))
    return [(t, p.stem.split("_", 1)[1], p) for t, p in found]


def finite(model: nn.Module) -> bool:
    """True when every weight is finite (one host sync; called before a checkpoint is written)."""
    return bool(torch.stack(torch._foreach_norm([p.detach().float() for p in model.parameters()])).isfinite().all())


def device_tiles(tiles, device) -> torch.Tensor:
    """uint8 tiles (a numpy array, a read-only memory map: copied, or a tensor) → a tensor on `device`."""
    return (tiles if torch.is_tensor(tiles) else torch.from_numpy(np.array(tiles))).to(device)


@torch.no_grad()
def extract_features(model: MAE, tiles, cfg: Config, batch_size: int = 256) -> np.ndarray:
    """Frozen features of uint8 tiles [n, 3, S, S] (resized to the model's size, normalised, no augmentation,
    unmasked) → float32 [n, D]."""
    was_training, out = model.training, []
    model.eval()
    for i in range(0, len(tiles), batch_size):
        b = device_tiles(tiles[i:i + batch_size], cfg.device)
        with autocast(cfg, b.device):
            out.append(model.encode(augment(b, model.grid * model.p, None), cfg.pool).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


@torch.no_grad()
def reconstruct(model: MAE, tiles, cfg: Config, show: int = 2, seed: int = 0, batch_size: int = 256):
    """Eq. (1) on uint8 tiles (plain resize; masks drawn from `seed`, so every call masks the same patches) →
    (mean loss, uint8 [H, 3·show·W, 3] picture of the first `show` tiles: original | masked | reconstruction)."""
    total, panel, was_training, dev = 0.0, None, model.training, torch.device(cfg.device)
    model.eval()
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(tiles), batch_size):
            x = augment(device_tiles(tiles[i:i + batch_size], dev), model.grid * model.p, None)
            with autocast(cfg, dev):
                loss, pred, mask, _ = model(x, cfg.mask_ratio)
            total += float(loss) * len(x)
            panel = panel if panel is not None else picture(model, x[:show], pred[:show].float(), mask[:show])
    model.train(was_training)
    return total / len(tiles), panel


def picture(model: MAE, x, pred, mask) -> np.ndarray:
    """MAE's visualisation: original, masked input, reconstruction with the visible patches pasted back, side
    by side → uint8 [H, 3·N·W, 3]. x [N, 3, H, W] normalised, pred [N, L, p²·3], mask [N, L]."""
    patches, mask = model.patchify(x), mask[..., None]
    if model.norm_pix_loss:  # the prediction is in per-patch normalised units: undo it with the patch's statistics
        pred = pred * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
    views = [x, model.unpatchify(patches * (1 - mask)), model.unpatchify(patches * (1 - mask) + pred * mask)]
    img = torch.cat([v for triple in zip(*views) for v in triple], 2) * STD[0].to(x.device) + MEAN[0].to(x.device)
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


class Run:
    """Everything a run writes under cfg.out (config.json, summary.json, eval.json, metrics.jsonl, checkpoints,
    pictures; under torchrun only rank 0 writes). Resume = rerun the same command with the same --out."""

    def __init__(self, cfg: Config):
        self.cfg, self.out, self.main, self.at = cfg, Path(cfg.out), DIST["rank"] == 0, None
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {self.out} is a file; name a folder")
        self.conf, old = dataclasses.asdict(cfg), self.read("config.json", None)
        if old is not None:  # a resume: the same training; paths, device, logging, evaluation may change
            diff = {k: (old.get(k), v) for k, v in self.conf.items()
                    if k not in eval_mlknn.NOT_TRAINING and old.get(k) != v}
            if diff:
                raise DataError(f"{self.out} holds a run with other settings {diff} (old, new); use another --out, "
                                "or the same flags to resume it")
        self.summary = self.read("summary.json", dict(method=cfg.method, seed=cfg.seed, tasks=cfg.tasks,
                                                      completed=0, train_seconds=0.0))
        self.eval_rows, self.evaldata = self.read("eval.json", []), None
        self.source = "UCMerced (800 test images)" if cfg.ucmerced else "the synthetic multi-label set"

    @property
    def where(self) -> str:
        """Where the run is, for the messages of a stop: set by the meter (every step) and the evaluation."""
        if self.at is None or isinstance(self.at, str):
            return self.at or "before task 1"
        t, name, epoch, step = self.at
        return f"in task {t} ({name}), epoch {epoch + 1}, step {step + 1}"

    def start(self, evaldata):
        """Every input has been read and checked: write config.json (the run exists from now on)."""
        self.evaldata = evaldata
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.write("config.json", self.conf)
        if self.main:
            print("config: " + " ".join(f"{k}={v}" for k, v in self.conf.items()))

    def read(self, name, default):
        path = self.out / name
        try:
            return json.loads(path.read_text()) if path.exists() else default
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is corrupt ({e}); delete it (and rerun) or use another --out") from None

    def write(self, name, obj):
        if self.main:
            atomic_write(self.out / name, lambda p: p.write_text(json.dumps(obj, indent=1)))

    def save(self, path: Path, model: nn.Module, **state):
        """A checkpoint of finite weights only: non-finite ones stop the run and keep the last good files."""
        if not finite(model):
            raise DataError(f"the weights became non-finite (NaN/inf) {self.where}: stopped without saving them; every "
                            "checkpoint written so far is finite and kept. Lower --lr (or check the data) and start "
                            "again with another --out")
        if self.main:
            atomic_write(path, lambda p: torch.save(dict(model=model.state_dict(), **state), p))

    def save_task(self, t, name, model, projector, buffer, seconds, baseline=None):
        """After task t: everything the next task needs, atomically; the mid-task checkpoint is then stale."""
        sd = model.state_dict()
        self.save(self.out / f"task{t}_{name}.pt", model, task=t, name=name, projector=projector.state_dict(),
                  buffer=buffer.state_dict(), encoder={k: v for k, v in sd.items() if is_encoder_key(k)},
                  baseline=baseline.state_dict() if baseline else {})
        if self.main:
            (self.out / "last.pt").unlink(missing_ok=True)
        self.summary.update(completed=t, train_seconds=self.summary["train_seconds"] + seconds, world=DIST["world"])
        self.write("summary.json", self.summary)

    def load_task(self, t, model, projector, buffer, baseline=None) -> dict:
        """Load the checkpoint of finished task t → its encoder weights (θ_{t−1} for the next task)."""
        ck = load_checkpoint(task_checkpoints(self.out)[t - 1][2])
        model.load_state_dict(ck["model"])
        projector.load_state_dict(ck["projector"])
        buffer.load_state_dict(ck["buffer"])
        if baseline:
            baseline.load_state_dict(ck["baseline"])
        return {k: v.to(self.cfg.device) for k, v in ck["encoder"].items()}

    def save_last(self, t, epoch, model, projector, opt):
        self.save(self.out / "last.pt", model, task=t, epoch=epoch, projector=projector.state_dict(), opt=opt.state_dict())

    def resume_task(self, t, model, projector, opt, steps_per_epoch: int) -> int:
        """The first epoch to run of task t: 0, or the epoch after the last mid-task checkpoint."""
        ck = load_checkpoint(self.out / "last.pt") if (self.out / "last.pt").exists() else {}
        start = int(ck["epoch"]) if ck.get("task") == t else 0
        if start:
            model.load_state_dict(ck["model"])
            projector.load_state_dict(ck["projector"])
            opt.load_state_dict(ck["opt"])
            print(f"resuming task {t} after epoch {start}")
        self.trim_metrics(t, start * steps_per_epoch)
        return start

    def trim_metrics(self, t: int, steps_done: int):
        """Drop the metrics.jsonl records of the steps of task t (and later) that this run replays: after a
        resume every step is logged once."""
        path = self.out / "metrics.jsonl"
        if not self.main or not path.exists():
            return
        keep = []
        for ln in path.read_text().splitlines():
            try:
                r = json.loads(ln)
            except json.JSONDecodeError:  # the torn last record of a crash mid-write
                continue
            if r["task"] < t or (r["task"] == t and r["step"] <= steps_done):
                keep.append(ln)
        atomic_write(path, lambda p: p.write_text("".join(ln + "\n" for ln in keep)))

    def evaluate(self, t: int, name: str, model: MAE):
        """After task t (0: the random init): eval_mlknn's row (ML-kNN of both mAP kinds, A[t][·], R[t][·]) into
        eval.json, and the picture of the masked reconstructions of every task."""
        if not self.main or self.evaldata is None:
            return
        t0, self.at = time.time(), f"while evaluating after task {t}"
        row, panels = eval_mlknn.evaluation_row(self.evaldata, lambda x: extract_features(model, x, self.cfg),
                                                lambda x: reconstruct(model, x, self.cfg), self.cfg.mlknn_count_self)
        row = dict(task=t, name=name, eval_set=self.source, **row)
        eval_mlknn.save_picture(self.out / f"reconstructions_T{t}.png", panels)
        self.eval_rows = sorted([x for x in self.eval_rows if x["task"] != t] + [row], key=lambda x: x["task"])
        self.write("eval.json", self.eval_rows)
        print(f"eval after {name} ({time.time() - t0:.0f}s): {eval_mlknn.row_line(row)}", flush=True)

    def evaluate_missing(self, done: int, model: MAE):
        """Evaluate the random init and finished tasks 1..done that have no row on this evaluation set (a resume
        after a crash in an evaluation, or a finished run rerun with --eval or another --ucmerced)."""
        rows = {r["task"] for r in self.eval_rows if r.get("eval_set") == self.source and "rec_loss" in r}
        names = ["init"] + [n for _, n, _ in task_checkpoints(self.out)]
        for t in [t for t in range(done + 1) if t not in rows] if self.evaldata else []:
            m = model if t == done else build_model(self.cfg).to(self.cfg.device)  # built: the random init
            if t < done and t:
                m.load_state_dict(load_checkpoint(task_checkpoints(self.out)[t - 1][2])["model"])
            self.evaluate(t, names[t], m)

    def finish(self):
        """Tables at the end of a run; final average mAP, forgetting and BWT into summary.json."""
        run = dict(label=self.cfg.method, tasks=self.cfg.tasks, rows=self.eval_rows,
                   train_seconds=self.summary["train_seconds"])
        if self.eval_rows and self.main:
            print(eval_mlknn.report([run], self.source))
            print(f"\npictures of the masked reconstructions after each task: {self.out}/reconstructions_T*.png")
        if eval_mlknn.has_matrix(run):
            self.summary.update(eval_mlknn.forgetting_bwt([r["per_task"] for r in self.eval_rows]))
            self.write("summary.json", self.summary)


class Meter:
    """Progress lines and metrics.jsonl records every cfg.log_every steps. Losses stay on the device between
    log points: the only host syncs are the .tolist() at a log point, where a non-finite loss stops the run."""

    def __init__(self, run: Run, t, name, total):
        self.run, self.cfg, self.t, self.name, self.total = run, run.cfg, t, name, total
        self.sums, self.n, self.imgs, self.t0 = None, 0, 0, time.time()

    def update(self, step, epoch, n_img, loss, loss_rec, loss_mim, lam1, lam2, lr):
        vals = torch.stack([loss.detach().float(), loss_rec.detach().float(), loss_mim.detach().float()])
        self.sums = vals if self.sums is None else self.sums + vals
        self.n, self.imgs = self.n + 1, self.imgs + n_img
        self.run.at = (self.t, self.name, epoch, step)  # formatted only when a message needs it
        if (step + 1) % self.cfg.log_every and step + 1 != self.total:
            return
        total, rec, mim = (all_mean(self.sums) / self.n).tolist()  # every rank joins the all-reduce
        if not all(map(math.isfinite, (total, rec, mim))):
            raise DataError(f"non-finite loss (total {total}, rec {rec}, mim {mim}) {self.run.where}: stopped; every "
                            "checkpoint written so far is finite and kept. Lower --lr (or check the data) and start "
                            "again with another --out")
        rate = self.imgs * DIST["world"] / (time.time() - self.t0)
        self.sums, self.n, self.imgs, self.t0 = None, 0, 0, time.time()
        if not self.run.main:
            return
        eta = (self.total - step - 1) * self.cfg.batch_size / rate
        with open(self.run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"task": self.t, "name": self.name, "epoch": epoch, "step": step + 1, "loss/total": total,
                                "loss/rec": rec, "loss/mim": mim, "lam1": lam1, "lam2": lam2, "lr": lr,
                                "img/s": rate}) + "\n")
        print(f"task {self.t} {self.name} | ep {epoch + 1}/{self.cfg.epochs} | step {step + 1}/{self.total} | "
              f"loss {total:.4f} rec {rec:.4f} mim {mim:.4f} | λ1 {lam1:.2f} λ2 {lam2:.2f} | lr {lr:.2e} | "
              f"{rate:.1f} img/s | ETA task {eta / 60:.1f} min", flush=True)


# --- [multi-GPU] torchrun + DistributedDataParallel; everything here is the identity in a single process -----
# `torchrun --nproc_per_node=W cosmae.py ...`: each rank trains on its B/W rows of the same global batch B.
# All random draws (augmentation, masking, buffer) are drawn for the global batch and sliced, λ1/λ2 come from
# the same seeded generator on every rank, and Eq. (4) is computed over the gathered global batch: the run
# does not depend on W (up to float summation order). Only rank 0 writes files.
DIST = dict(rank=0, world=1)


def setup_distributed(cfg: Config):
    if "RANK" not in os.environ:
        return
    import torch.distributed as dist
    cuda = cfg.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    DIST.update(rank=dist.get_rank(), world=dist.get_world_size())
    if cuda:
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(cfg.device)
    if cfg.batch_size % DIST["world"]:
        raise DataError(f"--batch-size {cfg.batch_size} is not divisible by the {DIST['world']} processes")


def shard_rand(shape, gen, device):
    """torch.rand(shape) drawn for the global batch (shape[0]·W rows), this rank's rows."""
    n, (r, w) = shape[0], (DIST["rank"], DIST["world"])
    return torch.rand((n * w, *shape[1:]), generator=gen, device=device)[r * n:(r + 1) * n]


def gather(x):
    """[n, D] per rank → [n·W, D] in rank order, with gradient (autograd-aware all_gather)."""
    if DIST["world"] == 1:
        return x
    import torch.distributed.nn.functional as dist_nn
    return torch.cat(dist_nn.all_gather(x.contiguous()))


def all_mean(x):
    """Mean of a tensor over the ranks (logging, EWC's Fisher)."""
    if DIST["world"] > 1:
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x)
        x /= DIST["world"]
    return x


def wrap_ddp(module: nn.Module) -> nn.Module:
    if DIST["world"] == 1:
        return module
    dev = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None)


# --- main ---------------------------------------------------------------------------------------------------

def main(argv=None, config_cls=Config, resolve_fn=resolve, make_baseline=None) -> None:
    """Parse, resolve and check the flags, then one run per seed. A bad input is one line and exit 2; Ctrl-C
    says where the run stopped and exits 130 (finished tasks and the last mid-task checkpoint are kept)."""
    try:
        cfg = resolve_fn(parse_args(argv, config_cls))
        setup_distributed(cfg)
        for seed in cfg.seeds or [cfg.seed]:  # --seeds: one run per seed, OUT/seed<s>
            out = os.path.join(cfg.out, f"seed{seed}") if cfg.seeds else cfg.out
            run_cfg = dataclasses.replace(cfg, seed=seed, seeds=[], out=out)
            train(run_cfg, make_baseline(run_cfg) if make_baseline else None)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        where = e.args[0] if e.args else "while reading the data"
        print(f"\ninterrupted {where}. Finished tasks and the last mid-task checkpoint (every --save-every epochs) "
              "are kept: rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
