"""The teaching figures of WALKTHROUGH.md (Eq. 1-3, §III-C) from the project's own functions on synthetic tiles
(ASCII text: lam1 = λ1, theta_prev = θ_{t−1}; bands numbered from 0). `python -m figures [--out DIR] [--only teacher]`:
figures/*.png, under a minute on 2 CPU cores."""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cosmae
import rs_data
from reports.draw import COLORS, MASK_COLOR, as_rgb, image_grid, line_plot, small_png, upscale, vstack


def band_grey(x, band: int) -> np.ndarray:  # [3, H, W] values in [0, 1] → uint8 [H, W]: one band in grey
    return np.round(255 * np.clip(np.asarray(x, dtype=np.float64)[band], 0, 1)).astype(np.uint8)


def to_unit(x) -> np.ndarray:  # normalised images [N, 3, H, W] (rs_data.augment) → numpy values in [0, 1]
    return (x * rs_data.STD + rs_data.MEAN).clamp(0, 1).numpy()


def synth(name: str, n: int, size: int, seed: int = 0) -> torch.Tensor:  # [n, 3, size, size] uint8 tiles
    return torch.from_numpy(rs_data.synth_task(name, n, size, seed)[0])


def beta_density_figure() -> Image.Image:
    """§III-C: λ1, λ2 ~ Beta(0.4, 0.4) (density and draws of cosmae.draw_lambda) against U[0, 1]."""
    a, x = 0.4, np.linspace(0.001, 0.999, 999)
    norm = math.gamma(a) ** 2 / math.gamma(2 * a)  # B(a, a)
    pdf = x ** (a - 1) * (1 - x) ** (a - 1) / norm
    u = np.linspace(0, 0.1 ** a, 20001)  # P(λ < 0.1), with x = u^(1/a): a smooth integrand
    tail = np.trapezoid((1 - u ** (1 / a)) ** (a - 1) / a, u) / norm
    draws = cosmae.draw_lambda(np.random.default_rng(0), "beta", a, 0.5, 20000)
    heights, edges = np.histogram(draws, bins=20, range=(0, 1), density=True)
    near = [float(np.mean((draws < e) | (draws > 1 - e))) for e in (0.1, 0.2)]
    return line_plot([dict(x=edges, y=heights, bars=True, color=(205, 218, 236),
                           label="20000 draws of cosmae.draw_lambda (histogram)"),
                      dict(x=x, y=pdf, label="Beta(0.4, 0.4): the paper's lam1 and lam2", width=3, color=COLORS[0]),
                      dict(x=[0, 1], y=[1, 1], label="U[0, 1]: Fig. 2's 'uniform' ablation", dash=True, width=3,
                           color=COLORS[1])],
                     title="lam ~ Beta(0.4, 0.4) lies close to 0 or 1 far more often than lam ~ U[0, 1] "
                           "(paper Sec. III-C)",
                     note=f"P(lam < 0.1 or lam > 0.9) = {2 * tail:.2f} under Beta(0.4, 0.4) ({near[0]:.2f} of the "
                          f"draws), 0.20 under U[0, 1]; P(lam < 0.2 or lam > 0.8): {near[1]:.2f} of the draws, "
                          "0.40.\nSo a mixed image (Eq. 2) mostly looks like one of its two images, and the "
                          "teacher (Eq. 3) mostly like one of its two encoders.",
                     xlabel="lam", ylabel="density", xlim=(0, 1), ylim=(0, 4), size=(720, 420), legend="upper center")


def mixup_figure() -> Image.Image:
    """Eq. (2) with cosmae.mix_batch: a synth_green tile (the current task) and a synth_red tile (the buffer)."""
    size = rs_data.tile_size(["synth_green"], 64)  # vit_tiny's 64 x 64 images
    x = rs_data.augment(synth("synth_green", 8, size)[2:3], 64, None)
    x_mem = rs_data.augment(synth("synth_red", 8, size)[5:6], 64, None)
    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    mixed = [to_unit(cosmae.mix_batch(x, x_mem, lam))[0] for lam in lams]  # x~ [3, H, W] each, in [0, 1]
    rows = [[upscale(np.round(255 * m.transpose(1, 2, 0)).astype(np.uint8), 2) for m in mixed],
            [upscale(band_grey(m, 1), 2) for m in mixed], [upscale(band_grey(m, 0), 2) for m in mixed]]
    return image_grid(rows, ["x~ in RGB: what the MAE sees", "x~ band 1 (green): x's scene",
                             "x~ band 0 (red): x_M's scene"], [f"lam1 = {lam:g}" for lam in lams],
                      title="Data mixup, Eq. (2): x~ = lam1 * x + (1 - lam1) * x_M   (cosmae.mix_batch)",
                      subtitle="x: a tile of the current task synth_green (scene in band 1, green); x_M: a buffer "
                               "tile of the past task synth_red (scene in band 0, red).\nEvery row shows the mixed "
                               "image x~ (rows 2, 3: one band in grey, bands numbered from 0). lam1 = 1: x alone.")


def teacher_figure(steps: int = 30, n: int = 64) -> Image.Image:
    """Eq. (3): the teacher's features against θ_{t−1}'s and θ_t's as λ2 goes 0 → 1 (cosmae.MixupTeacher)."""
    cfg = cosmae.resolve(cosmae.Config(tasks=["synth_pan", "synth_red"], model="vit_tiny", mim_form="simclr",
                                       device="cpu"))
    size = rs_data.tile_size(cfg.tasks, 64)
    student = cosmae.build_model(cfg)
    for seed, task in ((1, "synth_pan"), (2, "synth_red")):  # `steps` AdamW steps of Eq. (1) alone on each task
        theta_prev = {k: v.detach().clone() for k, v in student.encoder_state_dict().items()}  # then: after task 1
        tiles, opt = synth(task, 256, size), torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        for _ in range(steps):
            raw = tiles[torch.randint(0, len(tiles), (16,), generator=gen)]
            loss = student(rs_data.augment(raw, 64, gen), 0.75)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
    teacher = cosmae.MixupTeacher(student, theta_prev)
    x = rs_data.augment(synth("synth_red", n, size, 1), 64, None)  # n unseen tiles
    lams = np.linspace(0, 1, 21)
    feats = []
    for lam in lams:
        teacher.rebuild(float(lam))
        feats.append(teacher(x))  # [N, D] teacher features c~ of the unmasked images
    prev, cur = feats[0], feats[-1]
    to_prev, to_cur = [[F.cosine_similarity(f, e).mean().item() for f in feats] for e in (prev, cur)]
    lin = [F.cosine_similarity(f, lam * cur + (1 - lam) * prev).mean().item() for f, lam in zip(feats, lams)]
    lo = math.floor(min(to_prev + to_cur) * 10) / 10 - 0.1  # room for the legend below the curves
    return line_plot([dict(x=lams, y=to_prev, label="cos(teacher, theta_prev's features)", width=3),
                      dict(x=lams, y=to_cur, label="cos(teacher, theta_t's features)", width=3),
                      dict(x=lams, y=lin, label="cos(teacher, lam2-mix of the two features)", dash=True,
                           color=(150, 150, 150))],
                     title="The teacher between two encoders, Eq. (3): theta~ = lam2 * theta_t + (1 - lam2) * "
                           "theta_prev",
                     note=f"vit_tiny. theta_prev: {steps} steps of Eq. (1) on synth_pan from the random init (the "
                          f"encoder after task 1); theta_t: {steps} more steps on synth_red\n(the student in task 2). "
                          f"Features c~ = MixupTeacher(student, theta_prev).rebuild(lam2)(x) of {n} unseen synth_red "
                          "tiles, mean cosine similarity\nto each encoder's own features. Dashed: to the lam2-mix "
                          "of the two encoders' features (near 1: mixing these weights nearly mixes the features).\n"
                          f"A toy regime: two vit_tiny encoders only {steps} Adam steps apart, so here mixing the "
                          "weights nearly mixes the features and the teacher moves smoothly\nfrom one encoder to "
                          "the other. It cannot show the paper's case: encoders a real task of training apart need "
                          "not mix their features so.",
                     xlabel="lam2", ylabel="mean cosine similarity", xlim=(0, 1), ylim=(lo, 1.0), size=(720, 500),
                     legend="lower center")


def masking_figure() -> Image.Image:
    """Eq. (1)'s input: an image, its random mask at r = 0.75, the visible patches (MAE.random_masking)."""
    cfg = cosmae.resolve(cosmae.Config(tasks=["synth_red"], model="vit_tiny", mim_form="simclr", device="cpu"))
    model = cosmae.build_model(cfg)
    x = rs_data.augment(synth("synth_red", 8, rs_data.tile_size(cfg.tasks, 64))[6:7], 64, None)
    patches = model.patchify(x)  # [1, L, p²·3]
    torch.manual_seed(0)
    kept, mask, ids_restore = model.random_masking(patches, 0.75)  # [1, len_keep, p²·3], [1, L] (1 = removed)
    visible = model.unpatchify(patches * (1 - mask[..., None]))
    k, p, g = 4, model.p, model.grid
    removed = mask[0].view(g, g).numpy().repeat(p, 0).repeat(p, 1) > 0  # [H, W]
    mask_img, vis = np.full((*removed.shape, 3), 255, np.uint8), as_rgb(band_grey(to_unit(visible)[0], 0))
    mask_img[removed], vis[removed] = MASK_COLOR, MASK_COLOR
    mask_img, vis = upscale(mask_img, k), upscale(vis, k)
    for a in (mask_img, vis):  # patch borders
        a[::p * k], a[:, ::p * k] = 200, 200
    unit = to_unit(kept[0].view(-1, p, p, 3).permute(0, 3, 1, 2))  # [len_keep, 3, p, p]: a patch is (p, q, c)
    strip = np.concatenate([np.pad(upscale(band_grey(u, 0), k), ((0, 0), (0, 4)), constant_values=255)
                            for u in unit], 1)
    n_rem, n = int(mask.sum()), mask.shape[1]
    top = image_grid([[upscale(band_grey(to_unit(x)[0], 0), k), mask_img, vis]], [],
                     ["image x (synth_red: band 0, red)", f"mask: 1 = removed (blue), {n_rem} of {n}",
                      f"visible patches: {n - n_rem} of {n}"],
                     title="Masking, Eq. (1): MAE.random_masking at mask ratio r = 0.75",
                     subtitle=f"vit_tiny: a 64 x 64 image, patch p = {p}: L = {n} patches, len_keep = "
                              f"{kept.shape[1]}. The encoder sees only the visible patches; the decoder predicts "
                              f"the\n{n_rem} removed ones, and Eq. (1) averages the squared error over those "
                              "N_r removed patches only.")
    bottom = image_grid([[strip]], [], [], subtitle=f"x_kept [1, {kept.shape[1]}, p*p*3]: the encoder's input "
                        "tokens, in the random order of ids_shuffle (ids_restore puts them back)")
    return vstack([top, bottom], gap=0)


FIGURES = dict(beta_density=beta_density_figure, mixup=mixup_figure, teacher=teacher_figure, masking=masking_figure)


def main(argv=None):
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster on a busy machine
    p = argparse.ArgumentParser(prog="python -m figures", description="Write the teaching figures of WALKTHROUGH.md.")
    p.add_argument("--out", default="figures", help="folder for the PNGs (created)")
    p.add_argument("--only", nargs="*", choices=list(FIGURES), help="only these figures")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in args.only or FIGURES:
        t0, path = time.time(), Path(args.out) / f"{name}.png"
        img = FIGURES[name]()
        small_png(img, path, 64 if name == "mixup" else 256)  # mixup: noise, 64 colours are plenty
        print(f"{path}  {img.width} x {img.height}  {path.stat().st_size // 1024} KB  ({time.time() - t0:.1f} s)")
