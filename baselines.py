"""The other rows of Table II (§III-D) from cosmae.py's parts, all fine-tuning on task 1; their settings: ours
(docs/choices.md, 13). `python baselines.py --method lump` (er ewc der lump pfr, and cosmae finetune)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import cosmae
import eval_mlknn
import rs_data
import runner
from cosmae import arg, mix_batch, pool_tokens
from rs_data import DataError, augment


@dataclass
class BaselineConfig(cosmae.Config):
    method: str = arg("er", "a Table II row", choices=["er", "ewc", "der", "lump", "pfr", "cosmae", "finetune"])
    replay_batch: int = arg(0, "ER, DER: buffer images per step (0: ER ⌈0.045·B⌉, DER ⌈0.14·B⌉, by Table II)", ge=0)
    ewc_lambda: float = arg(100.0, "EWC: penalty weight λ_EWC (not given in the paper; not tuned)", ge=0)
    ewc_batches: int = arg(16, "EWC: batches used to estimate the diagonal Fisher after each task", ge=1)
    der_alpha: float = arg(0.1, "DER: weight of its feature MSE (ours, not tuned; LUMP's configs: 0.4)", ge=0)
    pfr_weight: float = arg(1.0, "PFR: weight of the cosine regulariser (not given in the paper)", ge=0)
    lump_alpha: float = arg(0.4, "LUMP: α of its λ ~ Beta(α, α), one draw per step (LUMP's value)", gt=0, le=1e3)


def resolve(cfg: BaselineConfig) -> BaselineConfig:
    cfg, method = cosmae.resolve(cfg), cfg.method
    if method in ("er", "der"):
        cfg.replay_batch = cfg.replay_batch or math.ceil(cfg.batch_size * (0.045 if method == "er" else 0.14))
    need = cfg.batch_size if method == "lump" else 1 if method in ("er", "der") else 0
    if cfg.memory_size < need:
        raise DataError(f"--memory-size {cfg.memory_size}: must be ≥ {'--batch-size' if need > 1 else 1} for {method}")
    return cfg


class Baseline:
    """The seam of cosmae.train(): every hook does nothing, a step is Eq. (1) alone; runner.Run checkpoints it."""

    def __init__(self, cfg: BaselineConfig):
        self.cfg = cfg
        self.load_state_dict({})  # the state before task 1

    def start_task(self, t: int, model, theta_prev: dict):
        pass

    def end_task(self, t: int, model, tiles, buffer):
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict):
        pass

    def step(self, model, projector, teacher, opt, raw, buffer, rng, gen, cfg, mixup, lam2=None):
        """Eq. (1) on the batch of inputs(), plus the baseline's term(...); then after_step(raw, rng)."""
        x, lam = self.inputs(raw, rng, gen)
        with runner.autocast(x.device, cfg.amp):
            loss_rec, _, _, latent = model(x, cfg.mask_ratio)
            extra = self.term(getattr(model, "module", model), projector, x, latent, buffer, gen)
            loss = loss_rec + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.after_step(raw, rng)
        return (loss, loss_rec, extra.detach() if torch.is_tensor(extra) else torch.zeros_like(loss_rec)), lam, 1.0

    def inputs(self, raw, rng, gen):
        """The batch the MAE sees → (x [N, 3, H, W], the λ logged as lam1): the augmented raw batch, λ = 1."""
        return augment(raw, cosmae.MODELS[self.cfg.model]["img_size"], gen), 1.0

    def term(self, model, projector, x, latent, buffer, gen):
        return 0.0

    def after_step(self, raw, rng):
        pass


class ER(Baseline):
    """Experience replay [19]: cfg.replay_batch buffer images join every batch (task 2 on); Eq. (1) on all."""

    def step(self, model, projector, teacher, opt, raw, buffer, rng, gen, cfg, mixup, lam2=None):
        if len(buffer):
            raw = torch.cat([raw, buffer.sample(cfg.replay_batch, gen, raw.device)])
        return cosmae.train_step(model, projector, None, opt, raw, buffer, rng, gen, cfg, False)


class EWC(Baseline):
    """EWC [7], online (inferred): after each task F += batch mean of (∂L_Recon/∂θ)², θ* = θ; λ/2 · Σ F·(θ − θ*)²."""

    def term(self, model, projector, x, latent, buffer, gen):
        if not self.fisher:
            return 0.0
        return self.cfg.ewc_lambda / 2 * sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
                                             for n, p in model.named_parameters() if n in self.fisher)

    def end_task(self, t, model, tiles, buffer):
        cfg, img = self.cfg, cosmae.MODELS[self.cfg.model]["img_size"]
        rng, gen = np.random.default_rng([cfg.seed, 777]), torch.Generator(cfg.device).manual_seed(cfg.seed)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sq = {n: torch.zeros_like(p) for n, p in params.items()}
        batches = rs_data.batches(tiles, cfg.batch_size, rng, cfg.device, (runner.DIST["rank"], runner.DIST["world"]))
        for nb, raw in enumerate(itertools.islice(batches, cfg.ewc_batches), 1):
            model.zero_grad(set_to_none=True)
            model(augment(raw, img, gen), cfg.mask_ratio)[0].backward()
            grads = [p.grad for p in params.values()]
            torch._foreach_addcmul_(list(sq.values()), grads, grads)
        model.zero_grad(set_to_none=True)
        self.fisher = {n: self.fisher.get(n, 0) + runner.all_mean(v) / nb for n, v in sq.items()}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}

    def state_dict(self):
        return {f"{k}.{n}": v for k in ("fisher", "anchor") for n, v in getattr(self, k).items()}

    def load_state_dict(self, sd):
        self.fisher = {k[7:]: v.to(self.cfg.device) for k, v in sd.items() if k.startswith("fisher.")}
        self.anchor = {k[7:]: v.to(self.cfg.device) for k, v in sd.items() if k.startswith("anchor.")}


class DER(Baseline):
    """DER [11] as LUMP adapts it: α · MSE of replay_batch buffer images' features and those stored as they entered."""

    def term(self, model, projector, x, latent, buffer, gen):
        if not self.feats:
            return 0.0
        idx = buffer.draw(self.cfg.replay_batch, gen, x.device)
        stored = torch.cat([self.feats[k][:len(v)] for k, v in buffer.tiles.items()])[idx]  # buffer.flat()'s order
        feats = model.encode(augment(buffer.flat(x.device)[idx], x.shape[-1], None), self.cfg.pool).float()  # plain
        return self.cfg.der_alpha * F.mse_loss(feats, stored)

    def end_task(self, t, model, tiles, buffer):
        feats = eval_mlknn.extract_features(model, buffer.tiles[t], self.cfg.pool, self.cfg.device, self.cfg.amp)
        self.feats[t] = torch.from_numpy(feats).to(self.cfg.device)

    def state_dict(self):
        return {f"feats{k}": v for k, v in self.feats.items()}

    def load_state_dict(self, sd):  # feats: {task: float [m, D]} on the device, aligned with buffer.tiles[task]
        self.feats = {int(k[5:]): v.to(self.cfg.device) for k, v in sd.items()}


class PFR(Baseline):
    """PFR [9]: 1 − cos(g(c), e_{t−1}(x)), batch mean, student masked; e_{t−1}: CoSMAE's teacher at λ2 = 0."""

    def start_task(self, t, model, theta_prev):
        self.old = None
        if t > 1:
            self.old = cosmae.MixupTeacher(model, theta_prev, self.cfg.pool)
            self.old.rebuild(0.0)  # θ̃ = θ_{t−1}, fixed for the whole task

    def term(self, model, projector, x, latent, buffer, gen):
        if self.old is None:
            return 0.0
        z_old = runner.gather(self.old(x))  # [N, D]
        p = runner.gather(projector(pool_tokens(latent, self.cfg.pool)))  # [N, D]
        return self.cfg.pfr_weight * (1 - F.cosine_similarity(p.float(), z_old.float(), dim=1).mean())


class LUMP(Baseline):
    """LUMP [8] (divyam3897/UCL): its own reservoir of the stream (M images, uniform over all seen); from task 2 on,
    Eq. (1) on the batch mixed with as many reservoir images (no replacement), one λ ~ Beta(α, α) per step."""

    def start_task(self, t, model, theta_prev):
        self.t = t

    def inputs(self, raw, rng, gen):
        x, lam = super().inputs(raw, rng, gen)
        if self.t > 1:
            pick = rs_data.to_device(rng.choice(min(self.seen, len(self.tiles)), len(x), replace=False), x.device)
            lam = float(rng.beta(self.cfg.lump_alpha, self.cfg.lump_alpha))
            x_mem = augment(self.tiles[pick], cosmae.MODELS[self.cfg.model]["img_size"], gen)
            x = mix_batch(x, x_mem, lam)  # Eq. (2)'s form, LUMP's λ
        return x, lam

    def after_step(self, raw, rng):
        """Reservoir sampling of each batch (task 1 too): image i takes slot i, then a uniform slot of [0, i] if < M."""
        m = self.cfg.memory_size
        if self.tiles is None:
            self.tiles = torch.zeros((m, *raw.shape[1:]), dtype=torch.uint8, device=raw.device)
        seen = self.seen + np.arange(len(raw))
        slot = np.where(seen < m, seen, rng.integers(0, seen + 1))
        keep = np.flatnonzero(slot < m)
        _, last = np.unique(slot[keep][::-1], return_index=True)  # a slot drawn twice keeps the later image
        keep = keep[::-1][last]
        self.tiles[rs_data.to_device(slot[keep], raw.device)] = raw[rs_data.to_device(keep, raw.device)]
        self.seen += len(raw)

    def state_dict(self):
        return {"tiles": self.tiles, "seen": torch.tensor(self.seen)} if self.tiles is not None else {}

    def load_state_dict(self, sd):  # tiles: uint8 [M, 3, S, S] on the device: a uniform sample of the `seen` so far
        self.tiles, self.seen = sd.get("tiles"), int(sd.get("seen", 0))
        self.tiles = None if self.tiles is None else self.tiles.to(self.cfg.device)


BASELINES = {"er": ER, "ewc": EWC, "der": DER, "lump": LUMP, "pfr": PFR}


def make(cfg: BaselineConfig):  # the baseline of cfg.method; None for cosmae and finetune (cosmae.py's own path)
    return BASELINES[cfg.method](cfg) if cfg.method in BASELINES else None


def main(argv=None):  # `python baselines.py --help`: every flag; one run per seed, as cosmae.main
    def run_all():
        for cfg in runner.seed_runs(resolve(runner.parse_args(BaselineConfig, argv))):
            method = make(cfg)
            with runner.Run(cfg, method, [eval_mlknn.Evaluation(cfg)] if cfg.eval else []) as run:
                cosmae.train(cfg, run, method.step if method else cosmae.train_step)
    runner.cli(run_all)


if __name__ == "__main__":
    main()
