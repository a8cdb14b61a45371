"""The teaching figures of WALKTHROUGH.md (Eq. 1-3, §III-C), drawn by the project's own functions on synthetic
tiles (ASCII labels: lam1 = λ1, theta_prev = θ_{t−1}; bands from 0). `python -m figures [--out DIR] [--only NAME]`."""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cosmae
import rs_data
import runner
from reports.draw import COLORS, MASK_COLOR, as_rgb, image_grid, line_plot, small_png, upscale


def to_uint8(x) -> np.ndarray:  # a normalised image [1, 3, H, W] (rs_data.augment) → uint8 [H, W, 3]; [..., b]: band b
    return np.round(255 * (x * rs_data.STD + rs_data.MEAN).clamp(0, 1)[0].permute(1, 2, 0).numpy()).astype(np.uint8)


def synth(name: str, n: int, seed: int = 0) -> torch.Tensor:  # [n, 3, S, S] uint8 tiles for vit_tiny's 64 x 64 images
    return torch.from_numpy(rs_data.synth_task(name, n, rs_data.tile_size([name], 64), seed)[0])


def beta_density_figure():
    """§III-C: λ1, λ2 ~ Beta(0.4, 0.4) (density and draws of cosmae.draw_lambda) against U[0, 1]."""
    x, draws = np.linspace(0.001, 0.999, 999), cosmae.draw_lambda(np.random.default_rng(0), "beta", 0.4, 0.5, 20000)
    norm = math.gamma(0.4) ** 2 / math.gamma(0.8)  # B(0.4, 0.4)
    u = np.linspace(0, 0.1 ** 0.4, 20001)  # P(lam < 0.1) with lam = u ** 2.5: a smooth integrand
    tail = np.trapezoid((1 - u ** 2.5) ** -0.6 / 0.4, u) / norm
    heights, edges = np.histogram(draws, bins=20, range=(0, 1), density=True)
    near = [float(np.mean((draws < e) | (draws > 1 - e))) for e in (0.1, 0.2)]
    return line_plot([dict(x=edges, y=heights, bars=True, color=(205, 218, 236), label="20000 cosmae.draw_lambda"),
                      dict(x=x, y=(x * (1 - x)) ** -0.6 / norm, label="Beta(0.4, 0.4): lam1, lam2", width=3, color=COLORS[0]),
                      dict(x=[0, 1], y=[1, 1], label="U[0, 1]: Fig. 2 ablation", dash=True, width=3, color=COLORS[1])],
                     title="lam ~ Beta(0.4, 0.4) lies close to 0 or 1 far more often than lam ~ U[0, 1] (Sec. III-C)",
                     note=f"P(lam < 0.1 or > 0.9) = {2 * tail:.2f} under Beta(0.4, 0.4) "
                          f"({near[0]:.2f} of the draws), 0.20 under U[0, 1]; < 0.2 or > 0.8: {near[1]:.2f} and 0.40.",
                     xlabel="lam", ylabel="density", xlim=(0, 1), ylim=(0, 4), size=(720, 420), legend="upper center")


def mixup_figure():
    """Eq. (2) with cosmae.mix_batch: a synth_green tile (the current task) and a synth_red tile (the buffer)."""
    x, x_mem, lams = synth("synth_green", 8)[2:3], synth("synth_red", 8)[5:6], [0.0, 0.25, 0.5, 0.75, 1.0]
    x, x_mem = rs_data.augment(x, 64, None), rs_data.augment(x_mem, 64, None)
    mixed = [upscale(to_uint8(cosmae.mix_batch(x, x_mem, lam)), 2) for lam in lams]  # x~ [H, W, 3] each
    return image_grid([mixed, [m[..., 1] for m in mixed], [m[..., 0] for m in mixed]],
                      ["x~ in RGB: what the MAE sees", "x~ band 1 (green): x's scene", "x~ band 0 (red): x_M's scene"],
                      [f"lam1 = {lam:g}" for lam in lams],
                      title="Data mixup, Eq. (2): x~ = lam1 * x + (1 - lam1) * x_M   (cosmae.mix_batch)",
                      subtitle="x: a tile of the current task synth_green (scene in band 1); x_M: a buffer tile of "
                               "the past task synth_red (scene in band 0).\nRows 2, 3: one band of x~ in grey.")


def teacher_figure(steps: int = 30, n: int = 64):
    """Eq. (3): the teacher's features against θ_{t−1}'s and θ_t's as λ2 goes 0 → 1 (cosmae.MixupTeacher)."""
    student = cosmae.build_model(cosmae.resolve(cosmae.Config(tasks=["synth_pan"], model="vit_tiny", device="cpu")))
    for seed, task in ((1, "synth_pan"), (2, "synth_red")):  # `steps` AdamW steps of Eq. (1) alone on each task
        theta_prev = {k: v.clone() for k, v in student.encoder_state_dict().items()}  # then: after task 1
        tiles, opt = synth(task, 256), torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95))
        gen = torch.manual_seed(seed)  # the global generator: crops and masks alike
        for _ in range(steps):
            loss = student(rs_data.augment(tiles[torch.randint(0, len(tiles), (16,), generator=gen)], 64, gen), 0.75)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
    teacher, x = cosmae.MixupTeacher(student, theta_prev), rs_data.augment(synth("synth_red", n, 1), 64, None)
    lams, feats = np.linspace(0, 1, 21), []  # feats: [N, D] teacher features c~ of the unmasked images at each lam2
    for lam in lams:
        teacher.rebuild(float(lam))
        feats.append(teacher(x))
    to_prev, to_cur = [[F.cosine_similarity(f, e).mean().item() for f in feats] for e in (feats[0], feats[-1])]
    lin = [F.cosine_similarity(f, lam * feats[-1] + (1 - lam) * feats[0]).mean().item() for f, lam in zip(feats, lams)]
    return line_plot([dict(x=lams, y=to_prev, label="cos(teacher, theta_prev's features)", width=3),
                      dict(x=lams, y=to_cur, label="cos(teacher, theta_t's features)", width=3),
                      dict(x=lams, y=lin, label="cos(teacher, lam2-mix of the two)", dash=True, color=(150, 150, 150))],
                     title="The teacher between two encoders, Eq. (3): theta~ = lam2 theta_t + (1 - lam2) theta_prev",
                     note=f"vit_tiny: theta_prev after {steps} steps of Eq. (1) on synth_pan, theta_t {steps} more on "
                          f"synth_red; MixupTeacher(student, theta_prev).rebuild(lam2) on {n} unseen synth_red tiles.\n"
                          "A toy regime: encoders a whole task of training apart need not mix their features so.",
                     xlabel="lam2", ylabel="mean cosine similarity", xlim=(0, 1), size=(720, 500),
                     ylim=(np.floor(min(to_prev + to_cur) * 10) / 10 - 0.1, 1.0), legend="lower center")


def masking_figure():
    """Eq. (1)'s input: an image, its random mask at r = 0.75, the visible patches (MAE.random_masking)."""
    model = cosmae.build_model(cosmae.resolve(cosmae.Config(tasks=["synth_red"], model="vit_tiny", device="cpu")))
    x = rs_data.augment(synth("synth_red", 8)[6:7], 64, None)
    patches, k, p, g = model.patchify(x), 4, model.p, model.grid  # [1, L, p²·3]
    torch.manual_seed(0)
    kept, mask, _ = model.random_masking(patches, 0.75)  # [1, len_keep, p²·3], [1, L] (1 = removed)
    removed = mask[0].view(g, g).numpy().repeat(p, 0).repeat(p, 1)[..., None] > 0  # [H, W, 1]
    vis = as_rgb(to_uint8(model.unpatchify(patches * (1 - mask[..., None])))[..., 0])  # band 0 of the visible patches
    mask_img, vis = (upscale(np.where(removed, MASK_COLOR, a).astype(np.uint8), k) for a in (255, vis))
    for a in (mask_img, vis):  # patch borders
        a[::p * k], a[:, ::p * k] = 200, 200
    n_rem, n = int(mask.sum()), mask.shape[1]
    return image_grid([[upscale(to_uint8(x)[..., 0], k), mask_img, vis]], [],
                      ["image x (synth_red: band 0, red)", f"mask: 1 = removed (blue), {n_rem} of {n}",
                       f"visible patches: {n - n_rem} of {n}"],
                      title="Masking, Eq. (1): MAE.random_masking at mask ratio r = 0.75",
                      subtitle=f"vit_tiny, 64 x 64, p = {p}: L = {n} patches. The encoder's input x_kept [1, "
                               f"{kept.shape[1]}, p*p*3]: the visible patches in ids_shuffle's random order.\nEq. (1) "
                               f"averages the squared error over the {n_rem} removed patches (N_r) only.")


FIGURES = dict(beta_density=beta_density_figure, mixup=mixup_figure, teacher=teacher_figure, masking=masking_figure)


def main(argv=None):
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster on a busy machine
    p = runner.ArgumentParser(prog="python -m figures", description="Write the teaching figures of WALKTHROUGH.md.")
    p.add_argument("--out", default="figures", type=Path, help="folder for the PNGs (created)")
    p.add_argument("--only", nargs="*", choices=list(FIGURES), help="only these figures")
    args = p.parse_args(argv)
    if not rs_data.writable(args.out):  # checked before the work
        p.error(f"--out {args.out}: cannot write there; name a writable folder")
    for name in args.only or FIGURES:
        img, path = FIGURES[name](), args.out / f"{name}.png"
        small_png(img, path, 64 if name == "mixup" else 256)  # mixup: noise, 64 colours are plenty
        print(f"{path}  {img.width} x {img.height}  {path.stat().st_size // 1024} KB")
