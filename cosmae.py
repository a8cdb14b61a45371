"""CoSMAE: continual self-supervised learning with masked autoencoders for remote sensing.

L. Möllenbrok, B. Rasti, B. Demir, "Masked Autoencoders in Continual Self-Supervised Learning for Remote
Sensing", IEEE GRSL, arXiv:2506.21312. Official code: https://git.tu-berlin.de/rsim/CoSMAE (announced in
the paper, not available to us and NOT consulted: everything here is written from the paper's text).

Method. A ViT MAE f = (e, d) learns the tasks T_1..T_T one after another. From task 2 on, two regularisers
fight forgetting: (i) data mixup, Eq. (2): each image is mixed with a random image of a small memory buffer
of past tasks; (ii) model-mixup knowledge distillation, Eq. (3)-(4): a teacher whose weights interpolate the
previous encoder θ_{t−1} and the current one θ_t encodes the unmasked mixed image, and the student's
projected features g(c) are pulled to the teacher's c̃ with a symmetric temperature-scaled cross-entropy.
After each task the frozen encoder is scored by ML-kNN on UCMerced (eval_mlknn.py).

Index of equations → code (grep "Eq. (" to find each tag at the line that computes it):
    Eq. (1) masked-patch MSE          → MAE.forward_loss
    Eq. (2) data mixup                → mix_batch          (memory buffer: ReplayBuffer)
    Eq. (3) model-mixup teacher       → MixupTeacher.rebuild
    Eq. (4) MIM loss                  → mim_loss           (projector g: make_projector)
    Eq. (5) total loss                → cosmae_loss

Notation: N batch, L patches, D width, p patch size, H×W image; λ1 = lam1, λ2 = lam2, τ = tau, β = beta,
θ_{t−1} = theta_prev; mask convention as in MAE: 1 = removed, 0 = kept.

Run:
    python cosmae.py                                   # tiny CPU run on 4 synthetic RS-like tasks (~5 min)
    python cosmae.py --tasks us3d uavid potsdam treesat --data-root DATA --ucmerced DATA/UCMerced_LandUse
    python eval_mlknn.py runs/cosmae                   # ML-kNN table of every per-task checkpoint
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

from rs_data import DATA_SEED, REAL_TASKS, SYNTH_DOMAINS, DataError, synth_tiles, task_tiles


# --- Configuration ---------------------------------------------------------------------------------------

METHODS = ("cosmae", "finetune", "er", "ewc", "der", "lump", "pfr")


def arg(default, help, **kw):
    """A Config field whose --help text is `help` (the CLI below is built from the fields)."""
    return field(default_factory=lambda: copy.copy(default), metadata=dict(help=help, **kw))


@dataclass
class Config:
    # experiment
    method: str = arg("cosmae", "cosmae, or a Table II baseline: finetune er ewc der lump pfr", choices=METHODS)
    tasks: list = arg(["synth_city", "synth_farm", "synth_forest", "synth_coast"],
                      "task sequence T_1..T_T: synthetic domains (default) or us3d uavid potsdam treesat")
    data_root: str = arg("data", "folder holding the real datasets (README: 'Data layout')")
    ucmerced: str = arg("", "UCMerced_LandUse folder: evaluate on it after each task (else synthetic eval set)")
    out: str = arg("runs/cosmae", "run folder: config.json, metrics.jsonl, task checkpoints; rerun to resume")
    seed: int = arg(0, "seed of model init, data order, augmentation, buffer and λ draws")
    seeds: list = arg([], "several seeds: one run each under OUT/seed<s> (the paper averages 3)")
    device: str = arg("auto", "auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    eval: bool = arg(True, "ML-kNN evaluation before task 1 and after every task")
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
    mim_form: str = arg("paper", "Eq. (4) as printed, or SimCLR NT-Xent over 2N (CSMAE code)",
                        choices=["paper", "simclr"])
    proj_hidden: int = arg(128, "hidden width of the 2-layer projector g (paper §III-B)")
    memory_size: int = arg(1000, "M, images in the memory buffer (paper §III-B)")
    # optimisation (paper §III-B)
    epochs: int = arg(0, "epochs per task (paper 300; 0 = by preset)")
    batch_size: int = arg(0, "images per step (paper 128; 0 = by preset)")
    lr: float = arg(1e-3, "AdamW learning rate (paper §III-B)")
    weight_decay: float = arg(0.05, "AdamW weight decay (MAE's value; the paper does not say)")
    warmup_epochs: float = arg(-1.0, "linear warm-up epochs, then cosine (paper 10; -1 = by preset)")
    amp: bool = arg(True, "bf16 autocast on CUDA (ignored on CPU)")
    compile: bool = arg(False, "torch.compile the MAE and the teacher's encoder")
    # baselines of Table II (paper §III-D; defaults and sources in README)
    replay_batch: int = arg(0, "ER and DER: buffer images per step (0 = batch size, as LUMP's code)")
    ewc_lambda: float = arg(100.0, "EWC: penalty weight λ_EWC (not given in the paper; not tuned)")
    ewc_batches: int = arg(16, "EWC: batches used to estimate the diagonal Fisher after each task")
    der_alpha: float = arg(0.1, "DER: weight of the feature-replay MSE (LUMP's DER default)")
    pfr_weight: float = arg(1.0, "PFR: weight of the cosine regulariser (not given in the paper)")
    synth_train: int = arg(1024, "training images per synthetic task")


MODELS = {  # encoder width/depth/heads, decoder width/depth/heads, image and patch size
    "vit_base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_tiny": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                     decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=3),
    "vit_test": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
}
PRESETS = {  # the paper's for real data; a few-minute CPU run for synthetic (why norm_pix: README, "Synthetic data")
    "paper": dict(model="vit_base", epochs=300, batch_size=128, warmup_epochs=10, norm_pix_loss=False),
    "synthetic": dict(model="vit_tiny", epochs=16, batch_size=32, warmup_epochs=1, norm_pix_loss=True),
}


def parse_args(argv=None) -> Config:
    """argparse built from the Config fields: `--help` shows each field's text and default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Config):
        default, meta = f.default_factory(), dict(f.metadata)
        kw = dict(default=default, help=f"{meta.pop('help')} [default: {default}]", **meta)
        if "bool" in f.type:
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw.update(nargs="+", type=int if f.name == "seeds" else str)
        else:
            kw["type"] = type(default)
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return resolve(Config(**vars(p.parse_args(argv))))


def resolve(cfg: Config) -> Config:
    """Fill the preset-dependent fields once, right after parsing; check task names early."""
    unknown = [t for t in cfg.tasks if t not in SYNTH_DOMAINS and t not in REAL_TASKS]
    if unknown:
        raise DataError(f"unknown task name(s) {unknown}; known: real {list(REAL_TASKS)}, "
                        f"synthetic {list(SYNTH_DOMAINS)}")
    preset = PRESETS["synthetic" if all(t in SYNTH_DOMAINS for t in cfg.tasks) else "paper"]
    unset = dict(model="", epochs=0, batch_size=0, warmup_epochs=-1.0, norm_pix_loss=None)  # = "by preset"
    for k, v in preset.items():
        if getattr(cfg, k) == unset[k]:
            setattr(cfg, k, v)
    if cfg.model not in MODELS:
        raise DataError(f"unknown --model {cfg.model!r}; known: {list(MODELS)}")
    if cfg.method != "cosmae":  # a Table II baseline: its own switches (III-D), not the ablation flags
        cfg.data_mixup, cfg.model_mixup = cfg.method == "lump", cfg.method == "pfr"
        if cfg.method == "pfr":  # PFR's teacher is the frozen old encoder e_{t−1}: Eq. (3) with λ2 = 0
            cfg.lam2, cfg.lam2_value = "constant", 0.0
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


# --- III-A. Data: task stream, augmentation, memory buffer ------------------------------------------------
# Every task is an array of raw uint8 tiles [n, 3, S, S] (rs_data.py: the synthetic default, or the real
# datasets through a memory-mapped tile cache). Batches of raw tiles go to the device and are augmented
# there, so the buffer can store raw tiles and augment them afresh each time they are drawn.

def tile_size(cfg: Config) -> int:
    """Raw tile side S: 256 for the real datasets; for synthetic tasks the same S/img ratio as 256/224."""
    return 256 if cfg.tasks[0] in REAL_TASKS else round(MODELS[cfg.model]["img_size"] * 256 / 224)


def task_data(name: str, cfg: Config) -> np.ndarray:
    """uint8 [n, 3, S, S] training tiles of one task."""
    if name in SYNTH_DOMAINS:
        return synth_tiles(name, cfg.synth_train, tile_size(cfg), DATA_SEED)[0]
    return task_tiles(name, cfg.data_root, "train", Path(cfg.data_root) / ".cosmae_cache", DATA_SEED)


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
        self.size, self.tiles = size, {}  # tiles: {task index: uint8 [m, 3, S, S]} in random order
        self.feats = {}  # DER only: {task index: float [m, D]} encoder features at storage time

    def add_task(self, t: int, tiles, rng: np.random.Generator):
        """After task t: keep the first ⌊M/t⌋ of every stored (randomly ordered) task, add ⌊M/t⌋ of task t."""
        per = self.size // t
        self.tiles = {k: v[:per] for k, v in self.tiles.items()}
        self.feats = {k: v[:per] for k, v in self.feats.items()}
        chosen = np.asarray(tiles[np.sort(rng.choice(len(tiles), min(per, len(tiles)), replace=False))])
        self.tiles[t] = torch.from_numpy(chosen[rng.permutation(len(chosen))])  # random order: every prefix
        self._flat = None  # is again a uniform sample

    def __len__(self):
        return sum(len(v) for v in self.tiles.values())

    def sample(self, n: int, gen: torch.Generator, device, with_feats: bool = False):
        """n tiles drawn uniformly with replacement → uint8 [n, 3, S, S] on `device` (and their stored
        features [n, D] if with_feats)."""
        if self._flat is None or self._flat.device != torch.device(device):
            self._flat = torch.cat(list(self.tiles.values())).to(device)
        idx = (shard_rand((n,), gen, gen.device) * len(self._flat)).long().to(device)  # uniform, with replacement
        if not with_feats:
            return self._flat[idx]
        return self._flat[idx], torch.cat(list(self.feats.values())).to(device)[idx]

    def state_dict(self) -> dict:
        return {**{f"task{k}": v for k, v in self.tiles.items()}, **{f"feats{k}": v for k, v in self.feats.items()}}

    def load_state_dict(self, sd: dict):
        self.tiles = {int(k[4:]): v for k, v in sd.items() if k.startswith("task")}
        self.feats, self._flat = {int(k[5:]): v for k, v in sd.items() if k.startswith("feats")}, None


def batches(tiles, batch_size: int, rng: np.random.Generator, device):
    """One epoch of raw uint8 batches [B, 3, S, S] on `device` (shuffled, drop_last). The next batch is read
    (memory-mapped cache → pinned memory) in a background thread while the current one trains. Under torchrun
    each rank gets its rows [rank·B/W, (rank+1)·B/W) of the same global batch."""
    from concurrent.futures import ThreadPoolExecutor
    order, pin = rng.permutation(len(tiles)), torch.device(device).type == "cuda"
    share = slice(DIST["rank"] * batch_size // DIST["world"], (DIST["rank"] + 1) * batch_size // DIST["world"])

    def read(i):
        rows = np.sort(order[i * batch_size:(i + 1) * batch_size])[share]
        b = torch.from_numpy(np.ascontiguousarray(tiles[rows]))
        return b.pin_memory() if pin else b

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(read, 0)
        for i in range(len(tiles) // batch_size):
            cur, nxt = nxt.result(), pool.submit(read, i + 1) if i + 1 < len(tiles) // batch_size else None
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
        num_patches = self.grid ** 2
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
        assert self.pos_embed.shape[1] == num_patches + 1
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
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio)
        else:
            mask, ids_restore = None, None
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

    def forward_loss(self, imgs, pred, mask):
        """imgs [N, 3, H, W], pred [N, L, p²·3], mask [N, L] → scalar."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        # Eq. (1)  L_Recon = 1/N_r Σ_k ‖X_k − X̂_k‖²  over the masked patches (MSE per patch, as MAE)
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L], mean loss per patch
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
        sd = load_checkpoint(cfg.init)
        sd = sd.get("model", sd)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise DataError(f"--init {cfg.init}: weights do not fit --model {cfg.model} ({e})") from None
        print(f"init from {cfg.init}: {len(missing)} missing, {len(unexpected)} unexpected keys "
              f"{(missing + unexpected)[:6]}")
    return model


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
        self.encode_fn = torch.compile(self.net.encode) if compile else self.net.encode
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
    """student g(c): [N, D], teacher c̃: [N, D] → scalar.
    paper:  Eq. (4) as printed: for each i, −log e^{S(g_i, c̃_i)/τ} / Σ_{q≠i} e^{S(g_i, c̃_q)/τ} and the same
            with the roles swapped, averaged over 2N (the positive is excluded from the denominator).
    simclr: NT-Xent over the 2N embeddings [g; c̃] (only self-similarity excluded), as in CSMAE's code."""
    z = torch.cat([F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)])  # [2N, D]
    n = student.shape[0]
    if form == "paper":
        s = z[:n] @ z[n:].T / tau  # [N, N]: S(g_i, c̃_q)/τ; row i, column q; positives on the diagonal
        eye = torch.eye(n, dtype=torch.bool, device=s.device)
        neg = s.masked_fill(eye, float("-inf"))  # 1{i ≠ q}
        # Eq. (4)  L_MIM = 1/(2|B|) Σ_i [−log(e^{S_ii/τ}/Σ_{q≠i} e^{S_iq/τ}) − log(e^{S_ii/τ}/Σ_{q≠i} e^{S_qi/τ})]
        return (2 * -s.diagonal() + neg.logsumexp(dim=1) + neg.logsumexp(dim=0)).sum() / (2 * n)
    s = z @ z.T / tau  # [2N, 2N] similarity of all pairs
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=s.device), float("-inf"))  # drop self-pairs
    positive = torch.arange(2 * n, device=s.device).roll(n)  # i ↔ i + N: g(c_i) and c̃_i
    return F.cross_entropy(s, positive)


def cosmae_loss(model, projector, teacher, x, lam2: float, cfg: Config):
    """One forward of Eq. (5) on the (mixed) batch x [N, 3, H, W] → (loss, loss_rec, loss_mim)."""
    loss_rec, _, _, latent = model(x, cfg.mask_ratio)  # Eq. (1) on the masked input
    if teacher is None:  # task 1, or --no-model-mixup
        return loss_rec, loss_rec, torch.zeros_like(loss_rec)
    teacher.rebuild(lam2)  # Eq. (3), from this step's θ_t
    c_tilde = gather(teacher.encode(x, cfg.pool))  # [N, D] teacher features of the unmasked image
    c = pool_tokens(latent, cfg.pool)  # [N, D] student features of the visible tokens
    if cfg.method == "pfr":  # Table II baseline: same teacher with λ2 = 0 (= e_{t−1}), PFR's cosine loss
        loss_pfr = pfr_loss(gather(projector(c)), c_tilde)
        return loss_rec + cfg.pfr_weight * loss_pfr, loss_rec, loss_pfr
    loss_mim = mim_loss(gather(projector(c)), c_tilde, cfg.tau, cfg.mim_form)  # Eq. (4), global batch
    loss = loss_rec + cfg.beta * loss_mim  # Eq. (5)  L = L_Recon + β·L_MIM
    return loss, loss_rec, loss_mim


# --- III-D. Baselines of Table II: the same MAE, buffer, projector and teacher, other regularisers ---------
# finetune: Eq. (1) alone, task after task.  lump: data mixup only (Eq. (2), LUMP [8]).  Both are switches
# of resolve(). er, ewc, der and pfr add one term each to Eq. (1), below; train_step calls baseline_loss.

def pfr_loss(p, z_old):
    """PFR [9]: 1 − cos(g(c), e_{t−1}(x)), batch mean. p, z_old: [N, D] → scalar."""
    return 1 - F.cosine_similarity(p.float(), z_old.float(), dim=1).mean()


class EWC:
    """EWC [7] on the MAE loss, online form (one accumulated Fisher, anchor θ* = weights after the last task,
    inferred): after each task F += mean over batches of (∂L_Recon/∂θ)²; penalty λ/2 · Σ F·(θ − θ*)²."""

    def __init__(self):
        self.fisher, self.anchor = {}, {}

    def penalty(self, model):
        return sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
                   for n, p in model.named_parameters() if n in self.fisher)

    def update(self, model, tiles, cfg: Config):
        rng = np.random.default_rng([cfg.seed, 777])
        gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sq, nb = {n: torch.zeros_like(p) for n, p in params.items()}, 0
        for raw in batches(tiles, cfg.batch_size, rng, cfg.device):
            model.zero_grad(set_to_none=True)
            model(augment(raw, MODELS[cfg.model]["img_size"], gen), cfg.mask_ratio)[0].backward()
            torch._foreach_addcmul_(list(sq.values()), [p.grad for p in params.values()],
                                    [p.grad for p in params.values()])
            nb += 1
            if nb == cfg.ewc_batches:
                break
        model.zero_grad(set_to_none=True)
        self.fisher = {n: self.fisher.get(n, 0) + all_mean(v) / nb for n, v in sq.items()}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}

    def state_dict(self):
        return {**{"fisher." + n: v for n, v in self.fisher.items()}, **{"anchor." + n: v for n, v in self.anchor.items()}}

    def load_state_dict(self, sd):
        self.fisher = {k[7:]: v for k, v in sd.items() if k.startswith("fisher.")}
        self.anchor = {k[7:]: v for k, v in sd.items() if k.startswith("anchor.")}


def baseline_loss(model, buffer, ewc, gen, cfg: Config):
    """The extra term of ewc and der (None for the other methods, and on task 1)."""
    if cfg.method == "ewc" and ewc.fisher:
        return cfg.ewc_lambda / 2 * ewc.penalty(model)
    if cfg.method == "der" and buffer.feats:  # DER [11] as LUMP adapts it: replay stored encoder features
        raw, feats = buffer.sample(cfg.replay_batch or cfg.batch_size, gen, gen.device, with_feats=True)
        x = augment(raw, MODELS[cfg.model]["img_size"], None)  # the same plain view as at storage time
        return cfg.der_alpha * F.mse_loss(model.encode(x, cfg.pool).float(), feats)
    return None


def end_task_baselines(t, model, tiles, buffer, ewc, cfg: Config):
    """After task t (the buffer already holds it): DER stores features, EWC estimates the Fisher."""
    if cfg.method == "der":
        buffer.feats[t] = torch.from_numpy(extract_features(model, buffer.tiles[t], cfg))
    if cfg.method == "ewc":
        ewc.update(model, tiles, cfg)


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


def train_step(model, projector, teacher, opt, raw, buffer, rng, gen, cfg: Config, mixup: bool, ewc=None):
    """One optimisation step on a raw uint8 batch [B, 3, S, S] (already on the device).
    → (loss, loss_rec, loss_mim or the baseline's term) as device tensors (no host sync), λ1, λ2."""
    img = MODELS[cfg.model]["img_size"]
    if cfg.method == "er" and len(buffer):  # ER [19]: buffer images join the batch
        raw = torch.cat([raw, buffer.sample(cfg.replay_batch or len(raw), gen, raw.device)])
    x, lam1, lam2 = augment(raw, img, gen), 1.0, 1.0
    if mixup:
        lam1 = draw_lambda(rng, cfg.lam1, cfg.alpha1, cfg.lam1_value)
        x = mix_batch(x, augment(buffer.sample(len(x), gen, x.device), img, gen), lam1)
    if teacher is not None:
        lam2 = draw_lambda(rng, cfg.lam2, cfg.alpha2, cfg.lam2_value)
    amp = cfg.amp and x.device.type == "cuda"
    with torch.autocast("cuda", torch.bfloat16) if amp else nullcontext():
        losses = cosmae_loss(model, projector, teacher, x, lam2, cfg)
        extra = baseline_loss(getattr(model, "module", model), buffer, ewc, gen, cfg)
        if extra is not None:
            losses = (losses[0] + extra, losses[1], extra)
    opt.zero_grad(set_to_none=True)
    losses[0].backward()
    opt.step()
    return losses, lam1, lam2


def train_task(t: int, name: str, tiles, model, projector, buffer, theta_prev, cfg: Config, run: "Run", ewc=None):
    """Train on task t (1-based): a fresh optimiser and schedule; data mixup and the teacher from t = 2."""
    opt = make_optimizer(model, projector, cfg)
    teacher = MixupTeacher(model, theta_prev, cfg.compile) if t > 1 and cfg.model_mixup else None
    net, proj = wrap_ddp(model), wrap_ddp(projector)  # themselves in a single process
    net = torch.compile(net) if cfg.compile else net
    mixup = t > 1 and cfg.data_mixup and len(buffer) > 0
    spe = len(tiles) // cfg.batch_size  # steps per epoch
    if spe == 0:
        raise DataError(f"task {name}: {len(tiles)} images is less than one batch of {cfg.batch_size}")
    total, start = cfg.epochs * spe, run.resume_task(t, model, projector, opt)
    meter = run.meter(t, name, total)
    for epoch in range(start, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, t, epoch])  # order, λ1, λ2: reproducible per epoch (resume)
        gen = torch.Generator(cfg.device).manual_seed(int(rng.integers(2 ** 62)))  # augmentation, buffer draws
        torch.manual_seed(int(rng.integers(2 ** 62)))  # masking noise: a resumed epoch replays exactly
        for i, raw in enumerate(batches(tiles, cfg.batch_size, rng, cfg.device)):
            step = epoch * spe + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.warmup_epochs * spe, cfg.lr)
            losses, lam1, lam2 = train_step(net, proj, teacher, opt, raw, buffer, rng, gen, cfg, mixup, ewc)
            meter.update(step, epoch, len(raw), *losses, lam1, lam2, opt.param_groups[0]["lr"])
        if (epoch + 1) % cfg.save_every == 0 and epoch + 1 < cfg.epochs:
            run.save_last(t, epoch + 1, model, projector, opt)


def train(cfg: Config) -> dict:
    """The task loop of CoSMAE. Returns {'checkpoints': [paths], 'eval': [rows], 'model': the MAE}."""
    data = {name: task_data(name, cfg) for name in cfg.tasks}  # read / build every cache first: fail early
    run = Run(cfg)
    model = build_model(cfg).to(cfg.device)
    projector = make_projector(model.pos_embed.shape[-1], cfg.proj_hidden).to(cfg.device)
    buffer, theta_prev, ewc = ReplayBuffer(cfg.memory_size), None, EWC() if cfg.method == "ewc" else None
    done = run.completed_tasks()
    if done:  # resume: the last finished task holds the model, projector and buffer to continue from
        theta_prev = run.load_task(done, model, projector, buffer, ewc)
        print(f"resuming {cfg.out}: tasks 1..{done} already done")
    elif cfg.eval:
        run.evaluate(0, "init", model)  # the random-init floor of every table
    for t, name in enumerate(cfg.tasks, 1):
        if t <= done:
            continue
        t0 = time.time()
        train_task(t, name, data[name], model, projector, buffer, theta_prev, cfg, run, ewc)
        buffer.add_task(t, data[name], np.random.default_rng([cfg.seed, t, 10 ** 6]))
        end_task_baselines(t, model, data[name], buffer, ewc, cfg)
        theta_prev = {k: v.detach().clone() for k, v in model.state_dict().items() if is_encoder_key(k)}
        run.save_task(t, name, model, projector, buffer, time.time() - t0, ewc)
        if cfg.eval:
            run.evaluate(t, name, model)
    run.print_table()
    return {"checkpoints": [p for _, _, p in task_checkpoints(cfg.out)], "eval": run.eval_rows, "model": model}


# --- [boilerplate] run folder: config, metrics log, atomic checkpoints, resume, evaluation hook -------------

def atomic_save(obj, path: Path):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary pickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, disallowed pickle global, ...
        raise DataError(f"checkpoint {path} is corrupt or not a weights-only torch file ({type(e).__name__}: "
                        f"{str(e)[:200]}); delete it to redo that part of the run, or use another --out") from None


def task_checkpoints(out) -> list:
    """Completed task checkpoints of a run folder, in task order → [(t, name, path)]."""
    found = sorted((int(p.stem[4:].split("_")[0]), p) for p in Path(out).glob("task*_*.pt"))
    return [(t, p.stem.split("_", 1)[1], p) for t, p in found]


@torch.no_grad()
def extract_features(model: MAE, tiles, cfg: Config, device=None, batch_size: int = 256) -> np.ndarray:
    """Frozen features of uint8 tiles [n, 3, S, S] (resized to the model's size, normalised, no augmentation,
    unmasked) → float32 [n, D]."""
    device, was_training = device or cfg.device, model.training
    model.eval()
    out = []
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i:i + batch_size]  # numpy (a read-only memory map: copied) or a torch tensor
        b = (chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))).to(device)
        out.append(model.encode(augment(b, model.grid * model.p, None), cfg.pool).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


class Run:
    """Everything a run writes under cfg.out (config.json, summary.json, eval.json, metrics.jsonl, checkpoints;
    under torchrun only rank 0 writes). Resume = rerun the same command with the same --out."""

    def __init__(self, cfg: Config):
        self.cfg, self.out, self.main, self.eval_set = cfg, Path(cfg.out), DIST["rank"] == 0, None
        self.out.mkdir(parents=True, exist_ok=True)
        conf, old = dataclasses.asdict(cfg), self.read("config.json", None)
        if old is None:
            self.write("config.json", conf)
        else:  # a resume: the same run, except what may change between a run and its resume
            diff = {k: (old.get(k), v) for k, v in conf.items()
                    if k not in ("device", "log_every", "eval") and old.get(k) != v}
            if diff:
                raise DataError(f"{self.out} holds a run with another configuration {diff} (old, new); "
                                "use another --out, or the same flags to resume")
        print("config: " + " ".join(f"{k}={v}" for k, v in conf.items()))
        self.summary = self.read("summary.json", dict(method=cfg.method, seed=cfg.seed, tasks=cfg.tasks,
                                                      completed=0, train_seconds=0.0))
        self.eval_rows = self.read("eval.json", [])

    def read(self, name, default):
        path = self.out / name
        return json.loads(path.read_text()) if path.exists() else default

    def write(self, name, obj):
        if self.main:
            (self.out / name).write_text(json.dumps(obj, indent=1))

    def completed_tasks(self) -> int:
        return max((t for t, _, _ in task_checkpoints(self.out)), default=0)

    def save_task(self, t, name, model, projector, buffer, seconds, ewc=None):
        """After task t: everything the next task needs, atomically; the mid-task checkpoint is then stale."""
        if self.main:
            sd = model.state_dict()
            atomic_save(dict(task=t, name=name, model=sd, projector=projector.state_dict(), buffer=buffer.state_dict(),
                             encoder={k: v for k, v in sd.items() if is_encoder_key(k)},
                             ewc=ewc.state_dict() if ewc else {}), self.out / f"task{t}_{name}.pt")
            (self.out / "last.pt").unlink(missing_ok=True)
        self.summary.update(completed=t, train_seconds=self.summary["train_seconds"] + seconds, world=DIST["world"])
        self.write("summary.json", self.summary)

    def load_task(self, t, model, projector, buffer, ewc=None) -> dict:
        """Load the checkpoint of finished task t → its encoder weights (θ_{t−1} for the next task)."""
        ck = load_checkpoint(task_checkpoints(self.out)[t - 1][2])
        model.load_state_dict(ck["model"])
        projector.load_state_dict(ck["projector"])
        buffer.load_state_dict(ck["buffer"])
        if ewc is not None:
            ewc.load_state_dict({k: v.to(self.cfg.device) for k, v in ck["ewc"].items()})
        return {k: v.to(self.cfg.device) for k, v in ck["encoder"].items()}

    def save_last(self, t, epoch, model, projector, opt):
        if self.main:
            atomic_save(dict(task=t, epoch=epoch, model=model.state_dict(), projector=projector.state_dict(),
                             opt=opt.state_dict()), self.out / "last.pt")

    def resume_task(self, t, model, projector, opt) -> int:
        """The first epoch to run of task t: 0, or the epoch after the last mid-task checkpoint."""
        ck = load_checkpoint(self.out / "last.pt") if (self.out / "last.pt").exists() else {}
        if ck.get("task") != t:
            return 0
        model.load_state_dict(ck["model"])
        projector.load_state_dict(ck["projector"])
        opt.load_state_dict(ck["opt"])
        print(f"resuming task {t} after epoch {ck['epoch']}")
        return int(ck["epoch"])

    def meter(self, t, name, total):
        return Meter(self.cfg, t, name, total, self.out / "metrics.jsonl", self.main)

    def evaluate(self, t, name, model):
        """ML-kNN on UCMerced (--ucmerced) or the synthetic multi-label set; the row of task t into eval.json."""
        if not self.main:
            return
        import eval_mlknn  # here, not at the top: eval_mlknn imports this file
        self.eval_set = self.eval_set or eval_mlknn.load_eval_set(self.cfg.ucmerced, self.cfg)
        t0, r = time.time(), eval_mlknn.evaluate_encoder(model, self.cfg, self.eval_set, self.cfg.device)
        row = dict(task=t, name=name, micro=r["micro"], macro=r["macro"])
        self.eval_rows = sorted([x for x in self.eval_rows if x["task"] != t] + [row], key=lambda x: x["task"])
        self.write("eval.json", self.eval_rows)
        print(f"eval after {name}: micro mAP {r['micro']:.2f}  macro mAP {r['macro']:.2f}  ({time.time() - t0:.0f}s)")

    def print_table(self):
        """Micro and macro mAP (%) after each task, laid out like the paper's Table II."""
        if not self.eval_rows:
            return
        import eval_mlknn
        src = "UCMerced" if self.cfg.ucmerced else "the synthetic multi-label set"
        run = dict(method=self.cfg.method, tasks=self.cfg.tasks, rows=self.eval_rows,
                   train_seconds=self.summary["train_seconds"])
        for m in ("micro", "macro"):
            print(eval_mlknn.format_table([run], m, f"\n{m} mAP (%) of ML-kNN (k=10) on {src}, after each task:"))


class Meter:
    """Progress lines and metrics.jsonl records every cfg.log_every steps. Losses stay on the device between
    log points: the only host syncs are the .tolist() at a log point."""

    def __init__(self, cfg, t, name, total, path, main=True):
        self.cfg, self.t, self.name, self.total, self.path, self.main = cfg, t, name, total, path, main
        self.sums, self.n, self.imgs, self.t0 = None, 0, 0, time.time()

    def update(self, step, epoch, n_img, loss, loss_rec, loss_mim, lam1, lam2, lr):
        vals = torch.stack([loss.detach().float(), loss_rec.detach().float(), loss_mim.detach().float()])
        self.sums = vals if self.sums is None else self.sums + vals
        self.n, self.imgs = self.n + 1, self.imgs + n_img
        if (step + 1) % self.cfg.log_every and step + 1 != self.total:
            return
        total, rec, mim = (all_mean(self.sums) / self.n).tolist()  # every rank joins the all-reduce
        rate = self.imgs * DIST["world"] / (time.time() - self.t0)
        self.sums, self.n, self.imgs, self.t0 = None, 0, 0, time.time()
        if not self.main:
            return
        eta = (self.total - step - 1) * self.cfg.batch_size / rate
        with open(self.path, "a") as f:
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

def main(argv=None) -> None:
    try:
        cfg = parse_args(argv)
        setup_distributed(cfg)
        for seed in cfg.seeds or [cfg.seed]:  # --seeds: one run per seed, OUT/seed<s>
            run_cfg = dataclasses.replace(cfg, seed=seed, seeds=[], out=f"{cfg.out}/seed{seed}" if cfg.seeds else cfg.out)
            train(run_cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
