"""The card's checks: each equation of the paper against a plain loop or a hand-checkable case.

Run: python -m pytest -q      (this file and tests/; CPU, tiny configs)
"""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cosmae
import rs_data
from cosmae import MAE, MODELS, Config, ReplayBuffer, mim_loss, mix_batch

ROOT = Path(__file__).resolve().parent
torch.set_num_threads(1)  # tiny models: one thread is as fast, and many times faster on a busy machine


def tiny_model(**kw) -> MAE:
    torch.manual_seed(0)
    return MAE(**{**MODELS["vit_test"], **kw})


def test_patchify_unpatchify_roundtrip():
    m, imgs = tiny_model(), torch.randn(2, 3, 32, 32)
    x = m.patchify(imgs)
    assert x.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(m.unpatchify(x), imgs)
    # patch 1 (row 0, column 1) holds pixels [:, 0:8, 8:16] in (p, q, c) order, as MAE
    assert torch.equal(x[0, 1], imgs[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))


def test_random_masking_keeps_len_keep_and_mask_marks_removed():
    m = tiny_model()
    x = torch.arange(2 * 16 * 4, dtype=torch.float).view(2, 16, 4)
    kept, mask, ids_restore = m.random_masking(x, 0.75)
    assert kept.shape == (2, 4, 4) and mask.shape == (2, 16)
    assert (mask.sum(1) == 12).all()  # 1 = removed
    for n in range(2):  # the kept rows are exactly the rows with mask 0
        kept_rows = {tuple(r.tolist()) for r in kept[n]}
        assert kept_rows == {tuple(x[n, i].tolist()) for i in range(16) if mask[n, i] == 0}
    # ids_restore undoes the shuffle: shuffled order gathered by ids_restore gives the original order
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 4))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 4)), x)


def test_reconstruction_loss_eq1_equals_loop_over_masked_patches():
    """Eq. (1): mean over the masked patches of the per-patch MSE."""
    for norm_pix in (False, True):
        m = tiny_model(norm_pix_loss=norm_pix)
        imgs, pred = torch.randn(3, 3, 32, 32), torch.randn(3, 16, 192)
        mask = (torch.rand(3, 16) < 0.75).float()
        mask[0, 0] = 1
        total, count = 0.0, 0
        for n in range(3):
            for k in range(16):
                if mask[n, k] == 1:
                    target = m.patchify(imgs)[n, k]
                    if norm_pix:
                        target = (target - target.mean()) / (target.var() + 1e-6) ** 0.5
                    total += ((pred[n, k] - target) ** 2).mean()
                    count += 1
        assert torch.allclose(m.forward_loss(imgs, pred, mask), total / count, atol=1e-6)


def test_state_dict_keys_match_facebookresearch_mae():
    m = MAE(**MODELS["vit_base"])
    keys = set(m.state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias"]
    expected |= {f"blocks.{i}.{b}" for i in range(12) for b in block}
    expected |= {f"decoder_blocks.{i}.{b}" for i in range(8) for b in block}
    assert keys == expected
    sd = m.state_dict()
    assert sd["pos_embed"].shape == (1, 197, 768) and sd["decoder_pred.weight"].shape == (768, 512)
    assert sd["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    encoder = sum(p.numel() for k, p in sd.items() if cosmae.is_encoder_key(k))
    assert encoder == 85_798_656  # timm vit_base_patch16_224 without its head


def test_sincos_pos_embed_matches_mae_formula():
    emb = cosmae.sincos_pos_embed(8, 2)[0]  # [1 + 4, 8]; cls row zero
    assert torch.equal(emb[0], torch.zeros(8))
    omega = 1 / 10000 ** (np.arange(2) / 2)
    for idx, (h, w) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        want = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
        assert np.allclose(emb[1 + idx].numpy(), want, atol=1e-6)


def mim_paper_loop(z, t, tau):
    """Eq. (4) written out term by term."""
    n, total = len(z), 0.0
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    for i in range(n):
        num = math.exp(cos(z[i], t[i]) / tau)
        den1 = sum(math.exp(cos(z[i], t[q]) / tau) for q in range(n) if q != i)
        den2 = sum(math.exp(cos(t[i], z[q]) / tau) for q in range(n) if q != i)
        total += -math.log(num / den1) - math.log(num / den2)
    return total / (2 * n)


def mim_infonce_loop(z, t, tau):
    """The same symmetric cross-view loss with the positive kept in each denominator (q over all N)."""
    n, total = len(z), 0.0
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    for i in range(n):
        num = math.exp(cos(z[i], t[i]) / tau)
        den1 = sum(math.exp(cos(z[i], t[q]) / tau) for q in range(n))
        den2 = sum(math.exp(cos(t[i], z[q]) / tau) for q in range(n))
        total += -math.log(num / den1) - math.log(num / den2)
    return total / (2 * n)


def mim_simclr_loop(z, t, tau):
    """NT-Xent over 2N embeddings, each anchor's positive is its partner, self excluded."""
    e = torch.cat([z, t])
    n2, total = len(e), 0.0
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        den = sum(math.exp(cos(e[i], e[q]) / tau) for q in range(n2) if q != i)
        total += -math.log(math.exp(cos(e[i], e[pos]) / tau) / den)
    return total / n2


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_mim_loss_eq4_three_forms_match_double_loop(tau):
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for form, loop in (("paper", mim_paper_loop), ("infonce", mim_infonce_loop), ("simclr", mim_simclr_loop)):
        assert math.isclose(mim_loss(z, t, tau, form).item(), loop(z, t, tau), rel_tol=1e-5), form


def test_mim_loss_hand_checkable_orthogonal_case():
    """g(c) = c̃ = the two unit vectors e1, e2, τ = 0.5: S_ii = 1, S_iq = 0.
    paper: each term −log(e^2 / e^0) = −2 → −2.   infonce: −log(e^2 / (e^2 + e^0)) = log(1 + e^−2).
    simclr: −log(e^2 / (e^0 + e^2 + e^0)) = log(2 + e²) − 2 (the same-side pair e1·e1' is a negative too)."""
    e = torch.eye(2)
    assert math.isclose(mim_loss(e, e, 0.5, "paper").item(), -2.0, rel_tol=1e-6)
    assert math.isclose(mim_loss(e, e, 0.5, "infonce").item(), math.log(1 + math.e ** -2), rel_tol=1e-6)
    assert math.isclose(mim_loss(e, e, 0.5, "simclr").item(), math.log(2 + math.e ** 2) - 2, rel_tol=1e-6)


def test_mixup_lambda_one_is_identity_and_eq2_is_linear():
    x, xm = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert torch.equal(mix_batch(x, xm, 1.0), x)
    assert torch.allclose(mix_batch(x, xm, 0.3), 0.3 * x + 0.7 * xm)


def test_teacher_endpoints_in_place_formula_and_no_gradients():
    """Eq. (3): λ2 = 1 → θ_t, λ2 = 0 → θ_{t−1}, any λ2 equals the out-of-place formula; the teacher and
    θ_{t−1} never get gradients, and the student is left untouched by the rebuild."""
    student = tiny_model()
    theta_prev = {k: v.clone() + torch.randn_like(v) for k, v in student.state_dict().items()
                  if cosmae.is_encoder_key(k)}
    teacher = cosmae.MixupTeacher(student, theta_prev)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    mixed_ptrs = [p.data_ptr() for p in teacher.mixed]
    for lam2 in (1.0, 0.0, 0.3):
        teacher.rebuild(lam2)
        for k, p in teacher.net.named_parameters():
            if cosmae.is_encoder_key(k):
                want = lam2 * before[k] + (1 - lam2) * theta_prev[k]
                assert torch.allclose(p, want, atol=1e-6), k
    assert [p.data_ptr() for p in teacher.mixed] == mixed_ptrs  # rebuilt in place, no new tensors
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert not any(p.requires_grad for p in teacher.net.parameters())
    proj = cosmae.make_projector(48, 16)  # one real CoSMAE step (lr 0: the weights stay, the gradients are kept)
    cfg = cosmae.resolve(Config(model="vit_test", tasks=["synth_red"], lr=0.0))
    buf = ReplayBuffer(8)
    buf.add_task(1, np.random.default_rng(0).integers(0, 255, (8, 3, 37, 37), dtype=np.uint8), np.random.default_rng(0))
    raw = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (4, 3, 37, 37), dtype=np.uint8))
    (loss, _, loss_mim), _, lam2 = cosmae.train_step(student, proj, teacher, cosmae.make_optimizer(student, proj, cfg),
                                                     raw, buf, np.random.default_rng(0), torch.Generator(), cfg, True)
    assert loss_mim.item() != 0 and 0 <= lam2 <= 1
    assert all(p.grad is None for p in teacher.net.parameters())
    assert all(not v.requires_grad and v.grad is None for v in theta_prev.values())
    assert student.blocks[0].attn.qkv.weight.grad is not None and proj[0].weight.grad is not None
    want = {k: lam2 * before[k] + (1 - lam2) * theta_prev[k] for k in theta_prev}  # the step's own teacher
    assert all(torch.allclose(p, want[k], atol=1e-6) for k, p in teacher.net.named_parameters() if k in want)


def test_buffer_is_balanced_across_past_tasks():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(10)
    tasks = {t: np.full((40, 3, 2, 2), t, np.uint8) for t in (1, 2, 3)}
    for t in (1, 2, 3):
        tasks[t][:, 1] = np.arange(40)[:, None, None]  # channel 1 = index of the image in its task
        buf.add_task(t, tasks[t], rng)
        assert sorted(buf.tiles) == list(range(1, t + 1))
        assert all(len(v) == 10 // t for v in buf.tiles.values()), {k: len(v) for k, v in buf.tiles.items()}
        assert all((v[:, 0] == k).all() for k, v in buf.tiles.items())  # each share holds its own task
        assert all(len(set(v[:, 1, 0, 0].tolist())) == len(v) for v in buf.tiles.values())  # no repeats
    assert len(buf) == 9
    draws = buf.sample(3000, torch.Generator().manual_seed(0), "cpu")[:, 0, 0, 0]
    counts = torch.bincount(draws.long(), minlength=4)[1:]
    assert (counts > 850).all(), counts  # uniform over the buffer = equal share per past task
    restored = ReplayBuffer(10)
    restored.load_state_dict(buf.state_dict())
    assert all(torch.equal(restored.tiles[k], v) for k, v in buf.tiles.items())


def test_buffer_prefix_is_uniform_sample_of_the_task():
    """Rebalancing keeps a prefix of a randomly ordered uniform sample: images of every part of the task."""
    firsts = []
    for seed in range(200):
        buf = ReplayBuffer(4)
        buf.add_task(1, np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), np.random.default_rng(seed))
        buf.add_task(2, np.zeros((10, 1, 1, 1), np.uint8), np.random.default_rng(seed))
        firsts += buf.tiles[1].flatten().tolist()
    assert 35 < np.mean(firsts) < 65  # a sorted prefix would be biased to low indices (mean ≈ 20)


def test_synthetic_labels_are_what_is_drawn_and_colour_is_jittered():
    dom = dict(rs_data.SYNTH_DOMAINS["synth_city"])
    rng = np.random.default_rng(0)
    none = [rs_data.synth_image(rng, 40, **dict(dom, p=(0,) * 5)) for _ in range(4)]
    assert all(y.sum() == 0 for _, y in none)  # nothing drawn: only the ground, with a low-frequency shading
    assert all(y.sum() == 5 for _, y in (rs_data.synth_image(rng, 40, **dict(dom, p=(1,) * 5)) for _ in range(4)))
    only_water = dict(dom, p=(0, 0, 0, 1, 0), noise=0.0)  # water covers 30-70 % of the tile
    spread = {j: np.std([rs_data.synth_image(np.random.default_rng(i), 40, **only_water, jitter=j)[0].mean((0, 1))
                         for i in range(40)], axis=0).mean() for j in (0.0, 0.5)}
    assert spread[0.5] > 4 * spread[0.0]  # the default jitter makes an element's colour vary from image to image


def test_each_sensor_records_the_scene_in_its_own_band_and_noise_elsewhere():
    """One-band sensors: the scene's brightness in their band, noise around grey in the two others; the
    panchromatic one: the brightness in every band plus noise whose mean over the bands is zero."""
    b = np.full((200, 16, 16), 100.0, np.float32)
    b[:, :8] = 160.0  # a bright half
    for k in range(3):
        x = rs_data.sense(b, k, np.random.default_rng(0), noise=60.0).astype(np.float32)
        assert np.array_equal(x[:, k], b)
        others = x[:, [c for c in range(3) if c != k]]
        assert abs(others.mean() - 128) < 2 and 55 < others.std() < 61  # white noise (std 60, barely clipped)
        assert abs(others[:, :, :8].mean() - others[:, :, 8:].mean()) < 2  # the scene is not in them
    pan = rs_data.sense(b, None, np.random.default_rng(0), noise=20.0).astype(np.float32)
    assert np.allclose(pan.mean(1), b, atol=1.0) and pan.std(1).mean() > 15  # colour noise across the bands
    x, y = rs_data.synth_task("synth_green", 6, 40, 3)
    assert x.shape == (6, 3, 40, 40) and x.dtype == np.uint8 and y.shape == (6, 5)
    assert np.array_equal(x, rs_data.synth_task("synth_green", 6, 40, 3)[0])  # deterministic


def test_augment_crop_flip_and_plain_resize():
    tiles = torch.zeros(64, 3, 36, 36, dtype=torch.uint8)
    tiles[:, :, :, 18:] = 255  # left half black, right half white
    x = rs_data.augment(tiles, 32, torch.Generator().manual_seed(0))
    assert x.shape == (64, 3, 32, 32)
    white = (1 - rs_data.MEAN[0, 0, 0, 0]) / rs_data.STD[0, 0, 0, 0]
    right_white = x[:, 0, :, -1] > white - 0.05  # the right column white = not flipped
    left_white = x[:, 0, :, 0] > white - 0.05
    assert (right_white.all(1) ^ left_white.all(1)).all()  # every sample is either flipped or not
    assert 15 < right_white.all(1).sum() < 49  # about half flipped
    plain = rs_data.augment(tiles[:2], 32, None)
    want = F.interpolate(tiles[:2].float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    want = (want - rs_data.MEAN) / rs_data.STD
    assert torch.allclose(plain, want, atol=1e-5)


def test_lr_schedule_warmup_then_cosine():
    assert cosmae.lr_at(0, 100, 10, 1.0) == 0 and math.isclose(cosmae.lr_at(5, 100, 10, 1.0), 0.5)
    assert math.isclose(cosmae.lr_at(10, 100, 10, 1.0), 1.0) and math.isclose(cosmae.lr_at(55, 100, 10, 1.0), 0.5)
    assert cosmae.lr_at(100, 100, 10, 1.0) < 1e-12


def test_optimizer_no_weight_decay_on_biases_and_norms():
    m, proj = tiny_model(), cosmae.make_projector(48, 16)
    opt = cosmae.make_optimizer(m, proj, Config(weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is m.norm.weight for p in no_decay["params"])
    assert any(p is m.blocks[0].attn.qkv.bias for p in no_decay["params"])
    assert any(p is proj[0].weight for p in decay["params"])
    assert not any(p is m.pos_embed for g in opt.param_groups for p in g["params"])  # fixed sin-cos


def test_every_equation_tag_is_indexed():
    src = Path(cosmae.__file__).read_text()
    doc, body = src.split('"""', 2)[1], src.split('"""', 2)[2]
    tagged = set(re.findall(r"# Eq\. \((\d)\)", body))
    indexed = set(re.findall(r"Eq\. \((\d)\)", doc))
    assert tagged == indexed == {"1", "2", "3", "4", "5"}


def test_default_eq4_is_simclr_nt_xent():
    assert Config().mim_form == "simclr"
