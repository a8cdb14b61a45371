"""The other rows of the paper's Table II (§III-D): ER, EWC, DER and PFR, built from cosmae.py's parts.

The paper names these baselines and cites their papers but gives none of their settings; the defaults below are
this implementation's (README, "Inferred choices"). Fine-tuning and LUMP are switches of CoSMAE itself
(`python cosmae.py --method finetune|lump`); this file runs every row, those two included:

    python baselines.py --method er            # any of: er ewc der pfr (and cosmae finetune lump)
    python baselines.py --method ewc --ewc-lambda 10 --seeds 0 1 2

Each baseline is attached to cosmae.train() through one seam (mammoth's design: a method is a step and an
end-of-task hook): `step` replaces cosmae.train_step, `start_task` / `end_task` run around each task, and
`state_dict` is kept in every task checkpoint. The CoSMAE path never meets any of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import cosmae
from cosmae import arg, augment, autocast, gather, pool_tokens


@dataclass
class BaselineConfig(cosmae.Config):
    method: str = arg("er", "a Table II row: er ewc der pfr, or cosmae finetune lump",
                      choices=["er", "ewc", "der", "pfr", "cosmae", "finetune", "lump"])
    replay_batch: int = arg(0, "ER and DER: buffer images per step (0 = by method: ER ⌈B/32⌉, DER ⌈B/10⌉, so that "
                               "their cost over fine-tuning is the paper's +3 % and +18 %)")
    ewc_lambda: float = arg(100.0, "EWC: penalty weight λ_EWC (not given in the paper; not tuned)")
    ewc_batches: int = arg(16, "EWC: batches used to estimate the diagonal Fisher after each task")
    der_alpha: float = arg(0.1, "DER: weight of the feature-replay MSE (LUMP's DER default)")
    pfr_weight: float = arg(1.0, "PFR: weight of the cosine regulariser (not given in the paper)")


def resolve(cfg: BaselineConfig) -> BaselineConfig:
    """cosmae.resolve (presets, switches: no data mixup and no CoSMAE teacher for these methods, checks), then
    this file's flags."""
    cfg, method = cosmae.resolve(cfg), cfg.method
    if method in ("er", "der"):
        cfg.replay_batch = cfg.replay_batch or math.ceil(cfg.batch_size / (32 if method == "er" else 10))
    rules = [("replay_batch", cfg.replay_batch >= 0, "≥ 0 (0 = by method)"),
             ("memory_size", method not in ("er", "der") or cfg.memory_size >= 1,
              f"≥ 1 for {method} (it replays the buffer)"),
             ("ewc_lambda", cfg.ewc_lambda >= 0, "≥ 0"), ("ewc_batches", cfg.ewc_batches >= 1, "≥ 1"),
             ("der_alpha", cfg.der_alpha >= 0, "≥ 0"), ("pfr_weight", cfg.pfr_weight >= 0, "≥ 0")]
    cosmae.enforce(cfg, rules)
    return cfg


class Baseline:
    """The seam of cosmae.train(): by default every hook does nothing and a step is Eq. (1) alone."""

    def __init__(self, cfg: BaselineConfig):
        self.cfg = cfg

    def start_task(self, t: int, model, theta_prev: dict):
        pass

    def end_task(self, t: int, model, tiles, buffer):
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict):
        pass

    def step(self, model, projector, teacher, opt, raw, buffer, rng, gen, cfg, mixup):
        """Eq. (1) on the augmented batch, plus the baseline's term(model, projector, x, latent, buffer, gen)."""
        x = augment(raw, cosmae.MODELS[cfg.model]["img_size"], gen)
        with autocast(cfg, x.device):
            loss_rec, _, _, latent = model(x, cfg.mask_ratio)
            extra = self.term(getattr(model, "module", model), projector, x, latent, buffer, gen)
            loss = loss_rec + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return (loss, loss_rec, extra.detach() if torch.is_tensor(extra) else torch.zeros_like(loss_rec)), 1.0, 1.0

    def term(self, model, projector, x, latent, buffer, gen):
        return 0.0


class ER(Baseline):
    """Experience replay [19]: cfg.replay_batch buffer images join every batch (task 2 on); Eq. (1) on all."""

    def step(self, model, projector, teacher, opt, raw, buffer, rng, gen, cfg, mixup):
        if len(buffer):
            raw = torch.cat([raw, buffer.sample(cfg.replay_batch, gen, raw.device)])
        return cosmae.train_step(model, projector, None, opt, raw, buffer, rng, gen, cfg, False)


class EWC(Baseline):
    """EWC [7] on the MAE loss, online form (one accumulated Fisher, anchor θ* = weights after the last task,
    inferred): after each task F += mean over batches of (∂L_Recon/∂θ)²; penalty λ/2 · Σ F·(θ − θ*)²."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fisher, self.anchor = {}, {}

    def term(self, model, projector, x, latent, buffer, gen):
        if not self.fisher:
            return 0.0
        return self.cfg.ewc_lambda / 2 * sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
                                             for n, p in model.named_parameters() if n in self.fisher)

    def end_task(self, t, model, tiles, buffer):
        cfg, img = self.cfg, cosmae.MODELS[self.cfg.model]["img_size"]
        rng, gen = np.random.default_rng([cfg.seed, 777]), torch.Generator(cfg.device).manual_seed(cfg.seed)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sq, nb = {n: torch.zeros_like(p) for n, p in params.items()}, 0
        for raw in cosmae.batches(tiles, cfg.batch_size, rng, cfg.device):
            model.zero_grad(set_to_none=True)
            model(augment(raw, img, gen), cfg.mask_ratio)[0].backward()
            grads = [p.grad for p in params.values()]
            torch._foreach_addcmul_(list(sq.values()), grads, grads)
            nb += 1
            if nb == cfg.ewc_batches:
                break
        model.zero_grad(set_to_none=True)
        self.fisher = {n: self.fisher.get(n, 0) + cosmae.all_mean(v) / nb for n, v in sq.items()}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}

    def state_dict(self):
        return {**{"fisher." + n: v for n, v in self.fisher.items()}, **{"anchor." + n: v for n, v in self.anchor.items()}}

    def load_state_dict(self, sd):
        dev = self.cfg.device
        self.fisher = {k[7:]: v.to(dev) for k, v in sd.items() if k.startswith("fisher.")}
        self.anchor = {k[7:]: v.to(dev) for k, v in sd.items() if k.startswith("anchor.")}


class DER(Baseline):
    """DER [11] as LUMP adapts it to self-supervision: the encoder features (plain resize) of each buffer image
    are stored when it enters the buffer; from task 2 on, α · MSE between the current features of
    cfg.replay_batch drawn buffer images and their stored ones."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.feats, self._flat = {}, None  # {task: float [m, D]} aligned with buffer.tiles[task] (prefixes kept)

    def term(self, model, projector, x, latent, buffer, gen):
        if not self.feats:
            return 0.0
        if self._flat is None:  # the stored features of the buffer's tiles, in buffer.flat()'s order
            self._flat = torch.cat([self.feats[k][:len(v)] for k, v in buffer.tiles.items()])
        self._flat = self._flat.to(x.device)
        idx = buffer.draw(self.cfg.replay_batch, gen, x.device)
        raw, stored = buffer.flat(x.device)[idx], self._flat[idx]
        feats = model.encode(augment(raw, x.shape[-1], None), self.cfg.pool).float()  # the view stored
        return self.cfg.der_alpha * F.mse_loss(feats, stored)

    def end_task(self, t, model, tiles, buffer):
        self.feats[t], self._flat = torch.from_numpy(cosmae.extract_features(model, buffer.tiles[t], self.cfg)), None

    def state_dict(self):
        return {f"feats{k}": v for k, v in self.feats.items()}

    def load_state_dict(self, sd):
        self.feats, self._flat = {int(k[5:]): v for k, v in sd.items()}, None


class PFR(Baseline):
    """PFR [9]: the frozen previous encoder e_{t−1} (CoSMAE's teacher at λ2 = 0, Eq. (3)) and the projector g;
    loss 1 − cos(g(c), e_{t−1}(x)), batch mean, on the same augmented image, student masked."""

    def start_task(self, t, model, theta_prev):
        self.old = None
        if t > 1:
            self.old = cosmae.MixupTeacher(model, theta_prev)
            self.old.rebuild(0.0)  # θ̃ = θ_{t−1}, fixed for the whole task

    def term(self, model, projector, x, latent, buffer, gen):
        if self.old is None:
            return 0.0
        z_old = gather(self.old.encode(x, self.cfg.pool))  # [N, D]
        p = gather(projector(pool_tokens(latent, self.cfg.pool)))  # [N, D]
        return self.cfg.pfr_weight * pfr_loss(p, z_old)


def pfr_loss(p, z_old):
    """1 − cos(g(c), e_{t−1}(x)), batch mean. p, z_old: [N, D] → scalar."""
    return 1 - F.cosine_similarity(p.float(), z_old.float(), dim=1).mean()


BASELINES = {"er": ER, "ewc": EWC, "der": DER, "pfr": PFR}


def make(cfg: BaselineConfig):
    """The baseline object of cfg.method, or None for cosmae / finetune / lump (cosmae.py's own path)."""
    return BASELINES[cfg.method](cfg) if cfg.method in BASELINES else None


def main(argv=None):
    cosmae.main(argv, BaselineConfig, resolve, make)


if __name__ == "__main__":
    main()
