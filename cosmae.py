"""CoSMAE: continual self-supervised learning with masked autoencoders for remote sensing.

L. Möllenbrok, B. Rasti, B. Demir, "Masked Autoencoders in Continual Self-Supervised Learning for Remote
Sensing", IEEE Geoscience and Remote Sensing Letters, arXiv:2506.21312. Official code: git.tu-berlin.de/rsim/CoSMAE
(announced in the paper; not available to us and NOT consulted: everything here is written from the paper's text).

Method. A ViT MAE f = (e, d) learns the tasks T_1..T_T one after another (Eq. (1) alone on T_1). From task 2 on,
two regularisers fight forgetting: (i) data mixup, Eq. (2): every image is mixed with a random image of a small
memory buffer of past tasks; (ii) model-mixup knowledge distillation, Eq. (3)-(4): a teacher whose weights
interpolate the previous encoder θ_{t−1} and the current θ_t encodes the unmasked mixed image, and the student's
projected features g(c) are pulled to the teacher's c̃ by a mutual information maximization (MIM) loss based on
NT-Xent. After each task the frozen encoder is scored by ML-kNN on UCMerced (eval_mlknn.py).

Index of the paper → code (grep "Eq. (" to find each tag at the line that computes it):
    §II-A  Eq. (1) masked-patch MSE     → MAE.forward_loss      (masking: MAE.random_masking)
    §II-B  Eq. (2) data mixup           → mix_batch             (memory buffer M_t: ReplayBuffer)
    §II-C  Eq. (3) model-mixup teacher  → MixupTeacher.rebuild
           Eq. (4) MIM loss (NT-Xent)   → mim_loss              (projector g: make_projector)
           Eq. (5) total loss           → train_step            (the task loop: train_task, train)

Notation: N batch, L patches, D width, p patch size, H×W image; λ1 = lam1, λ2 = lam2, τ = tau, β = beta,
θ_{t−1} = theta_prev; mask convention as in MAE: 1 = removed, 0 = kept.

Run: `python cosmae.py` (synthetic tasks, ~5 min; --help: every flag); the rest: README; a tour: WALKTHROUGH.md.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_mlknn
import rs_data
import runner


# --- §II-A. The MAE (ViT encoder, lightweight ViT decoder) and Eq. (1) -----------------------------------------
# Follows facebookresearch/mae `models_mae.py` (names, init, masking, loss); differences: no timm, attention
# through F.scaled_dot_product_attention, forward() also returns the encoder tokens (for Eq. (4)), and encode()
# gives pooled features of the unmasked image (teacher and evaluation).

def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with a zero row for cls → [1, 1 + grid², dim] (as MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [D/4]
    gy, gx = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")  # [grid, grid] each
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
        """Argsort of uniform noise: x [N, L, D] → x_kept [N, len_keep, D], mask [N, L] (1 = removed), ids_restore."""
        n, l, d = x.shape
        len_keep = int(l * (1 - mask_ratio))
        noise = torch.rand(n, l, device=x.device)  # [N, L]
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, len_keep, D]
        mask = torch.ones(n, l, device=x.device)
        mask[:, :len_keep] = 0
        return x_kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs, mask_ratio: float):
        """→ latent [N, 1 + len_keep, D] (cls first), mask [N, L], ids_restore [N, L]; mask_ratio 0: unmasked."""
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
        """What Eq. (1) reconstructs: the patches [N, L, p²·3] (norm_pix_loss: each by its own mean and std)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """imgs [N, 3, H, W], pred [N, L, p²·3], mask [N, L] → scalar, as MAE: the printed ‖·‖² / p²·3 (choice 3)."""
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

    def encoder_state_dict(self) -> dict:
        """θ: the encoder's weights (facebookresearch/mae names; they load into timm's vit_base_patch16_224)."""
        return {k: v for k, v in self.state_dict().items() if is_encoder_key(k)}


def pool_tokens(latent, pool: str):
    """latent [N, 1 + L', D] → [N, D]: mean of the patch tokens (default, inferred) or the cls token."""
    return latent[:, 1:].mean(dim=1) if pool == "mean" else latent[:, 0]


def is_encoder_key(name: str) -> bool:
    """Encoder weights θ (what θ_{t−1}, the teacher and the evaluation use): all but the decoder's."""
    return not (name.startswith("decoder") or name == "mask_token")


def build_model(cfg: Config) -> MAE:
    torch.manual_seed(cfg.seed)
    return MAE(**MODELS[cfg.model], norm_pix_loss=cfg.norm_pix_loss)


# --- §II-B. Data mixup with a memory buffer of past tasks ---------------------------------------------------------
# A task is an array of raw uint8 tiles [n, 3, S, S]; batches are augmented on the device (§III-B: random resized
# crop and flip, rs_data.augment), so the buffer keeps raw tiles and augments them afresh whenever they are drawn.

class ReplayBuffer:
    """Memory buffer M_t (§II-B): ⌊M/t⌋ raw tiles of each past task, chosen, drawn uniformly, augmented when drawn."""

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
        return (torch.rand((n,), generator=gen, device=device) * len(self)).long()

    def flat(self, device) -> torch.Tensor:
        """Every stored tile, task after task → uint8 [len, 3, S, S] on `device` (kept until the buffer changes)."""
        if self._flat is None:
            self._flat = torch.cat(list(self.tiles.values()))
        self._flat = self._flat.to(device)  # a no-op once it is there
        return self._flat

    def sample(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        return self.flat(device)[self.draw(n, gen, device)]

    def state_dict(self) -> dict:
        return {f"task{k}": v for k, v in self.tiles.items()}

    def load_state_dict(self, sd: dict):
        self.tiles, self._flat = {int(k[4:]): v for k, v in sd.items()}, None


def draw_lambda(rng: np.random.Generator, how: str, alpha: float, value: float, n: int | None = None):
    """λ ~ Beta(α, α) (the paper), U[0, 1] or a constant (Fig. 2 ablations): one float, or an array of n."""
    if how == "constant":
        return value if n is None else np.full(n, value)
    return rng.beta(alpha, alpha, n) if how == "beta" else rng.random(n)


def mix_batch(x, x_mem, lam1):
    """x, x_mem [N, 3, H, W]: current and buffer images (augmented); λ1 a float or [N, 1, 1, 1] → [N, 3, H, W]."""
    # Eq. (2)  X̃_i = λ1·X_i + (1−λ1)·X_j^M
    return lam1 * x + (1 - lam1) * x_mem


# --- §II-C. Model-mixup knowledge distillation: the teacher, the projector g, the mutual information maximization loss

class MixupTeacher(nn.Module):
    """The teacher ẽ_t: a frozen copy of the encoder, its weights set between θ_{t−1} and θ_t before every step."""

    def __init__(self, student: MAE, theta_prev: dict, pool: str = "mean"):
        super().__init__()
        self.net, self.pool = copy.deepcopy(student).requires_grad_(False).eval(), pool
        names = [n for n, _ in student.named_parameters() if is_encoder_key(n)]
        self.theta_t = [student.get_parameter(n) for n in names]  # the student's live weights
        self.theta_prev = [theta_prev[n].to(self.theta_t[0].device) for n in names]
        self.mixed = [self.net.get_parameter(n) for n in names]  # the teacher's own weights

    @torch.no_grad()
    def rebuild(self, lam2: float):
        for mixed, theta_t, theta_prev in zip(self.mixed, self.theta_t, self.theta_prev):
            # Eq. (3)  θ̃_t = λ2·θ_t + (1−λ2)·θ_{t−1}   (lerp: θ_{t−1} + λ2·(θ_t − θ_{t−1}))
            mixed.copy_(theta_prev).lerp_(theta_t, lam2)

    @torch.no_grad()
    def forward(self, x):
        """Teacher features c̃ of the UNMASKED mixed image: [N, 3, H, W] → [N, D]."""
        return self.net.encode(x, self.pool).float()


def make_projector(dim: int, hidden: int = 128) -> nn.Module:
    """g: 2-layer MLP (hidden 128, ReLU) from the student's features c to the teacher's space (§II-C, §III-B)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def mim_loss(student, teacher, tau: float = 0.5, form: str = "simclr"):
    """Mutual information maximization (MIM) loss of Eq. (4), "based on NT-Xent [12]": student g(c) [N, D], teacher
    c̃ [N, D] → scalar; S = cosine similarity. Three readings (docs/choices.md, 2): simclr, SimCLR's NT-Xent over
    the 2N embeddings (the printed 1{i≠q} as SimCLR's 1[k≠i]; the group's CSMAE code); paper, the printed letter
    (positives out of the cross-side denominators: it can be negative); infonce, the cross-side sums with them."""
    z = torch.cat([F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)])  # [2N, D]
    n = student.shape[0]
    if form == "simclr":
        s = z @ z.T / tau  # [2N, 2N] similarity of all pairs
        s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=s.device), float("-inf"))  # k ≠ i
        positive = torch.arange(2 * n, device=s.device).roll(n)  # i ↔ i + N: g(c_i) and c̃_i
        # Eq. (4)  L_MIM = 1/(2N) Σ_{i=1}^{2N} −log(e^{S(z_i, z_pos(i))/τ} / Σ_{k≠i} e^{S(z_i, z_k)/τ})
        return F.cross_entropy(s, positive)
    s = z[:n] @ z[n:].T / tau  # [N, N]: S(g_i, c̃_q)/τ; row i, column q; positives on the diagonal
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    s_den = s.masked_fill(eye, float("-inf")) if form == "paper" else s  # paper: the printed 1{i ≠ q}; infonce: kept
    return (2 * -s.diagonal() + s_den.logsumexp(dim=1) + s_den.logsumexp(dim=0)).sum() / (2 * n)


# --- One CoSMAE step: Eq. (2), (1), (3), (4), (5) ------------------------------------------------------------------

def train_step(model, projector, teacher, opt, raw, buffer, rng, gen, cfg: Config, mixup: bool, lam2=None):
    """A raw uint8 batch [B, 3, S, S] on the device: augment, Eq. (2) (t ≥ 2), (1), (3), (4), (5), AdamW (lam2: set
    by --teacher-every epoch) → (loss, loss_rec, loss_mim) device tensors (no host sync), λ1, λ2."""
    img, per_image = MODELS[cfg.model]["img_size"], cfg.lam1_per == "image"
    x, lam1 = rs_data.augment(raw, img, gen), 1.0
    if mixup:  # λ1 once per batch (inferred, as LUMP), or once per image with --lam1-per image
        lam = draw_lambda(rng, cfg.lam1, cfg.alpha1, cfg.lam1_value, len(x) if per_image else None)
        lam1 = float(np.mean(lam))  # logged
        lam = rs_data.to_device(lam.astype(np.float32), x.device).view(-1, 1, 1, 1) if per_image else lam
        x = mix_batch(x, rs_data.augment(buffer.sample(len(x), gen, x.device), img, gen), lam)  # with buffer images
    with runner.autocast(x.device, cfg.amp):
        loss_rec, _, _, latent = model(x, cfg.mask_ratio)  # Eq. (1) on the masked (mixed) image
        loss_mim = torch.zeros_like(loss_rec)
        if teacher is not None:
            if lam2 is None:  # a new teacher every step (default): Eq. (3) from this step's θ_t
                lam2 = draw_lambda(rng, cfg.lam2, cfg.alpha2, cfg.lam2_value)
                teacher.rebuild(lam2)
            c_tilde = teacher(x)  # [N, D] teacher features of the unmasked image
            c = pool_tokens(latent, cfg.pool)  # [N, D] student features of its visible tokens
            # under torchrun: Eq. (4) over the global batch (gather: the features of every process)
            loss_mim = mim_loss(runner.gather(projector(c)), runner.gather(c_tilde), cfg.tau, cfg.mim_form)
        loss = loss_rec + cfg.beta * loss_mim  # Eq. (5)  L = L_Recon + β·L_MIM
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return (loss, loss_rec, loss_mim), lam1, 1.0 if teacher is None else lam2


# --- §III-B. Training: one task, then the task sequence --------------------------------------------------------

def make_optimizer(model: nn.Module, projector: nn.Module, cfg: Config):
    """AdamW (betas 0.9/0.95 as MAE), no weight decay on 1-D parameters (biases, norms); fused: one kernel."""
    params = [p for m in (model, projector) for p in m.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)


def lr_at(step: float, total: int, warmup: float, lr: float) -> float:
    """Linear warm-up over `warmup` steps, then half-cycle cosine to 0 (MAE's schedule), per iteration."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_task(t: int, tiles, model, projector, buffer, theta_prev, cfg: Config, run, step_fn=train_step):
    """Task t (1-based), a fresh optimiser and schedule; mixup and teacher from t = 2; step_fn: a baseline's step."""
    opt = make_optimizer(model, projector, cfg)
    teacher = run.wrap(MixupTeacher(model, theta_prev, cfg.pool)) if t > 1 and cfg.model_mixup else None
    mixup, steps = t > 1 and cfg.data_mixup, len(tiles) // cfg.batch_size  # steps per epoch
    net, proj = run.wrap(model), run.wrap(projector)  # DDP under torchrun, compiled with --compile; else themselves
    for epoch in range(run.task_start(t, steps, model, projector, opt, theta_prev), cfg.epochs):
        rng = np.random.default_rng([cfg.seed, t, epoch])  # data order, λ1, λ2: one stream per epoch (resumable)
        gen = torch.Generator(cfg.device).manual_seed(int(rng.integers(2 ** 62)) + run.rank)  # crops, buffer draws
        torch.manual_seed(int(rng.integers(2 ** 62)) + run.rank)  # masking noise (rank: a torchrun process's index)
        lam2 = None
        if teacher is not None and cfg.teacher_every == "epoch":  # one teacher for the epoch (inferred option)
            lam2 = draw_lambda(rng, cfg.lam2, cfg.alpha2, cfg.lam2_value)
            teacher.rebuild(lam2)
        for i, raw in enumerate(run.batches(tiles, cfg.batch_size, rng)):
            step = epoch * steps + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.epochs * steps, cfg.warmup_epochs * steps, cfg.lr)
            losses, lam1, lam2_used = step_fn(net, proj, teacher, opt, raw, buffer, rng, gen, cfg, mixup, lam2)
            run.step_end(t, epoch, step, len(raw), losses, lam1, lam2_used, opt.param_groups[0]["lr"])
        run.epoch_end(t, epoch, model, projector, opt)


def train(cfg: Config, run, step_fn=train_step) -> MAE:
    """The task loop: T_1..T_T in order → the MAE after T_T; `run` (runner.Run) keeps the run folder and resumes."""
    data = {name: task_data(name, cfg) for name in cfg.tasks}  # read every task first: a bad file fails early
    model = build_model(cfg).to(cfg.device)
    projector = make_projector(model.pos_embed.shape[-1], cfg.proj_hidden).to(cfg.device)
    buffer, theta_prev = ReplayBuffer(cfg.memory_size), None
    run.start(data, model, projector, buffer)
    for t, name in enumerate(cfg.tasks, 1):
        if not run.restore(t, model, projector, buffer):  # False: task t is not finished in the run folder yet
            train_task(t, data[name], model, projector, buffer, theta_prev, cfg, run, step_fn)
            buffer.add_task(t, data[name], np.random.default_rng([cfg.seed, t, 10 ** 6]))
            run.task_end(t, model, projector, buffer, data[name])
        theta_prev = {k: v.detach().clone() for k, v in model.encoder_state_dict().items()}  # θ_{t−1} for t + 1
    run.end()
    return model


def task_data(name: str, cfg: Config) -> np.ndarray:
    if name in rs_data.SYNTH_TASKS:
        size = rs_data.tile_size(cfg.tasks, MODELS[cfg.model]["img_size"])
        return rs_data.synth_task(name, cfg.synth_train, size, rs_data.DATA_SEED)[0]
    return rs_data.task_tiles(name, cfg.data_root, "train", cfg.cache_dir, treesat_resize=cfg.treesat_resize)


# --- Configuration: the paper's settings (§III-B, §III-C) -------------------------------------------------------

MODELS = {  # encoder width/depth/heads, decoder width/depth/heads, image and patch size
    "vit_base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,  # §III-B
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_tiny": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                     decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=3),
    "vit_test": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
}
PRESETS = {  # the paper's for real data; a few-minute CPU run for synthetic (README, choice 12)
    "paper": dict(model="vit_base", epochs=300, batch_size=128, warmup_epochs=10, norm_pix_loss=False),
    "synthetic": dict(model="vit_tiny", epochs=16, batch_size=32, warmup_epochs=1, norm_pix_loss=True),
}
UNSET = dict(model="", epochs=0, batch_size=0, warmup_epochs=-1.0, norm_pix_loss=None)  # = "by preset"


def arg(default, help, **kw):  # a Config field: --help text, type/choices, bounds ge/gt/le or check=(holds, allowed)
    return field(default_factory=lambda: copy.copy(default), metadata=dict(help=help, **kw))


def setting(default, help, **kw):  # a field that does not change what is trained (a resume may change it)
    return arg(default, help, training=False, **kw)


@dataclass
class Config:
    """CoSMAE: continual self-supervised MAE for remote sensing (every flag; defaults from the paper)."""
    # experiment
    method: str = arg("cosmae", "cosmae, or finetune (Table I: no mixup, no KD)", choices=["cosmae", "finetune"])
    tasks: list = arg(list(rs_data.SYNTH_TASKS), "T_1..T_T: synthetic, the paper's us3d uavid potsdam treesat, or "
                      "folders of images", type=rs_data.task_arg,
                      check=(lambda v, c: len({t in rs_data.SYNTH_TASKS for t in v}) == 1, "all synthetic or all real"))
    data_root: str = setting("data", "folder holding the real datasets (README: 'Data layout')")
    cache_dir: str = setting("", "tile cache folder ('' = DATA_ROOT/.cosmae_cache if writable, else the user cache)")
    ucmerced: str = setting("", "UCMerced_LandUse folder: ML-kNN on it after each task (else the synthetic set)")
    out: str = setting("runs/cosmae", "run folder: config.json, metrics.jsonl, task checkpoints; rerun to resume")
    seed: int = arg(0, "seed of the init, data order, augmentation, masking, buffer and λ draws", ge=0, le=2 ** 32 - 1)
    seeds: list = setting([], "one run per seed, in OUT/seed<s> (the paper: 3 trials)", type=int, ge=0, le=2 ** 32 - 1)
    device: str = setting("auto", "auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    eval: bool = setting(True, "evaluation before task 1 and after every task (ML-kNN, Eq. (1) per task, pictures)")
    mlknn_count_self: bool = setting(False, "ML-kNN counts an image as its own neighbour (as scikit-multilearn)")
    log_every: int = setting(20, "steps between progress lines / metrics.jsonl records", ge=1)
    save_every: int = setting(10, "epochs between resumable mid-task checkpoints (last.pt)", ge=1)
    # MAE (§II-A, §III-B)
    model: str = arg("", "vit_base (paper), vit_tiny (CPU), vit_test (tests); '' = by tasks", choices=list(MODELS))
    mask_ratio: float = arg(0.75, "r, mask ratio of Eq. (1) (§III-B)", check=(  # r·L patches masked, (1 − r)·L seen
        lambda v, c: 0 < v < 1 and (1 - v) * (MODELS[c.model]["img_size"] // MODELS[c.model]["patch_size"]) ** 2 >= 1,
        "in (0, 1), leaving at least one patch visible and one masked"))
    norm_pix_loss: bool | None = arg(None, "MAE's per-patch normalised target (real data: off, an inferred choice; "
                                     "MAE's own default is on; synthetic: on)")
    pool: str = arg("mean", "features c: mean of patch tokens or the cls token (inferred)", choices=["mean", "cls"])
    init: str = arg("", "an MAE checkpoint to start from (e.g. mae_pretrain_vit_base.pth)")
    # CoSMAE (§II-B, §II-C)
    data_mixup: bool = arg(True, "Eq. (2) data mixup with the memory buffer (t ≥ 2)")
    model_mixup: bool = arg(True, "Eq. (3)-(4) model-mixup knowledge distillation (t ≥ 2)")
    memory_size: int = arg(1000, "M, images in the memory buffer (§III-B)",
                           check=(lambda v, c: v >= c.data_mixup, "≥ 1 with data mixup (--no-data-mixup allows 0)"))
    lam1: str = arg("beta", "λ1 ~ Beta(α1, α1), U[0,1] (Fig. 2a), constant", choices=["beta", "uniform", "constant"])
    alpha1: float = arg(0.4, "α1 of λ1 ~ Beta(α1, α1) (§III-C, Fig. 2a)", gt=0, le=1e3)
    lam1_value: float = arg(0.5, "λ1 when --lam1 constant", ge=0, le=1)
    lam1_per: str = arg("batch", "one λ1 per batch (as LUMP) or per image (inferred)", choices=["batch", "image"])
    lam2: str = arg("beta", "λ2 ~ Beta(α2, α2), U[0,1], constant (Fig. 2c)", choices=["beta", "uniform", "constant"])
    alpha2: float = arg(0.4, "α2 of λ2 ~ Beta(α2, α2) (§III-C, Fig. 2c)", gt=0, le=1e3)
    lam2_value: float = arg(0.5, "λ2 when --lam2 constant (Fig. 2c: 0.5 and 0)", ge=0, le=1)
    teacher_every: str = arg("step", "a new teacher (Eq. (3)) every step or epoch", choices=["step", "epoch"])
    proj_hidden: int = arg(128, "hidden width of the 2-layer projector g (§III-B)", ge=1)
    tau: float = arg(0.5, "τ of Eq. (4), temperature (§III-B)", gt=0)
    mim_form: str = arg("simclr", "Eq. (4): simclr (NT-Xent over the 2N embeddings), paper (the printed letter), "
                        "infonce (student against teacher); see mim_loss", choices=["simclr", "paper", "infonce"])
    beta: float = arg(0.1, "β of Eq. (5), weight of the mutual information maximization loss (Fig. 2b)", ge=0)
    # optimisation (§III-B)
    epochs: int = arg(0, "epochs per task (paper 300; 0 = by preset)", ge=1)
    batch_size: int = arg(0, "images per step (paper 128; 0 = by preset)", ge=1)
    lr: float = arg(1e-3, "AdamW learning rate, absolute (§III-B; not MAE's base lr × batch/256)", gt=0)
    weight_decay: float = arg(0.05, "AdamW weight decay (MAE's value; the paper does not say)", ge=0)
    warmup_epochs: float = arg(-1.0, "linear warm-up epochs, then cosine (paper 10; -1 = by preset)",
                               check=(lambda v, c: 0 <= v <= c.epochs, "between 0 and --epochs"))
    amp: bool = arg(True, "bf16 autocast on CUDA (ignored on CPU; inferred: the paper does not say)")
    compile: bool = setting(False, "torch.compile the student and the teacher (speed only)")
    # data
    synth_train: int = arg(1024, "training images per synthetic task", check=(
        lambda v, c: v >= c.batch_size or c.tasks[0] not in rs_data.SYNTH_TASKS, "≥ --batch-size ({c.batch_size})"))
    treesat_resize: bool = arg(False, "TreeSatAI: resize each 304×304 image to 256 (default: its centre 256×256)")


def resolve(cfg: Config) -> Config:
    """Right after parsing: the preset's values for the fields left unset, the method's switches, the device."""
    preset = PRESETS["synthetic" if all(t in rs_data.SYNTH_TASKS for t in cfg.tasks) else "paper"]
    for k, v in preset.items():
        if getattr(cfg, k) == UNSET[k]:
            setattr(cfg, k, v)
    if cfg.method != "cosmae":  # fine-tuning and the Table II baselines: none of CoSMAE's two regularisers
        cfg.data_mixup = cfg.model_mixup = False
    cfg.device = str(runner.resolve_device(cfg.device))
    return cfg


def main(argv=None):  # `python cosmae.py --help`: every flag. One run per seed (runner/), evaluated by eval_mlknn.py
    def run_all():
        for cfg in runner.seed_runs(resolve(runner.parse_args(Config, argv))):
            with runner.Run(cfg, callbacks=[eval_mlknn.Evaluation(cfg)] if cfg.eval else []) as run:
                train(cfg, run)
    runner.cli(run_all)


if __name__ == "__main__":
    main()
