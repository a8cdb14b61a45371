"""Tests that read like the specification: each equation against a plain loop or a hand-checkable case.

Run: python -m pytest -q      (CPU, tiny configs)
"""
import ast
import contextlib
import errno
import io
import json
import math
import multiprocessing
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import baselines
import cosmae
import draw
import eval_mlknn
import figures
import rs_data
import runner
from cosmae import MAE, MODELS, Config, ReplayBuffer, mim_loss, mix_batch
from rs_data import DataError

ROOT = Path(__file__).resolve().parent


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


@pytest.fixture
def small_eval(monkeypatch):
    """Small synthetic evaluation sets, so that runs with evaluation stay quick."""
    monkeypatch.setattr(rs_data, "SYNTH_EVAL", dict(own=60, train=60, test=40))
    monkeypatch.setattr(rs_data, "REC_TILES", 24)


def tiny_model(**kw) -> MAE:
    torch.manual_seed(0)
    return MAE(**{**MODELS["vit_test"], **kw})


# --- MAE ---------------------------------------------------------------------------------------------------

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
    assert sum(p.numel() for k, p in sd.items() if cosmae.is_encoder_key(k)) == 85_798_656  # timm vit_base_patch16_224 without head


def test_sincos_pos_embed_matches_mae_formula():
    emb = cosmae.sincos_pos_embed(8, 2)[0]  # [1 + 4, 8]; cls row zero
    assert torch.equal(emb[0], torch.zeros(8))
    omega = 1 / 10000 ** (np.arange(2) / 2)
    for idx, (h, w) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        want = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
        assert np.allclose(emb[1 + idx].numpy(), want, atol=1e-6)


# --- CoSMAE components -------------------------------------------------------------------------------------

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
    theta_prev = {k: v.clone() + torch.randn_like(v) for k, v in student.state_dict().items() if cosmae.is_encoder_key(k)}
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


def test_task_eval_labels_are_the_elements_in_the_images(small_eval):
    """A task's own evaluation labels are the elements drawn in its own images (its own sensor): the labels
    come with the scenes, and the images are those scenes seen by the task's sensor."""
    size = 24
    own = rs_data.synth_task_eval("synth_blue", size)
    (x, y), (xt, yt) = own["train"], own["test"]
    assert len(x) == len(xt) == 60 and not np.array_equal(x, xt)
    scenes, labels = rs_data.synth_scenes(120, size, (rs_data.DATA_SEED + 1000) * 10 + 3)  # task 4: blue band
    assert np.array_equal(np.concatenate([y, yt]), labels)
    assert np.array_equal(np.concatenate([x, xt])[:, 2], np.clip(scenes, 0, 255).astype(np.uint8))
    main = rs_data.synthetic_eval_set(size, ["synth_pan", "synth_red"])
    assert len(main["train"][0]) == 60 and len(main["test"][0]) == 40 and main["labels"] == list(rs_data.SYNTH_LABELS)


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
    want = (F.interpolate(tiles[:2].float() / 255, size=(32, 32), mode="bilinear", antialias=True) - rs_data.MEAN) / rs_data.STD
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
    assert any(p is m.norm.weight for p in no_decay["params"]) and any(p is m.blocks[0].attn.qkv.bias for p in no_decay["params"])
    assert any(p is proj[0].weight for p in decay["params"])
    assert not any(p is m.pos_embed for g in opt.param_groups for p in g["params"])  # fixed sin-cos


def test_every_equation_tag_is_indexed():
    src = Path(cosmae.__file__).read_text()
    doc, body = src.split('"""', 2)[1], src.split('"""', 2)[2]
    tagged = set(re.findall(r"# Eq\. \((\d)\)", body))
    indexed = set(re.findall(r"Eq\. \((\d)\)", doc))
    assert tagged == indexed == {"1", "2", "3", "4", "5"}


# --- training loop -----------------------------------------------------------------------------------------

def encoder_of(path):
    return torch.load(path, weights_only=True)["encoder"]


def records(run):
    return [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]


def test_train_two_tiny_tasks_writes_checkpoints_and_finite_losses(tmp_path):
    cfg = tiny_cfg(tmp_path)
    result = train(cfg)
    names = [p.name for p in result["checkpoints"]]
    assert names == ["task1_synth_red.pt", "task2_synth_green.pt"]
    recs = records(tmp_path / "run")
    assert {"loss/rec", "loss/mim", "loss/total", "lam1", "lam2", "img/s", "lr", "data_wait"} <= set(recs[0])
    assert all(0 <= r["data_wait"] <= 1 for r in recs)
    assert all(math.isfinite(r["loss/total"]) for r in recs)
    t1, t2 = [r for r in recs if r["task"] == 1], [r for r in recs if r["task"] == 2]
    assert all(r["lam1"] == 1 and r["lam2"] == 1 and r["loss/mim"] == 0 for r in t1)  # task 1: Eq. (1) alone
    assert any(r["loss/mim"] != 0 for r in t2) and any(r["lam1"] != 1 for r in t2)
    ck = torch.load(result["checkpoints"][1], weights_only=True)
    assert set(ck) >= {"encoder", "model", "projector", "buffer"}
    assert sum(len(v) for v in ck["buffer"].values()) == 20  # M = 20: 10 + 10 after two tasks
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "vit_test"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] == 2 and summary["train_seconds"] > 0


def test_data_wait_is_the_share_of_the_time_the_loop_waited_for_batches(tmp_path, monkeypatch):
    real = rs_data.batches

    def slow(*a, **k):  # a reader that needs 0.25 s a batch, far longer than a vit_test step
        for raw in real(*a, **k):
            time.sleep(0.25)
            yield raw

    monkeypatch.setattr(rs_data, "batches", slow)
    train(tiny_cfg(tmp_path, tasks=["synth_red"]))
    recs = records(tmp_path / "run")
    assert len(recs) == 2 and all(r["data_wait"] > 0.6 for r in recs)
    assert all(r["img/s"] < 2 * 8 / 0.25 for r in recs)  # 8 images a batch, one batch every ≥ 0.25 s


def test_no_mixing_on_first_task(tmp_path, monkeypatch):
    calls = []
    real = cosmae.mix_batch
    monkeypatch.setattr(cosmae, "mix_batch", lambda *a: calls.append(1) or real(*a))
    train(tiny_cfg(tmp_path, tasks=["synth_red"]))
    assert calls == []
    train(tiny_cfg(tmp_path, out=str(tmp_path / "two")))
    assert len(calls) == 4  # every step of task 2: 32 images / batch 8


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = train(tiny_cfg(tmp_path, out=str(tmp_path / "a")))["checkpoints"][-1]
    b = train(tiny_cfg(tmp_path, out=str(tmp_path / "b")))["checkpoints"][-1]
    c = train(tiny_cfg(tmp_path, out=str(tmp_path / "c"), seed=1))["checkpoints"][-1]
    ea, eb, ec = encoder_of(a), encoder_of(b), encoder_of(c)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not all(torch.equal(ea[k], ec[k]) for k in ea)


def test_resume_after_interrupted_run_equals_uninterrupted_and_logs_each_step_once(tmp_path, monkeypatch):
    full = train(tiny_cfg(tmp_path, out=str(tmp_path / "full"), epochs=2, save_every=1, log_every=1))
    real_step = torch.optim.AdamW.step
    count = {"n": 0}

    def crash_in_task2_epoch2(self, *a, **k):  # 4 steps per epoch: crash on the 3rd step of epoch 2 of task 2
        count["n"] += 1
        if count["n"] == 8 + 4 + 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_in_task2_epoch2)
    cfg = tiny_cfg(tmp_path, out=str(tmp_path / "cut/"), epochs=2, save_every=1, log_every=1)  # the same folder
    run = runner.Run(cfg)
    with pytest.raises(KeyboardInterrupt), run:
        cosmae.train(cfg, run)
    assert run.where == "in task 2 (synth_green), epoch 2, step 6"
    run = tmp_path / "cut"
    assert (run / "task1_synth_red.pt").exists() and not (run / "task2_synth_green.pt").exists()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert len(records(run)) == 8 + 4 + 2  # logged before the crash, the last two steps to be replayed
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"task": 2, "st')  # and a record torn by the crash
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = train(tiny_cfg(tmp_path, out=str(tmp_path / "cut"), epochs=2, save_every=1, log_every=1))
    e_full, e_cut = encoder_of(full["checkpoints"][-1]), encoder_of(resumed["checkpoints"][-1])
    assert all(torch.equal(e_full[k], e_cut[k]) for k in e_full)
    assert not (run / "last.pt").exists()
    steps = [(r["task"], r["step"]) for r in records(run)]
    assert steps == [(r["task"], r["step"]) for r in records(tmp_path / "full")]  # each step once, in order


def test_resume_refuses_another_training_configuration_not_another_path_spelling(tmp_path):
    train(tiny_cfg(tmp_path, tasks=["synth_red"]))
    with pytest.raises(rs_data.DataError, match="other settings.*beta"):
        train(tiny_cfg(tmp_path, tasks=["synth_red"], beta=0.5))
    train(tiny_cfg(tmp_path, tasks=["synth_red"], log_every=5, data_root="x"))  # finished: nothing to do, accepted
    cosmae.main(TINY + ["--tasks", "synth_red", "--out", str(tmp_path / "run") + "/", "--warmup-epochs", "0.5"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["out"] == str(tmp_path / "run")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "task1_x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(rs_data.DataError, match="corrupt"):
        runner.load_checkpoint(bad)


@pytest.mark.parametrize("cli", [cosmae.main, baselines.main, eval_mlknn.main])
def test_help_of_every_cli(cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0 and "--" in capsys.readouterr().out


def test_unknown_task_name_exits_2_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        cosmae.main(["--tasks", "us3d", "mars"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown task" in err and "mars" in err and "Traceback" not in err


def test_seeds_flag_runs_one_folder_per_seed(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cosmae, "train", lambda cfg, run: seen.append((cfg.seed, cfg.out, str(run.out))))
    cosmae.main(["--tasks", "synth_red", "--seeds", "0", "2", "--out", str(tmp_path / "r")])
    assert seen == [(0, f"{tmp_path}/r/seed0", f"{tmp_path}/r/seed0"), (2, f"{tmp_path}/r/seed2", f"{tmp_path}/r/seed2")]


# --- evaluation after every task: both mAP kinds, accuracy matrix A, reconstruction matrix R, pictures -------

def test_forgetting_and_bwt_of_a_hand_checkable_matrix():
    """Rows: init, after T1, T2, T3; columns: tasks 1-3.
    final avg = (60 + 50 + 90) / 3 = 66.67.
    forgetting: task 1: max(A[1][1], A[2][1]) − A[3][1] = max(70, 80) − 60 = 20; task 2: A[2][2] − A[3][2] = 60 − 50
    = 10 → 15.   BWT: task 1: A[3][1] − A[1][1] = 60 − 70 = −10; task 2: 50 − 60 = −10 → −10."""
    a = [[10, 10, 10], [70, 20, 20], [80, 60, 30], [60, 50, 90]]
    r = eval_mlknn.forgetting_bwt(a)
    assert math.isclose(r["final_avg_map"], 200 / 3) and r["avg_forgetting"] == 15 and r["bwt"] == -10
    assert eval_mlknn.forgetting_bwt([[1.0], [2.0]]) == dict(final_avg_map=2.0, avg_forgetting=None, bwt=None)
    up = eval_mlknn.forgetting_bwt([[0, 0], [50, 0], [60, 70]])  # task 1 improved later: forgetting < 0, BWT > 0
    assert up["avg_forgetting"] == -10 and up["bwt"] == 10


def test_run_evaluates_every_task_both_map_kinds_matrices_and_pictures(tmp_path, small_eval):
    cfg = tiny_cfg(tmp_path, eval=True, tasks=["synth_red", "synth_green", "synth_blue"])
    rows = train(cfg)["eval"]
    assert [r["task"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert {"micro", "macro", "micro_binary", "macro_binary"} <= set(r)
        assert len(r["per_task"]) == 3 and len(r["rec_loss"]) == 3  # A[t][·], R[t][·]: one column per task
        assert all(0 <= v <= 100 for v in r["per_task"]) and all(v > 0 for v in r["rec_loss"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    want = eval_mlknn.forgetting_bwt([r["per_task"] for r in rows])
    assert all(math.isclose(summary[k], want[k]) for k in ("final_avg_map", "avg_forgetting", "bwt"))
    from PIL import Image
    for t in range(4):
        w, h = Image.open(tmp_path / "run" / f"reconstructions_T{t}.png").size
        assert h == 3 * 32 * 8 and w == 6 * 32 * 8  # a row per task, 2 × (original, masked, reconstruction)
    again = train(tiny_cfg(tmp_path, eval=True, tasks=["synth_red", "synth_green", "synth_blue"],
                                  out=str(tmp_path / "again")))["eval"]
    assert [r["rec_loss"] for r in again] == [r["rec_loss"] for r in rows]  # R is reproducible under a seed


def test_reconstruction_loss_uses_fixed_masks(small_eval):
    cfg = cosmae.resolve(Config(model="vit_test", device="cpu"))
    model, tiles = cosmae.build_model(cfg), rs_data.synth_task("synth_red", 10, 37, 0)[0]
    torch.manual_seed(1)
    a = eval_mlknn.reconstruct(model, tiles, cfg.mask_ratio)
    torch.manual_seed(2)  # whatever the global RNG: the same masks
    b = eval_mlknn.reconstruct(model, tiles, cfg.mask_ratio)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[1].shape == (32, 6 * 32, 3)
    assert eval_mlknn.reconstruct(model, tiles, cfg.mask_ratio, seed=5)[0] != a[0]


def test_a_rerun_with_eval_fills_the_missing_rows(tmp_path, small_eval):
    train(tiny_cfg(tmp_path))  # trained without evaluation
    rows = train(tiny_cfg(tmp_path, eval=True))["eval"]  # the same run, rerun with --eval
    assert [r["task"] for r in rows] == [0, 1, 2]
    fresh = train(tiny_cfg(tmp_path, eval=True, out=str(tmp_path / "fresh")))["eval"]
    for a, b in zip(rows, fresh):
        assert math.isclose(a["micro"], b["micro"]) and a["rec_loss"] == pytest.approx(b["rec_loss"])


# --- Table II baselines: cosmae.py's switches and baselines.py ----------------------------------------------

@pytest.mark.parametrize("method", ["cosmae", "finetune", "er", "ewc", "der", "lump", "pfr"])
def test_each_method_runs_two_tiny_tasks_with_finite_losses(tmp_path, method):
    res = train(tiny_cfg(tmp_path, method=method, out=str(tmp_path / method)))
    recs = records(tmp_path / method)
    assert len(res["checkpoints"]) == 2 and all(math.isfinite(r["loss/total"]) for r in recs)
    t2 = [r for r in recs if r["task"] == 2]
    if method in ("finetune", "er", "lump"):
        assert all(r["loss/mim"] == 0 for r in t2)
    elif method in ("cosmae", "pfr"):  # distillation from the first step of task 2
        assert all(r["loss/mim"] != 0 for r in t2)
    else:  # EWC's penalty and DER's MSE are 0 until the weights leave those of the end of task 1
        assert t2[0]["loss/mim"] == 0 and t2[-1]["loss/mim"] > 0
    assert all(r["lam1"] == 1 for r in t2) == (method not in ("cosmae", "lump"))


def test_baselines_cli_runs_a_row_and_cosmae_has_no_baseline_code(tmp_path, capsys):
    baselines.main(["--method", "er", "--tasks", "synth_red", "synth_green", "--model", "vit_test", "--epochs", "1",
                    "--batch-size", "8", "--synth-train", "32", "--memory-size", "20", "--no-eval", "--device", "cpu",
                    "--out", str(tmp_path / "er")])
    assert json.loads((tmp_path / "er" / "config.json").read_text())["replay_batch"] == 1  # ⌈0.045·8⌉
    tree = ast.parse(Path(cosmae.__file__).read_text())
    names = {getattr(n, k) for n in ast.walk(tree) for k in ("id", "attr", "name", "arg")
             if isinstance(getattr(n, k, None), str)}
    assert not [n for n in names if re.search(r"ewc|pfr|^der($|_)|lump|reservoir|replay_batch|fisher", n.lower())]
    code = "import sys, cosmae; assert 'baselines' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_method_switches_match_table_one_and_two():
    cfg = lambda **kw: cosmae.resolve(Config(model="vit_test", **kw))
    assert (cfg(method="finetune").data_mixup, cfg(method="finetune").model_mixup) == (False, False)
    assert (cfg(model_mixup=False).data_mixup, cfg(model_mixup=False).model_mixup) == (True, False)  # Table I
    ablation = cfg(data_mixup=False)  # Table I row "model-mixup KD only"
    assert not ablation.data_mixup and ablation.model_mixup
    for m in ("er", "ewc", "der", "lump", "pfr"):  # the other rows: their own terms, none of CoSMAE's
        b = baselines.resolve(baselines.BaselineConfig(model="vit_test", method=m))
        assert not b.data_mixup and not b.model_mixup
    replay = lambda m: baselines.resolve(baselines.BaselineConfig(method=m, batch_size=128)).replay_batch
    assert (replay("er"), replay("der")) == (6, 18)  # ⌈0.045·128⌉, ⌈0.14·128⌉


def test_ewc_penalty_zero_at_anchor_and_grows_with_distance(tmp_path):
    m = tiny_model()
    ewc = baselines.EWC(tiny_cfg(tmp_path, method="ewc", ewc_batches=2))
    ewc.end_task(1, m, np.random.default_rng(0).integers(0, 255, (16, 3, 36, 36), dtype=np.uint8), None)
    assert all((f >= 0).all() for f in ewc.fisher.values()) and sum(f.sum() for f in ewc.fisher.values()) > 0
    penalty = lambda: float(torch.as_tensor(ewc.term(m, None, None, None, None, None)).detach())
    assert penalty() == 0
    direction = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    values = []
    for scale in (0.01, 0.02, 0.04):
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(ewc.anchor[n] + scale * direction[n]) if n in ewc.anchor else None
        values.append(penalty())
    assert 0 < values[0] < values[1] < values[2]
    assert math.isclose(values[1] / values[0], 4, rel_tol=1e-3)  # quadratic
    want = 100 / 2 * sum((ewc.fisher[n] * (p - ewc.anchor[n]) ** 2).sum() for n, p in m.named_parameters()
                         if n in ewc.fisher)
    assert math.isclose(values[-1], float(want), rel_tol=1e-5)  # λ/2 · Σ F (θ − θ*)²


def test_er_batches_hold_buffer_images_only_from_task_two(tmp_path, monkeypatch):
    sizes = []
    real = cosmae.augment
    monkeypatch.setattr(cosmae, "augment", lambda tiles, *a: sizes.append(len(tiles)) or real(tiles, *a))
    train(tiny_cfg(tmp_path, method="er", replay_batch=3))
    assert sizes == [8] * 4 + [11] * 4  # task 1: the batch alone; task 2: + 3 buffer images


def test_der_stored_features_equal_encoder_features_at_storage_time(tmp_path):
    cfg = tiny_cfg(tmp_path, method="der")
    res = train(cfg)
    ck1, ck2 = (torch.load(p, weights_only=True) for p in res["checkpoints"])
    model = cosmae.build_model(cfg)
    model.load_state_dict(ck1["model"])  # the encoder right after task 1, when task 1's images were stored
    feats = eval_mlknn.extract_features(model, ck1["buffer"]["task1"], cfg.pool, cfg.device)
    assert np.allclose(ck1["method"]["feats1"].numpy(), feats, atol=1e-5)
    assert torch.equal(ck2["method"]["feats1"], ck1["method"]["feats1"])  # kept, not recomputed
    assert len(ck2["buffer"]["task1"]) == 10  # the buffer keeps a prefix; DER uses the same prefix of its features


def test_pfr_loss_zero_for_identity_projector_and_equal_encoders():
    student, x, g = tiny_model(), torch.randn(4, 3, 32, 32), torch.nn.Identity()
    same = {k: v.clone() for k, v in student.state_dict().items() if cosmae.is_encoder_key(k)}
    teacher = cosmae.MixupTeacher(student, same)
    teacher.rebuild(0.0)  # PFR's teacher: e_{t−1}
    assert abs(baselines.pfr_loss(g(student.encode(x)), teacher(x)).item()) < 1e-6
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in same.items()}
    teacher = cosmae.MixupTeacher(student, other)
    teacher.rebuild(0.0)
    assert baselines.pfr_loss(g(student.encode(x)), teacher(x)).item() > 1e-3
    p, z = torch.randn(5, 7), torch.randn(5, 7)  # 1 − mean cosine, by hand
    want = 1 - np.mean([float(p[i] @ z[i] / (p[i].norm() * z[i].norm())) for i in range(5)])
    assert math.isclose(baselines.pfr_loss(p, z).item(), want, rel_tol=1e-5)


# --- multi-GPU block (run on CPU with gloo) ----------------------------------------------------------------

def _ddp_worker(rank, world, port, cfg_kw, out):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = cosmae.resolve(Config(**cfg_kw))
    runner.setup_distributed(cfg)
    res = train(cfg)
    torch.save(res["model"].state_dict(), f"{out}/rank{rank}.pt")
    runner.teardown_distributed()  # as runner.main ends a torchrun run


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_train_one_model_and_log_each_step_once(tmp_path):
    """torchrun's path on CPU (gloo): the two processes end with the same weights; only process 0 writes."""
    import torch.multiprocessing as mp
    kw = dict(tasks=["synth_red", "synth_green"], model="vit_test", epochs=1, batch_size=8, synth_train=32,
              memory_size=20, eval=False, log_every=1, device="cpu", warmup_epochs=0.5)
    mp.spawn(_ddp_worker, args=(2, free_port(), dict(kw, out=str(tmp_path / "ddp")), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the same encoder (and decoder) on both ranks
    log = [json.loads(x) for x in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert [(r["task"], r["step"]) for r in log] == [(t, s) for t in (1, 2) for s in range(1, 5)]
    assert log[-1]["loss/mim"] != 0 and all(math.isfinite(r["loss/total"]) for r in log)
    assert (tmp_path / "ddp" / "task2_synth_green.pt").exists() and not (tmp_path / "ddp" / "rank1.pt").exists()


def _gather_worker(rank, world, port, out):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    runner.DIST.update(rank=rank, world=world)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2 * world, 6, generator=g), torch.randn(2 * world, 6, generator=g)  # the global batch
    mine = z[2 * rank:2 * rank + 2].clone().requires_grad_()
    loss = mim_loss(runner.gather(mine), runner.gather(t[2 * rank:2 * rank + 2]), 0.5)
    loss.backward()
    torch.save(dict(loss=loss.detach(), grad=mine.grad), f"{out}/gather{rank}.pt")
    runner.teardown_distributed()


def test_eq4_over_the_global_batch_under_torchrun():
    """Each process's Eq. (4) is the loss of the whole global batch; its gradient on its own rows is W times the
    single-process one (all_gather's backward sums the W identical losses), which DDP's mean over the W processes
    turns back into the single-process gradient of the weights."""
    import tempfile
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_gather_worker, args=(2, free_port(), out), nprocs=2)
        got = [torch.load(f"{out}/gather{r}.pt", weights_only=True) for r in (0, 1)]
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(4, 6, generator=g).requires_grad_(), torch.randn(4, 6, generator=g)
    loss = mim_loss(z, t, 0.5)
    loss.backward()
    assert all(torch.allclose(r["loss"], loss.detach()) for r in got)
    assert torch.allclose(torch.cat([r["grad"] for r in got]), 2 * z.grad, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_run_with_evaluation_and_a_baseline(tmp_path, small_eval):
    """The bf16 autocast path end to end on a GPU: CoSMAE and DER steps, features, Eq. (1) per task, pictures."""
    for method in ("cosmae", "der"):
        res = train(tiny_cfg(tmp_path, device="cuda", eval=True, method=method, out=str(tmp_path / method)))
        assert all(math.isfinite(r["loss/total"]) for r in records(tmp_path / method))
        assert [r["task"] for r in res["eval"]] == [0, 1, 2] and all(len(r["rec_loss"]) == 2 for r in res["eval"])
        assert (tmp_path / method / "reconstructions_T2.png").exists()


# --- no host sync inside a training step -------------------------------------------------------------------

class HostWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operation that would make the host wait for a GPU: a device value read on the host (.item(),
    float(), .tolist(), a boolean mask's nonzero) and a blocking copy from host memory to the device. The step
    runs on the meta device (shapes only, no data), where both are visible without a GPU."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, aten = kwargs or {}, torch.ops.aten
        if func in (aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default):
            self.found.append(f"{func} reads a device value")  # (on meta it then fails: there is no value)
        out = func(*args, **kwargs)
        leaves = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
        if func in (aten._to_copy.default, aten.copy_.default):
            blocking = not (kwargs.get("non_blocking") or (func == aten.copy_.default and len(args) > 2 and args[2]))
            if blocking and any(t.device.type == "cpu" for t in leaves(args)) and \
                    any(t.device.type == "meta" for t in leaves(out)):
                import traceback
                site = [f for f in traceback.extract_stack() if f.filename.startswith(str(ROOT))
                        and ".venv" not in f.filename and "test_cosmae" not in f.filename]
                self.found.append(f"blocking host→device copy at {site[-1].filename}:{site[-1].lineno}" if site
                                  else "blocking host→device copy")
        return out


@pytest.mark.parametrize("method", ["mae", "cosmae", "cosmae-lam1-per-image", "er", "lump", "pfr"])
def test_a_training_step_makes_the_host_wait_for_nothing(method):
    meta, cpu_tiles = torch.device("meta"), np.random.default_rng(0).integers(0, 255, (16, 3, 37, 37), dtype=np.uint8)
    kw = dict(tasks=["synth_red"], model="vit_test", batch_size=4, device="cpu", memory_size=8)
    cfg = cosmae.resolve(Config(**kw, lam1_per="image" if "image" in method else "batch"))
    model = cosmae.build_model(cfg).to(meta)
    proj = cosmae.make_projector(48, 16).to(meta)
    theta_prev = {k: v.detach().clone() for k, v in model.encoder_state_dict().items()}

    class Opt:  # the fused AdamW kernel cannot run on meta; its step count lives on the device (no sync)
        def zero_grad(self, set_to_none=True):
            pass

        def step(self):
            pass

    buffer = ReplayBuffer(8)
    buffer.add_task(1, cpu_tiles, np.random.default_rng(0))
    raw, rng, gen = torch.from_numpy(cpu_tiles[:4]).to(meta), np.random.default_rng(0), torch.Generator()
    if method.startswith(("mae", "cosmae")):
        teacher = cosmae.MixupTeacher(model, theta_prev) if method != "mae" else None

        def step():
            cosmae.train_step(model, proj, teacher, Opt(), raw, buffer, rng, gen, cfg, method != "mae")
    else:
        bcfg = baselines.resolve(baselines.BaselineConfig(**kw, method=method))
        base = baselines.make(bcfg)
        base.start_task(1, model, theta_prev)
        base.step(model, proj, None, Opt(), raw, buffer, rng, gen, bcfg, False)  # LUMP's reservoir sees task 1
        base.start_task(2, model, theta_prev)

        def step():
            base.step(model, proj, None, Opt(), raw, buffer, rng, gen, bcfg, False)
    step()  # the first step copies constants to the device once (normalisation, the buffer's tiles)
    with HostWaits() as waits:
        step()
        step()
    assert waits.found == []


def test_the_host_wait_detector_sees_reads_and_blocking_copies():
    x = torch.ones(3, device="meta")
    with HostWaits() as waits:
        x + torch.ones(3).to("meta")  # blocking
        x + torch.ones(3).to("meta", non_blocking=True)
        x + rs_data.to_device(np.ones(3, np.float32), "meta")
        with pytest.raises(Exception):
            x.sum().item()  # meta has no value to read: the read is recorded and then fails
    assert len(waits.found) == 2 and "blocking" in waits.found[0] and "reads" in waits.found[1]


# --- --compile ---------------------------------------------------------------------------------------------

def _three_steps(compile: bool):
    cfg = cosmae.resolve(Config(tasks=["synth_red"], model="vit_test", batch_size=8, device="cpu", compile=compile))
    model, proj = cosmae.build_model(cfg), cosmae.make_projector(48, 16)
    theta_prev = {k: v + 0.01 for k, v in model.state_dict().items() if cosmae.is_encoder_key(k)}
    teacher = cosmae.MixupTeacher(model, theta_prev)
    teacher = torch.compile(teacher, dynamic=False) if compile else teacher
    net, opt = torch.compile(model) if compile else model, cosmae.make_optimizer(model, proj, cfg)
    buf = ReplayBuffer(8)
    buf.add_task(1, np.random.default_rng(0).integers(0, 255, (8, 3, 37, 37), dtype=np.uint8), np.random.default_rng(0))
    raw = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (8, 3, 37, 37), dtype=np.uint8))
    out = []
    for i in range(3):
        torch.manual_seed(i)
        for g in opt.param_groups:
            g["lr"] = 1e-3 * (i + 1)  # as the schedule changes it every step
        # static shapes: steps 2 and 3 (other λ1, λ2, lr, weights) run the graphs compiled in step 1
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            losses, lam1, lam2 = cosmae.train_step(net, proj, teacher, opt, raw, buf, np.random.default_rng(i),
                                                   torch.Generator().manual_seed(i), cfg, True)
        out.append([v.item() for v in losses] + [lam1, lam2])
    assert len({tuple(o[-2:]) for o in out}) == 3  # three different (λ1, λ2)
    return out


def test_compiled_and_eager_steps_agree(monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the same masking noise as eager
    eager = _three_steps(False)
    try:
        compiled = _three_steps(True)
    except Exception as e:  # no C++ toolchain, unsupported platform, ...
        pytest.skip(f"torch.compile not usable here: {type(e).__name__}: {str(e)[:120]}")
    # losses of 3 consecutive steps (steps 2 and 3 run on the updated weights); the weights themselves are
    # not compared: Adam's first steps have size ≈ lr whatever the gradient's magnitude, so float-level
    # differences in near-zero gradients show up as differences of order lr
    assert np.allclose(eager, compiled, rtol=1e-4, atol=1e-5)


# --- ML-kNN evaluation (eval_mlknn.py) ---------------------------------------------------------------------



def mlknn_loop(train_x, train_y, test_x, k, s):
    """ML-kNN written out point by point (Zhang & Zhou 2007, Fig. 1)."""
    m, q = train_y.shape
    dist = lambda a, b: math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))
    neigh = lambda x, skip: sorted((i for i in range(m) if i != skip), key=lambda i: dist(x, train_x[i]))[:k]
    train_neigh = [neigh(train_x[i], i) for i in range(m)]
    out = np.zeros((len(test_x), q))
    for l in range(q):
        prior1 = (s + sum(train_y[i, l] for i in range(m))) / (2 * s + m)
        c1, c0 = [0] * (k + 1), [0] * (k + 1)
        for i in range(m):
            count = sum(train_y[a, l] for a in train_neigh[i])
            (c1 if train_y[i, l] == 1 else c0)[count] += 1
        for n, x in enumerate(test_x):
            count = sum(train_y[a, l] for a in neigh(x, None))
            p1 = prior1 * (s + c1[count]) / (s * (k + 1) + sum(c1))
            p0 = (1 - prior1) * (s + c0[count]) / (s * (k + 1) + sum(c0))
            out[n, l] = p1 / (p1 + p0)
    return out


@pytest.mark.parametrize("k,s", [(1, 1.0), (3, 1.0), (10, 0.5)])
def test_mlknn_matches_loop_reference(k, s):
    rng = np.random.default_rng(k)
    train_x, test_x = rng.normal(size=(40, 3)), rng.normal(size=(7, 3))
    train_y = (rng.random((40, 4)) < [0.5, 0.2, 0.8, 0.0]).astype(int)
    assert np.allclose(eval_mlknn.mlknn_scores(train_x, train_y, test_x, k, s),
                       mlknn_loop(train_x, train_y, test_x, k, s), atol=1e-12)


def test_mlknn_hand_checkable_example_with_a_label_that_never_occurs():
    """x = 0, 1, 3, 10, 12 with label A = 1, 1, 0, 0, 0 and label B never present; k = 1, s = 1.
    Nearest other point: 0→1, 1→0, 3→1, 10→12, 12→10, so C_A = 1, 1, 1, 0, 0.
    A: prior 3/7; c1 = [0, 2], c0 = [2, 1]; P(E|H1) = [1/4, 3/4], P(E|H0) = [3/5, 2/5].
       test 0.4 (neighbour x=0, C=1): (3/7·3/4) / (3/7·3/4 + 4/7·2/5) = 45/77;
       test 11.2 (neighbour x=12, C=0): (3/7·1/4) / (3/7·1/4 + 4/7·3/5) = 5/21.
    B: prior 1/7; c1 = [0, 0] → P(E|H1) = [1/2, 1/2]; c0 = [5, 0] → P(E|H0) = [6/7, 1/7]; C = 0:
       (1/7·1/2) / (1/7·1/2 + 6/7·6/7) = 7/79 for both test points."""
    train_x = np.array([[0.0], [1.0], [3.0], [10.0], [12.0]])
    train_y = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [0, 0]])
    got = eval_mlknn.mlknn_scores(train_x, train_y, np.array([[0.4], [11.2]]), k=1, s=1.0)
    assert np.allclose(got, [[45 / 77, 7 / 79], [5 / 21, 7 / 79]])


def test_mlknn_duplicate_points_exclude_only_themselves():
    """x = 0, 0, 5, 6 with A = 1, 0, 1, 1, k = 1: each copy of 0 has the OTHER copy as neighbour, so
    C = 0, 1, 1, 1; c1 = [1, 2], c0 = [0, 1]; prior 2/3; test 5.4 (neighbour 5, C = 1):
    (2/3·3/5) / (2/3·3/5 + 1/3·2/3) = 9/14. (Counting a point as its own neighbour would give 24/29.)"""
    got = eval_mlknn.mlknn_scores(np.array([[0.0], [0.0], [5.0], [6.0]]), np.array([[1], [0], [1], [1]]),
                                  np.array([[5.4]]), k=1, s=1.0)
    assert np.allclose(got, [[9 / 14]])


def test_both_map_kinds_rank_posteriors_and_decisions():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 2)), (rng.random((30, 3)) < 0.5).astype(int)
    post = eval_mlknn.mlknn_scores(x, y, x[:10])  # k = 10, as the evaluation
    r = eval_mlknn.evaluate_features(x, y, x[:10], y[:10])
    assert math.isclose(r["micro"], eval_mlknn.map_scores(y[:10], post)["micro"])
    assert math.isclose(r["micro_binary"], eval_mlknn.map_scores(y[:10], post > 0.5)["micro"])
    assert math.isclose(r["macro_binary"], eval_mlknn.map_scores(y[:10], post > 0.5)["macro"])
    y_true = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    perfect = eval_mlknn.map_scores(y_true, y_true * 0.9 + 0.05)
    assert perfect["micro"] == 100 and perfect["macro"] == 100 and perfect["skipped"] == [2]
    scores = rng.random((3, 3))
    from sklearn.metrics import average_precision_score
    got = eval_mlknn.map_scores(y_true, scores)
    assert math.isclose(got["micro"], 100 * average_precision_score(y_true.ravel(), scores.ravel()))
    assert math.isclose(got["macro"], 100 * np.mean([average_precision_score(y_true[:, i], scores[:, i]) for i in (0, 1)]))
    with pytest.raises(rs_data.DataError, match="non-finite features"):
        eval_mlknn.evaluate_features(np.full((4, 2), np.nan), y[:4], x[:2], y[:2])


def test_mlknn_count_self_counts_each_training_point_as_its_own_neighbour():
    """x = 0, 1, 5, 6 with A = 1, 0, 1, 1, k = 1, counting self (scikit-multilearn's MLkNN): each point's one
    neighbour is itself, C = y = 1, 0, 1, 1; c1 = [0, 3], c0 = [1, 0]; prior 2/3; P(E|H1) = [1/5, 4/5],
    P(E|H0) = [2/3, 1/3]; test 5.4 (neighbour 5, C = 1): (2/3·4/5) / (2/3·4/5 + 1/3·1/3) = 24/29."""
    x, y = np.array([[0.0], [1.0], [5.0], [6.0]]), np.array([[1], [0], [1], [1]])
    assert np.allclose(eval_mlknn.mlknn_scores(x, y, np.array([[5.4]]), k=1, s=1.0, count_self=True), [[24 / 29]])
    assert not np.allclose(eval_mlknn.mlknn_scores(x, y, np.array([[5.4]]), k=1, s=1.0), [[24 / 29]])


def fake_run(label, micro, per_task=None, seconds=3600.0):
    rows = [dict(task=t, micro=v, macro=v, micro_binary=v / 2, macro_binary=v / 2, rec_loss=[0.5, 0.4],
                 per_task=per_task[t] if per_task else None) for t, v in enumerate(micro)]
    return dict(label=label, tasks=["a", "b"], rows=rows, train_seconds=seconds)


def test_table_writer_layout_with_seeds_and_hours():
    runs = [fake_run("finetune", (40, 50, 60)), fake_run("cosmae", (40, 50, 64), seconds=7200),
            fake_run("cosmae", (40, 52, 66), seconds=9000)]
    assert eval_mlknn.format_table(runs) == (
        "| method | init | T1 (a) | T2 (b) | train h |\n"
        "|---|---|---|---|---|\n"
        "| finetune | 40.00 | 50.00 | 60.00 | 1.00 |\n"
        "| cosmae | 40.00 ± 0.00 | 51.00 ± 1.00 | 65.00 ± 1.00 | 2.25 ± 0.25 |")
    short = eval_mlknn.format_table([fake_run("x", (1, 2, 3), seconds=290.4)], "micro_binary")
    assert short.endswith("| x | 0.50 | 1.00 | 1.50 | 290 |") and "train s" in short


def test_forgetting_table_and_matrices_mean_and_std_over_seeds():
    a1 = [[10, 10], [70, 20], [60, 80]]  # forgetting 10, BWT −10, final 70
    a2 = [[10, 10], [70, 20], [50, 80]]  # forgetting 20, BWT −20, final 65
    runs = [fake_run("ft", (1, 2, 3), a1, 100), fake_run("ft", (1, 2, 3), a2, 300)]
    table = eval_mlknn.forgetting_table(runs)
    assert table.splitlines()[-1] == "| ft | 67.50 ± 2.50 | 15.00 ± 5.00 | -15.00 ± 5.00 | 200 ± 100 |"
    matrix = eval_mlknn.format_matrix(runs, "per_task")
    assert "| after T2 (b) | 55.00 ± 5.00 | 80.00 ± 0.00 |" in matrix and "| init (random) |" in matrix


def test_eval_cli_tables_of_runs_and_seeds(tmp_path, capsys, small_eval):
    cosmae.main(["--tasks", "synth_red", "synth_green", "--model", "vit_test", "--epochs", "1", "--batch-size", "8",
                 "--synth-train", "32", "--memory-size", "20", "--device", "cpu", "--seeds", "0", "1",
                 "--out", str(tmp_path / "co")])
    capsys.readouterr()
    eval_mlknn.main([str(tmp_path / "co" / "seed0"), str(tmp_path / "co" / "seed1"), "--table-out", str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    assert "| cosmae |" in table and "T2 (synth_green)" in table and " ± " in table
    assert "micro ★ mAP" in table and "Table" in table and "avg forgetting" in table and "R[t][j]" in table
    capsys.readouterr()
    eval_mlknn.main([str(tmp_path / "co")])  # the --seeds folder: its seed folders
    assert capsys.readouterr().out.strip() == table.strip()
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path / "missing")])
    assert e.value.code == 2 and f"run folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path / "empty")])
    assert e.value.code == 2 and "is not a run folder of cosmae.py or baselines.py (no config.json)" in \
        capsys.readouterr().err


def test_eval_file_does_not_import_the_method_file():
    code = "import sys, eval_mlknn; assert 'cosmae' not in sys.modules, 'circle'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- bad inputs: one line and exit 2; failures lose nothing ---------------------------------------------------

TINY = ["--tasks", "synth_red", "synth_green", "--model", "vit_test", "--epochs", "1", "--batch-size", "8",
        "--synth-train", "32", "--memory-size", "20", "--no-eval", "--device", "cpu"]


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "-1"], "--epochs -1: must be ≥ 1"), (["--batch-size", "-4"], "--batch-size -4: must be ≥ 1"),
    (["--mask-ratio", "1.0"], "--mask-ratio 1.0: must be in (0, 1)"), (["--mask-ratio", "0"], "--mask-ratio 0.0"),
    (["--mask-ratio", "1.5"], "--mask-ratio 1.5"), (["--mask-ratio", "0.99"], "one of the 16 patches visible"),
    (["--tau", "0"], "--tau 0.0: must be > 0"), (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--alpha1", "0"], "--alpha1 0.0: must be > 0"), (["--alpha2", "-1"], "--alpha2"),
    (["--log-every", "0"], "--log-every 0: must be ≥ 1"), (["--save-every", "0"], "--save-every 0: must be ≥ 1"),
    (["--memory-size", "0"], "--memory-size 0: must be ≥ 1 with data mixup"),
    (["--lam2-value", "1.5"], "--lam2-value 1.5: must be in [0, 1]"), (["--warmup-epochs", "5"], "--warmup-epochs 5.0"),
    (["--synth-train", "4"], "--synth-train 4: must be ≥ --batch-size (8)"), (["--seed", "-3"], "--seed -3"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "CUDA device"),
    (["--device", "tpu"], "--device tpu"), (["--model", "vit_huge"], "--model vit_huge"),
    (["--init", "/nonexistent/mae.pth"], "--init /nonexistent/mae.pth: must be an existing checkpoint file"),
    (["--lr", "inf"], "--lr inf: must be a finite number"), (["--beta", "nan"], "--beta nan: must be a finite number"),
    (["--mask-ratio=-inf"], "--mask-ratio -inf: must be a finite number"),
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"), (["--no-such-flag"], "unrecognized arguments"),
])
def test_a_bad_flag_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cosmae.main(TINY + ["--out", str(tmp_path / "run")] + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [(["--method", "der", "--memory-size", "0"], "--memory-size 0: must be ≥ 1 for der"),
                                           (["--method", "er", "--replay-batch", "-1"], "--replay-batch -1"),
                                           (["--method", "ewc", "--ewc-batches", "0"], "--ewc-batches 0")])
def test_a_bad_baseline_flag_is_one_line_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        baselines.main(TINY + ["--out", str(tmp_path / "run")] + flags)
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    cosmae.main(TINY + ["--tasks", "synth_red", "--out", str(tmp_path / "run")])  # task 1 done, finite
    good = encoder_of(tmp_path / "run" / "task1_synth_red.pt")
    with pytest.raises(SystemExit) as e:  # the same run, now with a second task at an absurd learning rate
        cosmae.main(TINY + ["--out", str(tmp_path / "bad"), "--lr", "1e6", "--log-every", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "non-finite" in err and "task 1 (synth_red)" in err and "Traceback" not in err
    assert not list((tmp_path / "bad").glob("*.pt"))  # no checkpoint of non-finite weights
    model = tiny_model()
    with runner.Run(tiny_cfg(tmp_path, out=str(tmp_path / "nan"))) as run:
        run.save(tmp_path / "nan" / "task1_x.pt", model, encoder=good)
        with torch.no_grad():
            model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
        with pytest.raises(rs_data.DataError, match="non-finite"):
            run.save(tmp_path / "nan" / "task1_x.pt", model, encoder={})
    assert all(torch.equal(good[k], v) for k, v in encoder_of(tmp_path / "nan" / "task1_x.pt").items())


def test_ctrl_c_says_where_and_how_to_resume_exit_130(tmp_path):
    cmd = [sys.executable, "-u", "cosmae.py", *TINY, "--epochs", "200", "--save-every", "1", "--log-every", "1",
           "--out", str(tmp_path / "run")]
    # SIGINT as a terminal gives it, even where pytest itself was started with SIGINT ignored (a background job)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("task 1 synth_red | ep 2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted in task 1 (synth_red), epoch" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err and (tmp_path / "run" / "last.pt").exists()


def test_failed_start_leaves_no_run_folder_and_the_fixed_rerun_works(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    for bad in (["--init", str(tmp_path / "missing.pt")], ["--ucmerced", str(tmp_path / "nowhere"), "--eval"],
                ["--batch-size", "64"]):
        with pytest.raises(SystemExit) as e:
            cosmae.main(TINY + out + bad)
        assert e.value.code == 2 and not (tmp_path / "run" / "config.json").exists(), bad
    capsys.readouterr()
    cosmae.main(TINY + out)
    assert (tmp_path / "run" / "task2_synth_green.pt").exists()


def test_init_that_matches_nothing_is_an_error_and_a_partial_one_says_what_is_missing(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        cosmae.main(TINY + ["--init", str(tmp_path / "other.pt"), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "none of its 1 weights is an encoder weight" in capsys.readouterr().err
    sd = {k: v for k, v in tiny_model().state_dict().items() if k.startswith("patch_embed")}
    torch.save({"model": sd}, tmp_path / "part.pt")
    cosmae.main(TINY + ["--tasks", "synth_red", "--init", str(tmp_path / "part.pt"), "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "encoder weights NOT loaded" in out and "cls_token" in out
    other_model = MAE(**MODELS["vit_tiny"]).state_dict()  # another --model: the shapes do not fit
    for bad, message in (({"model": other_model}, "weights do not fit this --model"),
                         ({"model": {"note": "not weights"}}, "no weights found in it"), ([1, 2], "holds a list")):
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(SystemExit) as e:
            cosmae.main(TINY + ["--init", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "c").exists()


def test_json_files_are_atomic_and_a_corrupt_one_is_a_clear_error(tmp_path):
    train(tiny_cfg(tmp_path, tasks=["synth_red"]))
    assert not list((tmp_path / "run").glob("*.tmp"))
    (tmp_path / "run" / "summary.json").write_text('{"completed": 1, "trai')  # a torn write of an older version
    with pytest.raises(rs_data.DataError, match="summary.json is corrupt"):
        train(tiny_cfg(tmp_path, tasks=["synth_red"]))


def test_cache_goes_to_the_user_cache_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    make_datasets(tmp_path / "d")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_writable = rs_data.writable
    monkeypatch.setattr(rs_data, "writable", lambda d: str(tmp_path / "d") not in str(d) and real_writable(d))
    logs = []
    tiles = rs_data.task_tiles("uavid", tmp_path / "d", "train", log=logs.append)
    assert (tiles == 77).all() and not (tmp_path / "d" / ".cosmae_cache").exists()
    assert list((tmp_path / "xdg" / "cosmae").glob("d-*/uavid_train.npy")) and any("xdg" in m for m in logs)
    monkeypatch.setattr(rs_data, "writable", real_writable)  # a cache built inside a (then) writable data folder
    rs_data.task_tiles("potsdam", tmp_path / "d", "train", log=logs.append)
    monkeypatch.setattr(rs_data, "writable", lambda d: False)  # ... is used read-only once the folder is not
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    assert rs_data.task_tiles("potsdam", tmp_path / "d", "train", log=logs.append).shape == (12, 3, 256, 256)
    with pytest.raises(rs_data.DataError, match="no writable place for the tile cache.*--cache-dir"):
        rs_data.task_tiles("treesat", tmp_path / "d", "train", log=logs.append)


def test_a_failed_cache_build_leaves_no_temporary_file(tmp_path, monkeypatch):
    make_datasets(tmp_path / "d")
    real, calls = rs_data.read_rgb, []

    def fail_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(rs_data, "read_rgb", fail_on_second)
    with pytest.raises(OSError):
        rs_data.task_tiles("potsdam", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None)
    assert list((tmp_path / "c").iterdir()) == []


@pytest.mark.parametrize("row,message", [("airplane00\t1\t0", "line 2: expected an image name and 17 values"),
                                         ("airplane00\t" + "\t".join(["1"] * 16) + "\tx", "got 17 values"),
                                         ("airplane00\t" + "\t".join(["2"] * 17), "values 0 or 1")])
def test_ucmerced_label_file_is_checked_row_by_row(tmp_path, row, message):
    make_ucmerced(tmp_path / "U", n_per_class=2)
    path = tmp_path / "U" / "LandUse_Multilabeled.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], row] + lines[2:]) + "\n")
    with pytest.raises(rs_data.DataError, match=re.escape(message)):
        rs_data.ucmerced_splits(tmp_path / "U", tmp_path / "c", log=lambda m: None)


# --- real datasets: small files in each official layout ----------------------------------------------------

import tifffile  # noqa: E402
from PIL import Image, ImageFile  # noqa: E402


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
        tifffile.imwrite(path, img, tile=(256, 256), compression="packbits", photometric="minisblack")
    finally:
        if not had:
            del tt.imagecodecs.packbits_encode
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == 32773 and tif.pages[0].is_tiled


def make_datasets(root: Path):
    (root / "US3D" / "Train-Track1-MSI").mkdir(parents=True)
    (root / "US3D" / "Validate-Track1-MSI").mkdir(parents=True)
    for i, sub in ((1, "Train-Track1-MSI"), (2, "Train-Track1-MSI"), (3, "Validate-Track1-MSI")):
        tifffile.imwrite(root / "US3D" / sub / f"JAX_{i:03d}_007_MSI.tif",
                         bands_image([100 * (b + 1) for b in range(8)], 512, 512, np.uint16),
                         photometric="minisblack", planarconfig="contig")  # one page of 8 samples, as WorldView-3
    ortho = root / "Potsdam" / "4_Ortho_RGBIR"
    ortho.mkdir(parents=True)
    for i in range(3):
        write_packbits_tiled(ortho / f"top_potsdam_2_{10 + i}_RGBIR.tif", bands_image([10, 20, 30, 40 + i], 512, 768, np.uint8))
    aerial = root / "TreeSatAI" / "aerial" / "60m"
    aerial.mkdir(parents=True)
    for name in ("Abies_alba_1_10000_WEFL_NLF.tif", "Picea_abies_3_46_2.5_WEFL.tif", "Pinus_sylvestris_5_1.1.tif"):
        tifffile.imwrite(aerial / name, bands_image([1, 2, 3, 4], 304, 304, np.uint8, chw=True),  # IR, G, B, R
                         photometric="minisblack", planarconfig="separate")  # one page, [C, H, W]
    for split, seq in (("uavid_train", "seq1"), ("uavid_train", "seq2"), ("uavid_val", "seq16")):
        d = root / "UAVid" / split / seq / "Images"
        d.mkdir(parents=True)
        Image.fromarray(np.full((512, 768, 3), 77, np.uint8)).save(d / "000000.png")


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


def test_us3d_msi_bands_4_2_1_scaled_from_11_bit_and_official_splits(tmp_path):
    make_datasets(tmp_path / "d")
    logs = []
    train = rs_data.task_tiles("us3d", tmp_path / "d", "train", tmp_path / "c", log=logs.append)
    val = rs_data.task_tiles("us3d", tmp_path / "d", "val", tmp_path / "c", log=logs.append)
    assert train.shape == (8, 3, 256, 256) and val.shape == (4, 3, 256, 256) and train.dtype == np.uint8
    want = [round(v * 255 / 2047) for v in (500, 300, 200)]  # bands 4, 2, 1 (0-based) hold 500, 300, 200
    assert [int(train[0, c, 5, 5]) for c in range(3)] == want and (train == train[:1, :, :1, :1]).all()
    assert any("8 patches found, the paper uses 21081" in m for m in logs)


def test_potsdam_packbits_tiles_rgb_order_and_split_by_whole_images(tmp_path):
    make_datasets(tmp_path / "d")
    train = rs_data.task_tiles("potsdam", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None)
    val = rs_data.task_tiles("potsdam", tmp_path / "d", "val", tmp_path / "c", log=lambda m: None)
    assert train.shape == (12, 3, 256, 256) and val.shape == (6, 3, 256, 256)  # 2 + 1 images of 2×3 patches
    assert (train[:, 0] == 10).all() and (train[:, 1] == 20).all() and (train[:, 2] == 30).all()  # IR dropped


def test_treesat_name_with_dots_centre_crop_and_ir_g_b_r_order(tmp_path):
    make_datasets(tmp_path / "d")
    train = rs_data.task_tiles("treesat", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None)
    val = rs_data.task_tiles("treesat", tmp_path / "d", "val", tmp_path / "c", log=lambda m: None)
    assert len(train) == 2 and len(val) == 1 and train.shape[1:] == (3, 256, 256)
    assert [int(train[0, c, 0, 0]) for c in range(3)] == [4, 2, 3]  # bands IR,G,B,R = 1,2,3,4 → R,G,B
    files = rs_data.split_files("treesat", tmp_path / "d" / "TreeSatAI", 0)["files"]
    assert any(p.name == "Picea_abies_3_46_2.5_WEFL.tif" for p in files)


def test_uavid_png_patch_counts(tmp_path):
    make_datasets(tmp_path / "d")
    train = rs_data.task_tiles("uavid", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None)
    val = rs_data.task_tiles("uavid", tmp_path / "d", "val", tmp_path / "c", log=lambda m: None)
    assert train.shape == (12, 3, 256, 256) and val.shape == (6, 3, 256, 256) and (train == 77).all()


def test_tiff_layouts_hwc_and_chw_and_wrong_bands_or_dtype(tmp_path):
    tifffile.imwrite(tmp_path / "hwc.tif", bands_image([1, 2, 3], 16, 16, np.uint8))
    tifffile.imwrite(tmp_path / "chw.tif", bands_image([1, 2, 3], 16, 16, np.uint8, chw=True),
                     photometric="minisblack", planarconfig="separate")
    for f in ("hwc.tif", "chw.tif"):
        assert rs_data.read_rgb(tmp_path / f).shape == (3, 16, 16) and rs_data.read_rgb(tmp_path / f)[2, 0, 0] == 3
    with pytest.raises(rs_data.DataError, match="hwc.tif.*expected 8 bands"):
        rs_data.read_rgb(tmp_path / "hwc.tif", bands=(4, 2, 1), n_bands=8, bits=11)
    tifffile.imwrite(tmp_path / "u16.tif", bands_image([1, 2, 3], 8, 8, np.uint16))
    with pytest.raises(rs_data.DataError, match="u16.tif: dtype uint16, expected uint8"):
        rs_data.read_rgb(tmp_path / "u16.tif")


def test_lzw_tiff_without_imagecodecs_says_how_to_fix(tmp_path):
    try:
        import imagecodecs  # noqa: F401
        pytest.skip("imagecodecs is installed: LZW reads fine")
    except ImportError:
        pass
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, bands_image([1, 2, 3], 8, 8, np.uint8))
    with tifffile.TiffFile(path, mode="r+b") as tif:  # relabel the (uncompressed) strips as LZW
        tif.pages[0].tags["Compression"].overwrite(5)
    with pytest.raises(rs_data.DataError, match="lzw.tif.*pip install imagecodecs"):
        rs_data.read_rgb(path)


def test_data_errors_missing_empty_corrupt_unknown(tmp_path, capsys):
    with pytest.raises(rs_data.DataError, match=r"us3d: no folder .*US3D.*JAX_\*_RGB.tif.*DataPort"):
        rs_data.task_tiles("us3d", tmp_path, "train", tmp_path / "c")
    (tmp_path / "TreeSatAI" / "aerial" / "60m").mkdir(parents=True)
    with pytest.raises(rs_data.DataError, match="treesat: no images found"):
        rs_data.task_tiles("treesat", tmp_path, "train", tmp_path / "c")
    (tmp_path / "TreeSatAI" / "aerial" / "60m" / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(rs_data.DataError, match="cannot read .*bad.tif"):
        rs_data.task_tiles("treesat", tmp_path, "train", tmp_path / "c")
    with pytest.raises(SystemExit) as e:
        cosmae.main(["--tasks", "potsdam", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "potsdam: no folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the data is found


def test_cache_reused_rebuilt_on_change_and_partial_files_not_trusted(tmp_path, monkeypatch):
    make_datasets(tmp_path / "d")
    first = np.array(rs_data.task_tiles("potsdam", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None))
    real = rs_data.read_rgb
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    again = rs_data.task_tiles("potsdam", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None)
    assert np.array_equal(first, again)  # served from the cache without reading an image
    monkeypatch.setattr(rs_data, "read_rgb", real)
    for src in (tmp_path / "d" / "Potsdam" / "4_Ortho_RGBIR").glob("*.tif"):  # the folder changed
        tifffile.imwrite(src, bands_image([11, 21, 31, 40], 512, 768, np.uint8))
    rebuilt = np.array(rs_data.task_tiles("potsdam", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None))
    assert rebuilt.shape == first.shape and (rebuilt[:, 0] == 11).all()
    (tmp_path / "c" / "potsdam_train.json").unlink()  # as if a build died before writing its manifest
    (tmp_path / "c" / "potsdam_train.tmp.npy").write_bytes(b"half")
    calls = []
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert np.array_equal(rs_data.task_tiles("potsdam", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None), rebuilt)
    assert calls  # rebuilt from the images


def test_split_is_deterministic_under_a_seed(tmp_path):
    make_datasets(tmp_path / "d")
    for name in ("potsdam", "treesat", "us3d"):
        a, b = (rs_data.split_files(name, rs_data.find_dataset(name, tmp_path / "d"), 0) for _ in range(2))
        assert a["train"] == b["train"] and a["val"] == b["val"]
    vals = {tuple(rs_data.split_files("potsdam", tmp_path / "d" / "Potsdam", s)["val"]) for s in range(6)}
    assert len(vals) > 1  # another seed, another validation image


def test_ucmerced_labels_crlf_resize_and_split_sizes(tmp_path):
    names = make_ucmerced(tmp_path / "UCMerced_LandUse")
    s = rs_data.ucmerced_splits(tmp_path / "UCMerced_LandUse", tmp_path / "c", seed=0, log=lambda m: None)
    assert s["labels"] == names
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [20, 6, 16]  # 42 images in 1000:300:800
    x = np.concatenate([s[k][0] for k in ("train", "val", "test")])
    y = np.concatenate([s[k][1] for k in ("train", "val", "test")])
    assert x.shape[1:] == (3, 256, 256) and y.shape[1] == 17
    for img, lab in zip(x, y):  # class c has colour channel c at 250 and label column c set
        assert lab[int(np.argmax(img.reshape(3, -1).mean(1)))] == 1


def test_end_to_end_four_fake_datasets_with_evaluation_on_fake_ucmerced(tmp_path, capsys):
    make_datasets(tmp_path / "d")
    make_ucmerced(tmp_path / "UCMerced_LandUse")
    ucm = str(tmp_path / "UCMerced_LandUse")
    cosmae.main(["--tasks", "us3d", "uavid", "potsdam", "treesat", "--data-root", str(tmp_path / "d"),
                 "--ucmerced", ucm, "--model", "vit_test", "--epochs", "1", "--batch-size", "2",
                 "--warmup-epochs", "0.5", "--device", "cpu", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "T4 (treesat)" in out and "UCMerced" in out and "R[t][j]" in out and "A[t][j]" not in out
    tasks = ["us3d", "uavid", "potsdam", "treesat"]
    assert [p.name for _, _, p in runner.finished_tasks(tmp_path / "run", tasks)][-1] == "task4_treesat.pt"
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(rows) == 5 and all(r["per_task"] is None and len(r["rec_loss"]) == 4 for r in rows)  # no labels
    assert "final_avg_map" not in json.loads((tmp_path / "run" / "summary.json").read_text())
    eval_mlknn.main([str(tmp_path / "run")])
    assert "T4 (treesat)" in capsys.readouterr().out


def test_treesat_resize_instead_of_centre_crop(tmp_path):
    make_datasets(tmp_path / "d")
    aerial = tmp_path / "d" / "TreeSatAI" / "aerial" / "60m"
    img = np.zeros((4, 304, 304), np.uint8)
    img[3, :24] = 200  # R band: a bright strip along the top, outside the centre 256×256
    for p in aerial.glob("*.tif"):
        tifffile.imwrite(p, img, photometric="minisblack", planarconfig="separate")
    crop = rs_data.task_tiles("treesat", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None)
    full = rs_data.task_tiles("treesat", tmp_path / "d", "train", tmp_path / "c", log=lambda m: None, treesat_resize=True)
    assert crop[:, 0].max() == 0 and full[:, 0, :10].min() > 150  # the strip: cut off, or kept (resized)
    assert runner.parse_args(Config, ["--treesat-resize"]).treesat_resize


def test_presets_paper_for_real_tasks_synthetic_otherwise_explicit_flags_win():
    paper = cosmae.resolve(Config(tasks=["us3d", "uavid"]))
    assert (paper.model, paper.epochs, paper.batch_size, paper.warmup_epochs) == ("vit_base", 300, 128, 10)
    assert paper.norm_pix_loss is False  # the paper does not mention MAE's normalised target
    synth = cosmae.resolve(Config(warmup_epochs=0.0, epochs=2))
    assert (synth.model, synth.epochs, synth.warmup_epochs, synth.norm_pix_loss) == ("vit_tiny", 2, 0.0, True)
    assert cosmae.resolve(runner.parse_args(Config, ["--no-norm-pix-loss"])).norm_pix_loss is False
    assert cosmae.resolve(runner.parse_args(Config, ["--tasks", "us3d", "--norm-pix-loss"])).norm_pix_loss is True
    assert MODELS["vit_base"] == dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                      decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def test_evaluating_a_task_again_replaces_its_row(tmp_path, monkeypatch):
    """A run that crashed in task 1 evaluates the random init again when resumed: one row per task."""
    cfg = tiny_cfg(tmp_path, eval=True)
    scores = iter([dict(micro=1.0, micro_binary=2.0), dict(micro=3.0, micro_binary=4.0), dict(micro=5.0, micro_binary=6.0)])
    monkeypatch.setattr(eval_mlknn, "evaluation_row", lambda *a: (dict(next(scores), per_task=None, rec_loss=[1.0]), []))
    with runner.Run(cfg) as run:
        ev = eval_mlknn.Evaluation(cfg)
        ev.rows = []
        ev.evaluate(run, 0, "init", None)
        ev.evaluate(run, 1, "synth_red", None)
        ev.evaluate(run, 0, "init", None)
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [(r["task"], r["micro"], r["micro_binary"]) for r in rows] == [(0, 5.0, 6.0), (1, 3.0, 4.0)]
    assert eval_mlknn.read_rows(tmp_path / "run") == rows  # and a resumed run reads them back


# --- the method file is the paper; the machinery lives beside it ---------------------------------------------------

def project_imports(name: str) -> dict:
    """{imported project module: 'module' (at the top of the file) or 'function' (inside a function)}."""
    tree, found = ast.parse((ROOT / f"{name}.py").read_text()), {}
    project = {p.stem for p in ROOT.glob("*.py")}
    for node in ast.walk(tree):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for m in mods:
            if m.split(".")[0] in project:
                where = "module" if node in tree.body or any(node in getattr(b, "body", []) for b in tree.body
                                                           if isinstance(b, ast.Try)) else "function"
                found[m.split(".")[0]] = "module" if found.get(m.split(".")[0]) == "module" else where
    return found


def test_method_file_is_the_paper_and_nothing_else():
    """cosmae.py: at most 550 lines of at most 120 characters, and none of the run machinery (run folder,
    checkpoint files, resume, metrics log, Ctrl-C, non-finite stops, flag checks, process groups)."""
    src = (ROOT / "cosmae.py").read_text()
    lines = src.splitlines()
    assert len(lines) <= 550 and max(map(len, lines)) <= 120
    tree = ast.parse(src)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    machinery = {"json", "os", "sys", "Path", "open", "signal", "fcntl", "KeyboardInterrupt", "DataError", "DIST",
                 "shard_rand", "all_mean", "Meter", "load_checkpoint", "save_torch", "enforce", "check_flags",
                 "setup_distributed", "isfinite"}
    assert not names & machinery, names & machinery
    assert not attrs & {"save", "load", "compile", "_foreach_copy_", "_foreach_lerp_", "init_process_group",
                        "DistributedDataParallel", "resume_task", "trim_metrics", "exit", "environ"}
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"__future__", "copy", "math", "contextlib", "dataclasses", "numpy", "torch", "eval_mlknn",
                       "rs_data", "runner"}


def test_no_import_circle_among_the_project_files():
    """One allowed exception: eval_mlknn.py's command line builds the encoder with cosmae.py (inside a function)."""
    files = [p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("test_")]
    graph = {f: project_imports(f) for f in files}
    assert set(graph["runner"]) <= {"rs_data"} and set(graph["rs_data"]) == set()
    assert graph["eval_mlknn"].get("cosmae") == "function" and "cosmae" not in [
        m for m, where in graph["eval_mlknn"].items() if where == "module"]
    edges = {f: {m for m in graph[f] if (f, m) != ("eval_mlknn", "cosmae")} for f in files}

    def reaches(a, b, seen=()):
        return any(m == b or (m not in seen and reaches(m, b, seen + (m,))) for m in edges.get(a, ()))
    assert not [f for f in files if reaches(f, f)]


def test_default_eq4_is_simclr_nt_xent():
    assert Config().mim_form == "simclr"


# --- LUMP (Madaan et al. 2022) as Table II's row ------------------------------------------------------------------

def test_lump_reservoir_keeps_a_uniform_sample_of_the_stream():
    """Reservoir sampling: after n images, each of them is in the buffer with probability M / n, whatever its
    position in the stream (a FIFO or 'keep the first' buffer would not be)."""
    cfg = baselines.resolve(baselines.BaselineConfig(method="lump", model="vit_test", tasks=["synth_red"],
                                                     device="cpu", memory_size=50, batch_size=10))
    kept = np.zeros(500)
    for rep in range(40):
        lump, rng = baselines.LUMP(cfg), np.random.default_rng(rep)
        for i in range(0, 500, 10):
            ids = np.arange(i, i + 10)
            lump.add(torch.from_numpy(np.stack([ids // 256, ids % 256, ids * 0], 1).astype(np.uint8)).view(10, 3, 1, 1),
                     rng)
        got = lump.tiles[:, 0, 0, 0].long() * 256 + lump.tiles[:, 1, 0, 0].long()
        assert lump.seen == 500 and len(set(got.tolist())) == 50
        kept[got.numpy()] += 1
    assert abs(kept[:250].sum() - kept[250:].sum()) < 0.25 * kept.sum()  # early and late images alike
    assert 200 < np.mean(np.flatnonzero(kept).repeat(kept[kept > 0].astype(int))) < 300


def test_lump_fills_its_reservoir_in_task_one_and_mixes_from_task_two(tmp_path):
    res = train(tiny_cfg(tmp_path, method="lump", out=str(tmp_path / "lump")))
    recs = records(tmp_path / "lump")
    assert all(r["lam1"] == 1 for r in recs if r["task"] == 1)  # §III-D: task 1 as every method
    assert any(r["lam1"] != 1 for r in recs if r["task"] == 2) and all(r["loss/mim"] == 0 for r in recs)
    ck1, ck2 = (torch.load(p, weights_only=True) for p in res["checkpoints"])
    assert int(ck1["method"]["seen"]) == 32 and int(ck2["method"]["seen"]) == 64  # the stream, every step
    assert ck1["method"]["tiles"].shape[0] == 20  # M images, not balanced per task
    data_mixup_only = train(tiny_cfg(tmp_path, model_mixup=False, out=str(tmp_path / "mixup_only")))
    a, b = encoder_of(res["checkpoints"][-1]), encoder_of(data_mixup_only["checkpoints"][-1])
    assert not all(torch.equal(a[k], b[k]) for k in a)  # Table II's LUMP is not Table I's data-mixup-only row


# --- eval_mlknn.py evaluates checkpoints: of runs, of one file, or a random init ---------------------------------

def test_eval_cli_scores_the_checkpoints_of_a_run_whose_training_data_is_gone(tmp_path, capsys):
    import shutil
    make_datasets(tmp_path / "d")
    make_ucmerced(tmp_path / "U")
    run, ucm = tmp_path / "run", str(tmp_path / "U")
    cosmae.main(["--tasks", "potsdam", "treesat", "--data-root", str(tmp_path / "d"), "--model", "vit_test",
                 "--epochs", "1", "--batch-size", "2", "--warmup-epochs", "0.5", "--no-eval", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "c"), "--out", str(run)])
    shutil.rmtree(tmp_path / "d")
    shutil.rmtree(tmp_path / "c")
    capsys.readouterr()
    eval_mlknn.main([str(run), "--ucmerced", ucm])
    out = capsys.readouterr().out
    rows = json.loads((run / "eval.json").read_text())
    assert [(r["task"], r["eval_set"]) for r in rows] == [(t, eval_mlknn.UCMERCED) for t in (0, 1, 2)]
    assert all(r["rec_loss"] is None and 0 <= r["micro"] <= 100 and 0 <= r["micro_binary"] <= 100 for r in rows)
    assert "T2 (treesat)" in out and "UCMerced" in out
    eval_mlknn.main([str(run), "--ucmerced", ucm])  # evaluated: nothing again, the same rows
    assert json.loads((run / "eval.json").read_text()) == rows
    eval_mlknn.main([str(run / "task2_treesat.pt"), "--ucmerced", ucm])  # one task checkpoint
    assert f"| task2_treesat.pt | {rows[2]['micro']:.2f} | {rows[2]['macro']:.2f} |" in capsys.readouterr().out
    enc = torch.load(run / "task2_treesat.pt", weights_only=True)["encoder"]  # facebookresearch/mae's layout
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")
    eval_mlknn.main([str(tmp_path / "mae_pretrain.pth"), "--ucmerced", ucm, "--model", "vit_test"])
    assert f"| mae_pretrain.pth | {rows[2]['micro']:.2f} |" in capsys.readouterr().out
    eval_mlknn.main(["--model", "vit_test", "--ucmerced", ucm])  # the floor: a random-init encoder
    assert f"| vit_test (random init, seed 0) | {rows[0]['micro']:.2f} |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path / "mae_pretrain.pth")])
    assert e.value.code == 2 and "needs --ucmerced" in capsys.readouterr().err


# --- a long run can be trusted: resume, lock, full disk, broken inputs ---------------------------------------

def test_resume_trusts_only_this_runs_task_files_in_order(tmp_path, capsys):
    three = dict(tasks=["synth_red", "synth_green", "synth_blue"])
    full = train(tiny_cfg(tmp_path, **three, out=str(tmp_path / "full")))
    cut = tmp_path / "cut"
    train(tiny_cfg(tmp_path, **three, out=str(cut)))
    import shutil
    shutil.copy(cut / "task1_synth_red.pt", cut / "task1_synth_red_backup.pt")  # a copy kept by hand: never used
    (cut / "task2_synth_green.pt").unlink()  # a middle checkpoint deleted: task 3 cannot stand in for it
    capsys.readouterr()
    again = train(tiny_cfg(tmp_path, **three, out=str(cut)))
    out = capsys.readouterr().out
    assert "ignoring files that are not this run's checkpoints: task1_synth_red_backup.pt" in out
    assert "set aside as task3_synth_blue.pt.set_aside" in out and (cut / "task3_synth_blue.pt.set_aside").exists()
    assert "resuming" in out and "tasks 1..1 already done" in out
    a, b = encoder_of(full["checkpoints"][-1]), encoder_of(again["checkpoints"][-1])
    assert all(torch.equal(a[k], b[k]) for k in a)  # tasks 2 and 3 trained again, as in one go
    steps = [(r["task"], r["step"]) for r in records(cut)]
    assert steps == [(r["task"], r["step"]) for r in records(tmp_path / "full")]


def test_a_run_folder_without_config_json_is_still_checked_against_the_command(tmp_path):
    train(tiny_cfg(tmp_path))
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(rs_data.DataError, match=r"task1_synth_red.pt belongs to a run with other settings .*'lr'"):
        train(tiny_cfg(tmp_path, lr=0.01))
    with pytest.raises(rs_data.DataError, match=r"other settings .*'method'"):
        train(tiny_cfg(tmp_path, method="finetune"))
    train(tiny_cfg(tmp_path))  # the same command: accepted (finished)


@pytest.mark.parametrize("case", ["not_a_checkpoint", "other_run", "other_model", "list"])
def test_a_task_checkpoint_of_the_wrong_content_is_one_line_before_config_json(tmp_path, case, capsys):
    train(tiny_cfg(tmp_path, out=str(tmp_path / "other")))
    cosmae.main(TINY + ["--out", str(tmp_path / "run"), "--warmup-epochs", "0.5"])
    (tmp_path / "run" / "task2_synth_green.pt").unlink()
    path = tmp_path / "run" / "task1_synth_red.pt"
    if case == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "other_run":  # task 1 of this run, task 2 copied from another run with the same settings
        import shutil
        shutil.copy(tmp_path / "other" / "task2_synth_green.pt", tmp_path / "run" / "task2_synth_green.pt")
    elif case == "other_model":
        ck = torch.load(path, weights_only=True)
        ck["model"] = {k: v[..., :1] if v.ndim else v for k, v in ck["model"].items()}
        torch.save(ck, path)
    else:
        torch.save([torch.zeros(1)], path)
    (tmp_path / "run" / "config.json").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cosmae.main(TINY + ["--out", str(tmp_path / "run"), "--warmup-epochs", "0.5"])
    err = capsys.readouterr().err
    want = {"not_a_checkpoint": "is not the checkpoint of task 1", "other_run": "does not continue the checkpoint",
            "other_model": "its weights do not fit this model", "list": "holds a list"}[case]
    assert e.value.code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("name,content,message", [
    ("config.json", "[1, 2]", "config.json holds a list, expected a JSON dict"),
    ("eval.json", '{"task": 0}', "expected a JSON list of rows"),
    ("metrics.jsonl", '{"task": 1, "step": 1}\n[1]\n{"task": 1, "step": 2}\n', "metrics.jsonl line 2 is not a "
                                                                               "metrics record"),
    ("summary.json", '"done"', "summary.json holds a str")])
def test_hand_edited_json_of_the_wrong_shape_is_one_line(tmp_path, capsys, small_eval, name, content, message):
    args = TINY + ["--out", str(tmp_path / "run"), "--eval", "--warmup-epochs", "0.5"]
    cosmae.main(args)
    (tmp_path / "run" / "task2_synth_green.pt").unlink()  # a resume that trains task 2 again reads every file
    (tmp_path / "run" / name).write_text(content)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cosmae.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_out_that_cannot_be_written_is_refused_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rs_data, "synth_task", lambda *a: (_ for _ in ()).throw(AssertionError("data read")))
    (tmp_path / "file").write_text("x")
    cases = [("", "--out : must be a run folder"), (str(tmp_path / "file"), "is a file; name a folder"),
             (str(tmp_path / "file" / "sub"), "cannot be created or written")]
    for out, message in cases:
        with pytest.raises(SystemExit) as e:
            cosmae.main(TINY + ["--out", out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (out, err)


def run_cosmae(args, **kw):
    return subprocess.run([sys.executable, "cosmae.py", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def test_one_process_per_run_folder_and_the_os_frees_the_lock_of_a_killed_one(tmp_path):
    cmd = [sys.executable, "-u", "cosmae.py", *TINY, "--epochs", "200", "--save-every", "1", "--log-every", "1",
           "--out", str(tmp_path / "r")]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("task 1 synth_red | ep 2/"):
                break
        second = run_cosmae(cmd[3:], timeout=120)  # the same command again, while the first one trains
        assert second.returncode == 2 and f"is in use by process {first.pid}" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    finally:
        first.kill()  # SIGKILL: no cleanup of its own
        first.wait()
    cfg = tiny_cfg(tmp_path, out=str(tmp_path / "r"), epochs=200, save_every=1, warmup_epochs=1)
    with runner.Run(cfg):  # the lock died with the process
        pass


def test_sigkill_then_rerun_resumes_bit_identically(tmp_path):
    args = TINY + ["--epochs", "3", "--save-every", "1", "--log-every", "1", "--warmup-epochs", "0.5"]
    assert run_cosmae(args + ["--out", str(tmp_path / "full")], timeout=300).returncode == 0
    cut = subprocess.Popen([sys.executable, "-u", "cosmae.py", *args, "--out", str(tmp_path / "cut")], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in cut.stdout:
        if line.startswith("task 2 synth_green | ep 2/"):
            cut.kill()
            break
    cut.wait()
    assert not (tmp_path / "cut" / "task2_synth_green.pt").exists()
    again = run_cosmae(args + ["--out", str(tmp_path / "cut")], timeout=300)
    assert again.returncode == 0 and "resuming task 2 after epoch" in again.stdout, again.stdout + again.stderr
    a, b = (encoder_of(tmp_path / d / "task2_synth_green.pt") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, cut_log = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [(r["task"], r["step"], r["loss/total"]) for r in full] == [(r["task"], r["step"], r["loss/total"])
                                                                     for r in cut_log]


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_after_freeing_space_resumes(tmp_path):
    out = str(tmp_path / "run")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY))  # noqa: E731
    full = run_cosmae(TINY + ["--out", out, "--warmup-epochs", "0.5"], timeout=300, preexec_fn=limit)
    assert full.returncode == 2 and "no space left on the device writing" in full.stderr, full.stderr
    assert "task1_synth_red.pt" in full.stderr and len(full.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / "task1_synth_red.pt").exists()
    again = run_cosmae(TINY + ["--out", out, "--warmup-epochs", "0.5"], timeout=300)
    assert again.returncode == 0 and (tmp_path / "run" / "task2_synth_green.pt").exists(), again.stderr


def test_the_first_record_after_a_mid_task_resume_covers_the_same_steps_and_time_is_kept(tmp_path, monkeypatch):
    """4 steps per epoch, a record every 3 steps: the record of steps 4-6 spans the epoch boundary where the run
    is resumed; its loss is the mean over the same three steps as without the stop."""
    kw = dict(epochs=2, save_every=1, log_every=3)
    full = train(tiny_cfg(tmp_path, out=str(tmp_path / "full"), **kw))
    real_step, count = torch.optim.AdamW.step, {"n": 0}

    def crash(self, *a, **k):
        count["n"] += 1
        if count["n"] == 8 + 4 + 3:  # task 2, epoch 2, step 3
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash)
    cfg = tiny_cfg(tmp_path, out=str(tmp_path / "cut"), **kw)
    run = runner.Run(cfg)
    with pytest.raises(KeyboardInterrupt), run:
        cosmae.train(cfg, run)
    seconds = float(torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["seconds"])
    assert seconds > json.loads((tmp_path / "cut" / "summary.json").read_text())["train_seconds"] > 0
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train(cfg)
    want = [(r["task"], r["step"], r["loss/total"], r["loss/mim"]) for r in records(tmp_path / "full")]
    assert [(r["task"], r["step"], r["loss/total"], r["loss/mim"]) for r in records(tmp_path / "cut")] == want
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["train_seconds"] > seconds
    assert full["checkpoints"]


def test_eval_tables_never_mix_evaluation_sets_or_task_lists_and_count_a_folder_once(tmp_path, capsys):
    def fake(folder, tasks, sets):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(dict(method="cosmae", tasks=tasks, seed=0)))
        rows = [dict(task=t, name="x", eval_set=s, micro=50.0 + t, macro=40.0, micro_binary=30.0, macro_binary=20.0,
                     per_task=None, rec_loss=None) for s in sets for t in range(len(tasks) + 1)]
        (folder / "eval.json").write_text(json.dumps(rows))
    fake(tmp_path / "a", ["t1", "t2"], [eval_mlknn.SYNTHETIC, eval_mlknn.UCMERCED])
    fake(tmp_path / "b", ["t1", "t2", "t3"], [eval_mlknn.SYNTHETIC])
    eval_mlknn.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a") + "/"])
    out = capsys.readouterr().out
    assert out.count("on the synthetic multi-label set after each task") == 2  # a's and b's task lists apart
    assert out.count("on UCMerced (800 test images) after each task") == 1 and " ± " not in out  # a counted once


def test_bench_profile_and_end_to_end_run_of_cosmae_on_generated_official_layouts(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "bench.py", "--model", "vit_test", "--device", "cpu", "--batch", "4",
                          "--repeats", "1", "--warmup", "0", "--end-to-end", "--e2e-steps", "4", "--profile",
                          "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "task 1 us3d" in res.stdout and "task 2 uavid" in res.stdout  # the real loop's progress lines
    assert res.stdout.count("the operations that took the most:") == 2
    r = json.loads(out.read_text())
    for k in "ab":  # the profile's table: the operations with the most self time, their shares adding up
        top = r["profile"][k]["top"]
        assert len(top) == 12 and any("addmm" in op or "linear" in op for op, _, _ in top)
        assert 0 < sum(pct for _, _, pct in top) <= 100.01 and top[0][2] >= top[-1][2]
    e2e = r["end_to_end"]
    # us3d: one 1024×1024 tile = 16 patches = 4 steps; uavid: one 3840×2160 frame = 120 patches = 30 steps
    assert (e2e["a"]["task"], e2e["a"]["steps"], e2e["b"]["task"], e2e["b"]["steps"]) == ("us3d", 4, "uavid", 30)
    for k in "ab":
        assert 0 <= e2e[k]["data_wait_mean"] <= e2e[k]["data_wait_max"] <= 1 and e2e[k]["of_bench"] > 0
        assert "% of (" + k + ")'s" in res.stdout


def test_unwritable_table_out_and_bad_bench_flags_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_mlknn, "load_run", lambda *a: (_ for _ in ()).throw(AssertionError("work done")))
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path), "--table-out", str(tmp_path / "no" / "such" / "t.md")])
    assert e.value.code == 2 and "--table-out" in capsys.readouterr().err
    for flags, message in ((["--device", "tpu"], "--device tpu: not a device name"),
                           (["--model", "vit_huge"], "--model vit_huge: must be one of")):
        with pytest.raises(SystemExit) as e:
            eval_mlknn.main(["--ucmerced", str(tmp_path)] + flags)
        assert e.value.code == 2 and message in capsys.readouterr().err
    bench = subprocess.run([sys.executable, "bench.py", "--repeats", "0"], cwd=ROOT, capture_output=True, text=True)
    assert bench.returncode == 2 and bench.stderr.strip() == "error: --repeats 0: must be ≥ 1"
    bench = subprocess.run([sys.executable, "bench.py", "--e2e-steps", "1"], cwd=ROOT, capture_output=True, text=True)
    assert bench.returncode == 2 and bench.stderr.strip() == "error: --e2e-steps 1: must be ≥ 2"
    small_files = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))  # noqa: E731
    bench = subprocess.run([sys.executable, "bench.py", "--model", "vit_test", "--device", "cpu"], cwd=ROOT,
                           capture_output=True, text=True, preexec_fn=small_files, env={**os.environ,
                                                                                         "TMPDIR": str(tmp_path)})
    assert bench.returncode == 2 and bench.stderr.startswith("error: no space left on the device writing ")
    assert "TMPDIR" in bench.stderr and len(bench.stderr.strip().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]  # its temporary folder removed


# === rs_data.py for long, parallel runs: atomic writes, a full disk, the tile cache's lock, broken images, UCMerced ===
# Every user-facing problem is one rs_data.DataError line naming the file; processes that must run apart come from a
# clean fork server (Linux).

CHILD = multiprocessing.get_context("forkserver")
QUIET = dict(log=lambda m: None)


# --- rs_data for long, parallel runs: tiny files in the official layouts ------------------------------------------------------------------

def make_potsdam(root: Path, n=3, h=256, w=512, seed=0) -> list:
    """n Potsdam orthophotos as ISPRS ships them: one page, 4 bands R,G,B,IR interleaved, 256×256 tiles, random
    pixels (h×w: 2 patches each). 1 image is drawn for validation, the others train."""
    ortho = root / "Potsdam" / "4_Ortho_RGBIR"
    ortho.mkdir(parents=True)
    g, paths = np.random.default_rng(seed), []
    for i in range(n):
        paths.append(ortho / f"top_potsdam_2_{10 + i}_RGBIR.tif")
        tifffile.imwrite(paths[-1], g.integers(0, 256, (h, w, 4), dtype=np.uint8), tile=(256, 256),
                         photometric="minisblack", planarconfig="contig")
    return paths


def potsdam_train(root: Path, cache: Path, **kw) -> np.ndarray:
    return rs_data.task_tiles("potsdam", root, "train", cache, **{**QUIET, **kw})


def truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


UCM_NAMES = ["airplane", "bare-soil", "buildings", "cars", "chaparral", "court", "dock", "field", "grass",
             "mobile-home", "pavement", "sand", "sea", "ship", "tanks", "trees", "water"]


def ucmerced_folder(root: Path, n_per_class=8, sep="\t", end="") -> Path:
    """UCMerced_LandUse: Images/<class>/<class>NN.tif (random 256×256 RGB) and LandUse_Multilabeled.txt (CRLF);
    `end` is appended to the header and every row (a trailing tab). Only labels 0-2 and 16 occur."""
    classes = ["airplane", "beach", "tenniscourt"]
    lines = ["IMAGE\\LABEL" + sep + sep.join(UCM_NAMES) + end]
    for ci, c in enumerate(classes):
        (root / "Images" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = np.random.default_rng(i + 100 * ci).integers(0, 255, (256, 256, 3), dtype=np.uint8)
            tifffile.imwrite(root / "Images" / c / f"{c}{i:02d}.tif", img)
            labels = [int(j == ci or (j == 16 and i % 2)) for j in range(17)]
            lines.append(f"{c}{i:02d}" + sep + sep.join(map(str, labels)) + end)
    path = root / "LandUse_Multilabeled.txt"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def _child(q, target, args):
    try:
        q.put(("ok", target(*args)))
    except BaseException as e:  # noqa: B902 (reported to the parent)
        q.put(("raised", f"{type(e).__name__}: {e}"))


def in_child(target, *args):
    """Run target(*args) in a child process; → (exit code, what it returned or the text of what it raised). The
    child comes from a fork server started clean: a child forked from a process whose OpenMP threads already ran
    (torch in the other tests) can hang in its first parallel region."""
    q = CHILD.Queue()
    p = CHILD.Process(target=_child, args=(q, target, args))
    p.start()
    try:
        out = q.get(timeout=120)
    except Exception:
        out = ("nothing", None)
    p.join(30)
    return p.exitcode, out


def limit_file_size(nbytes: int):
    """What a full disk does to a write, in this process only: writes past nbytes fail with EFBIG (Python
    ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


# --- atomic_write and disk_errors ---------------------------------------------------------------------

def test_atomic_write_temporary_names_are_unique_per_call_and_process(tmp_path):
    seen = []
    for text in ("a", "b"):
        rs_data.atomic_write(tmp_path / "x.json", lambda tmp: seen.append(tmp) or tmp.write_text(text))
    assert seen[0] != seen[1] and all(t.parent == tmp_path and t.name.endswith(".tmp") for t in seen)
    assert all(re.fullmatch(rf"x\.json\.{__import__('os').getpid()}\.[0-9a-f]{{8}}\.tmp", t.name) for t in seen)
    assert (tmp_path / "x.json").read_text() == "b" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _write_many(path: Path, byte: bytes, n: int):
    def write(tmp):
        with open(tmp, "wb") as f:
            for _ in range(8):  # slowly, in pieces: the other process writes at the same time
                f.write(byte * 4096)
                time.sleep(0.001)
    for _ in range(n):
        rs_data.atomic_write(path, write)
    return "done"


def test_two_processes_writing_one_file_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "summary.json"
    procs = [CHILD.Process(target=_write_many, args=(target, b, 15)) for b in (b"a", b"b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]  # a shared temporary file: one rename finds it gone
    data = target.read_bytes()
    assert len(data) == 8 * 4096 and len(set(data)) == 1  # one writer's file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    (tmp_path / "ck.pt").write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        rs_data.atomic_write(tmp_path / "ck.pt", fail)
    with pytest.raises(ValueError):
        rs_data.atomic_write(tmp_path / "new.pt", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"] and (tmp_path / "ck.pt").read_text() == "old"


def _write_under_limit(path: Path, how: str):
    limit_file_size(100_000)
    writers = {"text": lambda tmp: tmp.write_text("x" * 300_000),  # OSError EFBIG
               "numpy": lambda tmp: np.save(open(tmp, "wb"), np.zeros(100_000)),  # OSError without errno
               "torch": lambda tmp: torch.save({"w": torch.zeros(100_000)}, tmp)}  # RuntimeError of its writer
    rs_data.atomic_write(path, writers[how])


@pytest.mark.parametrize("how", ["text", "numpy", "torch"])
def test_full_disk_in_atomic_write_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, how):
    code, (kind, message) = in_child(_write_under_limit, tmp_path / "task1.pt", how)
    assert code == 0 and kind == "raised" and message.startswith("DataError: no space left on the device writing ")
    assert str(tmp_path / "task1.pt") in message and "free space" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_disk_errors_names_only_space_problems(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=re.escape(f"no space left on the device writing {tmp_path / 'm.json'} (")):
        with rs_data.disk_errors(tmp_path / "m.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DataError, match="Disk quota exceeded.*; delete old runs"):
        with rs_data.disk_errors(tmp_path / "m.json", "delete old runs"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError):  # not about space: unchanged
        with rs_data.disk_errors(tmp_path / "m.json"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(RuntimeError, match="writer failed"):  # no errno and plenty of space: unchanged
        with rs_data.disk_errors(tmp_path / "m.json"):
            raise RuntimeError("writer failed")
    monkeypatch.setattr(rs_data.shutil, "disk_usage", lambda p: type("U", (), dict(free=1 << 20))())
    with pytest.raises(DataError, match=r"no space left.*\(1 MB free after RuntimeError: writer failed\)"):
        with rs_data.disk_errors(tmp_path / "m.json"):  # ... and on an (almost) full disk: named
            raise RuntimeError("writer failed")


# --- the tile cache: full disk, two builders, checks ---------------------------------------------------------

def _build_under_limit(root: Path, cache: Path):
    limit_file_size(300_000)  # the train cache is 4 patches, 786 kB
    potsdam_train(root, cache)


def test_full_disk_while_building_the_cache_is_one_line_and_leaves_nothing(tmp_path):
    make_potsdam(tmp_path / "d")
    code, (kind, message) = in_child(_build_under_limit, tmp_path / "d", tmp_path / "c")
    assert code == 0, "killed (SIGBUS is -7) instead of an error"
    assert kind == "raised" and message.startswith("DataError: no space left on the device writing ")
    assert str(tmp_path / "c" / "potsdam_train.npy") in message and "the cache needs 0.8 MB" in message
    assert "--cache-dir" in message and "\n" not in message
    assert list((tmp_path / "c").iterdir()) == []  # no .tmp, no .lock, no manifest
    assert potsdam_train(tmp_path / "d", tmp_path / "c").shape == (4, 3, 256, 256)  # with room, it builds


def test_reserve_falls_back_to_writing_zeros_where_fallocate_is_not_supported(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    want = np.array(potsdam_train(tmp_path / "d", tmp_path / "c1"))
    calls = []

    def unsupported(fd, offset, size):
        calls.append(size)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(rs_data.os, "posix_fallocate", unsupported)
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c2"), want)
    assert calls == [4 * 3 * 256 * 256]
    monkeypatch.setattr(rs_data.os, "posix_fallocate",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output"):  # any other error of fallocate is not hidden
        potsdam_train(tmp_path / "d", tmp_path / "c3")
    assert list((tmp_path / "c3").iterdir()) == []


def _slow_build(root: Path, cache: Path, start):
    start.wait(timeout=60)  # both processes are in flight before either builds (one never takes both jobs)
    real = rs_data.read_rgb

    def slow(*a, **k):
        time.sleep(0.3)  # the other process starts while this one builds
        return real(*a, **k)

    rs_data.read_rgb = slow
    logs = []
    tiles = rs_data.task_tiles("potsdam", root, "train", cache, log=logs.append)
    return np.array(tiles), logs


def test_two_processes_building_one_cache_at_once_both_succeed_with_one_build(tmp_path):
    make_potsdam(tmp_path / "d")
    with CHILD.Manager() as manager, CHILD.Pool(2) as pool:
        start = manager.Barrier(2)
        results = [pool.apply_async(_slow_build, (tmp_path / "d", tmp_path / "c", start)) for _ in range(2)]
        (a, logs_a), (b, logs_b) = [r.get(timeout=60) for r in results]
    assert a.shape == (4, 3, 256, 256) and np.array_equal(a, b)
    builds = [m for m in logs_a + logs_b if "building the tile cache" in m]
    assert len(builds) == 1, logs_a + logs_b  # the second waited, then used the first one's cache
    assert any("waiting for another process" in m for m in logs_a + logs_b)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["potsdam_train.json", "potsdam_train.npy"]
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), a)


def test_cache_lock_excludes_and_a_waiter_relocks_after_the_file_is_removed(tmp_path):
    path, inside, clashes, done = tmp_path / "k.lock", [], [], []

    def worker():
        for _ in range(15):
            with rs_data.cache_lock(path, lambda m: None):
                inside.append(1)
                if len(inside) > 1:
                    clashes.append(1)
                time.sleep(0.002)
                inside.pop()
            done.append(1)

    threads = [threading.Thread(target=worker) for _ in range(3)]  # flock: one lock per open file, so threads
    for t in threads:  # of one process exclude each other as processes do
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 45 and not clashes and not path.exists()


def test_a_valid_cache_in_a_read_only_folder_is_used_without_any_lock(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = np.array(rs_data.task_tiles("potsdam", tmp_path / "d", "train", **QUIET))  # in DATA/.cosmae_cache
    before = sorted(p.name for p in (tmp_path / "d" / ".cosmae_cache").iterdir())
    monkeypatch.setattr(rs_data, "writable", lambda d: False)
    monkeypatch.setattr(rs_data, "cache_lock", lambda *a: (_ for _ in ()).throw(AssertionError("locked")))
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    assert np.array_equal(rs_data.task_tiles("potsdam", tmp_path / "d", "train", **QUIET), first)
    assert sorted(p.name for p in (tmp_path / "d" / ".cosmae_cache").iterdir()) == before


def count_reads(monkeypatch) -> list:
    real, calls = rs_data.read_rgb, []
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_cache_whose_npy_is_truncated_or_of_another_shape_is_rebuilt(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    first = np.array(potsdam_train(tmp_path / "d", tmp_path / "c"))
    npy, man = tmp_path / "c" / "potsdam_train.npy", tmp_path / "c" / "potsdam_train.json"
    assert rs_data.json.loads(man.read_text())["shape"] == [4, 3, 256, 256]
    calls = count_reads(monkeypatch)
    truncate(npy, 0.6)  # a copy cut short, the manifest intact
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and calls
    calls.clear()
    np.save(npy, np.zeros((3, 3, 256, 256), np.uint8))  # whole, but not what the manifest says
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and calls
    calls.clear()
    stored = rs_data.json.loads(man.read_text())  # a manifest written before it held the shape: still trusted
    del stored["shape"]
    man.write_text(rs_data.json.dumps(stored))
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and not calls
    np.save(npy, np.zeros((4, 3, 256, 256), np.float32)[..., :1])  # ... unless its .npy is not uint8 tiles
    assert np.array_equal(potsdam_train(tmp_path / "d", tmp_path / "c"), first) and calls


def test_the_temporary_file_of_a_killed_build_is_removed_by_the_next_build(tmp_path):
    make_potsdam(tmp_path / "d")
    (tmp_path / "c").mkdir()
    for name in ("potsdam_train.npy.4242.0badf00d.tmp", "potsdam_train.npy.tmp", "potsdam_val.npy.1.2.tmp"):
        (tmp_path / "c" / name).write_bytes(b"\0" * 1000)
    potsdam_train(tmp_path / "d", tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [  # another cache's file is not touched
        "potsdam_train.json", "potsdam_train.npy", "potsdam_val.npy.1.2.tmp"]


# --- broken images: one line naming the file ---------------------------------------------------------------

BROKEN = r"cannot read {}: truncated or corrupt \(.*\); re-copy it or remove it from the folder$"


def test_truncated_potsdam_orthophoto_is_named_when_its_header_is_read(tmp_path, monkeypatch):
    paths = make_potsdam(tmp_path / "d")
    files = rs_data.split_files("potsdam", tmp_path / "d" / "Potsdam", 0)
    truncate(files["train"][1], 0.9)
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pixels read")))
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(files["train"][1])))):
        potsdam_train(tmp_path / "d", tmp_path / "c")
    assert len(paths) == 3 and list((tmp_path / "c").iterdir()) == []


def test_truncated_tiff_pixels_are_an_error_not_zeros(tmp_path):
    path = make_potsdam(tmp_path / "d", n=1)[0]
    truncate(path, 0.97)  # the last tile cut short
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(path)))) as e:
        rs_data.read_rgb(path, n_bands=4)
    assert re.search(r"page 0 needs \d+ bytes, the file has \d+", str(e.value))


def test_tiff_cut_in_its_page_chain_is_not_read_as_its_first_page(tmp_path):
    """The report's 'truncated Potsdam tile skipped silently': a TIFF of many pages whose shape tifffile keeps
    in its metadata (the test datasets' Potsdam files) cut short was read as its first page, 256×4, which has no
    256×256 patch. Here: 256 deflated pages; the cut and a page chain cut exactly at a page."""
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 256, (256, 256, 4), dtype=np.uint8),
                     tile=(256, 256), photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 256 and tif.series[0].shape == (256, 256, 4)
        cut_at = tif.pages[1].offset  # the second page's header: the first page is whole
    data = path.read_bytes()
    for keep in (len(data) // 2, cut_at):
        path.write_bytes(data[:keep])
        with pytest.raises(DataError, match=BROKEN.format(re.escape(str(path)))):
            rs_data.image_size(path, n_bands=4)
        with pytest.raises(DataError, match=BROKEN.format(re.escape(str(path)))):
            rs_data.read_rgb(path, n_bands=4)


def test_tiff_with_the_wrong_bands_is_named_when_its_header_is_read(tmp_path, monkeypatch):
    make_potsdam(tmp_path / "d")
    bad = rs_data.split_files("potsdam", tmp_path / "d" / "Potsdam", 0)["train"][0]
    tifffile.imwrite(bad, bands_image([1, 2, 3], 256, 512, np.uint8))  # RGB in the RGBIR folder
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pixels read")))
    with pytest.raises(DataError, match=re.escape(f"{bad}: shape (256, 512, 3), expected 4 bands")):
        potsdam_train(tmp_path / "d", tmp_path / "c")
    tifffile.imwrite(bad, bands_image([1, 2, 3, 4], 256, 512, np.uint16))
    with pytest.raises(DataError, match=re.escape(f"{bad}: dtype uint16, expected uint8")):
        potsdam_train(tmp_path / "d", tmp_path / "c")


def make_uavid(root: Path) -> Path:
    """UAVid with one random 8-bit frame per sequence (noise: the PNG is as large as its pixels)."""
    for split, seq in (("uavid_train", "seq1"), ("uavid_train", "seq2"), ("uavid_val", "seq16")):
        (root / "UAVid" / split / seq / "Images").mkdir(parents=True)
        img = np.random.default_rng(len(seq)).integers(0, 256, (256, 512, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "UAVid" / split / seq / "Images" / "000000.png")
    return root / "UAVid" / "uavid_train" / "seq2" / "Images" / "000000.png"


@pytest.mark.parametrize("load_truncated", [False, True])
def test_truncated_png_is_named_and_no_cache_is_left(tmp_path, monkeypatch, load_truncated):
    png = make_uavid(tmp_path / "d")
    truncate(png, 0.6)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)  # some library may have set it
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(png)))):
        rs_data.task_tiles("uavid", tmp_path / "d", "train", tmp_path / "c", **QUIET)
    assert list((tmp_path / "c").iterdir()) == [] and ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated
    png.write_bytes(png.read_bytes()[:20])  # even the header cut
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(png)))):
        rs_data.task_tiles("uavid", tmp_path / "d", "train", tmp_path / "c", **QUIET)


def write_png16(path: Path, a: np.ndarray):
    """A 16-bit PNG (Pillow cannot write 16-bit colour): a [H, W, C] uint16, C = 1 grey, 2 grey + alpha, 3 RGB,
    4 RGBA. Row r uses PNG filter r % 5 (None, Sub, Up, Average, Paeth), so that decoding must unfilter right."""
    h, w, ch = a.shape
    raw = a.astype(">u2").reshape(h, w * ch).view(np.uint8).reshape(h, -1).astype(np.int32)  # big-endian bytes
    bpp, rows = 2 * ch, []
    for r in range(h):
        x = raw[r]
        up = raw[r - 1] if r else np.zeros_like(x)
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        p = left + up - upleft
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        pred = [0 * x, left, up, (left + up) // 2, paeth][r % 5]
        rows.append(bytes([r % 5]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    chunk = lambda kind, d: struct.pack(">I", len(d)) + kind + d + struct.pack(">I", zlib.crc32(kind + d))
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[ch]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4, 1, 2])
def test_16_bit_png_is_scaled_to_8_bits_not_cut_or_saturated(tmp_path, channels):
    g = np.random.default_rng(channels)
    a = g.integers(0, 65536, (7, 9, channels), dtype=np.uint16)
    a[0, :6, 0] = [0, 128, 129, 1000, 40000, 65535]  # → 0, 0, 1, 4 (Pillow's high byte: 3), 156, 255
    write_png16(tmp_path / "f.png", a)
    got = rs_data.read_rgb(tmp_path / "f.png")
    colour = a[..., :3] if channels >= 3 else np.repeat(a[..., :1], 3, -1)  # alpha dropped, grey → RGB
    want = np.round(colour.astype(np.float64) * 255 / 65535).astype(np.uint8).transpose(2, 0, 1)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert list(got[0, 0, :6]) == [0, 0, 1, 4, 156, 255]


def test_8_bit_rgb_palette_and_grey_png_read_as_before(tmp_path):
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(g.integers(0, 256, (5, 6), dtype=np.uint8), "L").convert("P").save(tmp_path / "p.png")
    Image.fromarray(g.integers(0, 256, (5, 6), dtype=np.uint8), "L").save(tmp_path / "l.png")
    Image.fromarray(g.integers(0, 256, (5, 6, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    for f in ("rgb.png", "p.png", "l.png", "rgba.png"):
        want = np.asarray(Image.open(tmp_path / f).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(rs_data.read_rgb(tmp_path / f), want)


def test_missing_or_unreadable_image_says_why(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"cannot read {tmp_path / 'gone.tif'}: No such file")):
        rs_data.image_size(tmp_path / "gone.tif")
    with pytest.raises(DataError, match=re.escape(f"cannot read {tmp_path / 'gone.png'}: No such file")):
        rs_data.read_rgb(tmp_path / "gone.png")
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(DataError, match=BROKEN.format(re.escape(str(tmp_path / "text.png")))):
        rs_data.image_size(tmp_path / "text.png")


# --- UCMerced: the label file and the size of the folder -----------------------------------------------------

def ucm(root: Path, **kw):
    return rs_data.ucmerced_splits(root, root.parent / "c", **QUIET, **kw)


def test_ucmerced_with_too_few_images_for_ml_knn_says_how_many_are_needed(tmp_path, monkeypatch):
    labels = ucmerced_folder(tmp_path / "U", n_per_class=7)  # 21 images: 10 to train on
    monkeypatch.setattr(rs_data, "read_rgb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    with pytest.raises(DataError, match=re.escape(f"{labels}: 21 images, so the training split holds 10 (1000 of "
                                                  "every 2100); ML-kNN with k = 10 neighbours needs more than 10 "
                                                  "training images: list at least 23 images")):
        ucm(tmp_path / "U")
    with pytest.raises(DataError, match="k = 20 neighbours.*at least 44 images"):
        ucm(tmp_path / "U", k=20)
    monkeypatch.undo()
    assert len(ucm(tmp_path / "U", k=9)["train"][0]) == 10


def test_ucmerced_of_23_images_is_enough(tmp_path):
    labels = ucmerced_folder(tmp_path / "U", n_per_class=8)
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]) + "\n")  # 23 rows (the 24th image is not listed, so not used)
    s = ucm(tmp_path / "U")
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [11, 3, 9]


def test_ucmerced_label_file_of_zeros_only_is_an_error_and_a_label_nobody_has_is_fine(tmp_path):
    labels = ucmerced_folder(tmp_path / "U")
    s = ucm(tmp_path / "U")
    y = np.concatenate([s[k][1] for k in ("train", "val", "test")])
    assert not y[:, 5].any() and y[:, 16].any()  # 'court' occurs nowhere: fine
    lines = labels.read_text().splitlines()
    zeros = [lines[0]] + [ln.split("\t")[0] + "\t0" * 17 for ln in lines[1:]]
    labels.write_text("\r\n".join(zeros) + "\r\n")
    with pytest.raises(DataError, match=re.escape(f"{labels}: every label value is 0 in its 24 rows")):
        ucm(tmp_path / "U")


def test_ucmerced_image_listed_twice_names_it_and_both_lines(tmp_path):
    labels = ucmerced_folder(tmp_path / "U")
    lines = labels.read_text().splitlines()
    lines.insert(5, lines[1])  # airplane00 again, at line 6
    labels.write_text("\r\n".join(lines) + "\r\n")
    with pytest.raises(DataError, match=re.escape(f"{labels} lines 2 and 6: image 'airplane00' is listed twice")):
        ucm(tmp_path / "U")


def test_ucmerced_trailing_tab_is_accepted_and_reads_the_same(tmp_path):
    ucmerced_folder(tmp_path / "plain" / "U")
    ucmerced_folder(tmp_path / "tabbed" / "U", end="\t")
    a, b = ucm(tmp_path / "plain" / "U"), ucm(tmp_path / "tabbed" / "U")
    assert a["labels"] == b["labels"] == UCM_NAMES
    for k in ("train", "val", "test"):
        assert np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1])
    labels = tmp_path / "tabbed" / "U" / "LandUse_Multilabeled.txt"
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 2)[0] + "\t"  # a value missing before the trailing tab: still an error
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 4: expected an image name and 17 values.*got 16 values"):
        ucm(tmp_path / "tabbed" / "U")


# === teaching: WALKTHROUGH.md runs as printed, the figures (figures.py, draw.py), the run's pictures ===============

SNIPPET = re.compile(r"```python\n(.*?)```[ \t]*\n\s*```text\n(.*?)```", re.S)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is as fast, and many times faster on a busy machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- WALKTHROUGH.md: every snippet runs, in order, in one namespace, and prints what the page shows --------------

def walkthrough_snippets(path: Path = ROOT / "WALKTHROUGH.md") -> list:
    """[(code, printed output)] of the page: every ```python block and the ```text block right after it."""
    text = path.read_text()
    pairs = SNIPPET.findall(text)
    assert len(pairs) == text.count("```python"), "every ```python block is followed by its ```text output block"
    return pairs


def run_snippets(pairs: list) -> list:
    """Execute the snippets in order in one namespace → what each printed."""
    namespace, printed = {"__name__": "walkthrough"}, []
    for i, (code, _) in enumerate(pairs, 1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"WALKTHROUGH.md snippet {i}", "exec"), namespace)
        printed.append(out.getvalue())
    return printed


@pytest.fixture
def restore_globals(monkeypatch, tmp_path):
    """The snippets set module globals (small evaluation sets, print options, one torch thread): undone after."""
    monkeypatch.setattr(rs_data, "SYNTH_EVAL", dict(rs_data.SYNTH_EVAL))
    monkeypatch.setattr(rs_data, "REC_TILES", rs_data.REC_TILES)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the tiny run's folder
    yield
    torch.set_printoptions(profile="default")  # (the thread count: one_thread)


def test_walkthrough_snippets_print_what_the_page_shows(restore_globals, one_thread):
    pairs = walkthrough_snippets()
    assert len(pairs) >= 8
    assert all(len(code.strip().splitlines()) <= 15 for code, _ in pairs), "a snippet holds at most 15 lines"
    for i, ((code, shown), got) in enumerate(zip(pairs, run_snippets(pairs)), 1):
        assert same_printout(got, shown), f"snippet {i} printed\n{got}\nbut the page shows\n{shown}\n(code:\n{code})"


DECIMAL = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")


def same_printout(got: str, shown: str) -> bool:
    """The same text, and the same decimal numbers up to their last digits (another CPU's float kernels may round
    differently): 1e-3 relative or absolute. Integers, shapes and every word must be equal."""
    if DECIMAL.sub("#", got) != DECIMAL.sub("#", shown):
        return False
    return all(math.isclose(float(x), float(y), rel_tol=1e-3, abs_tol=1e-3)
               for x, y in zip(DECIMAL.findall(got), DECIMAL.findall(shown)))


def test_printouts_compare_words_exactly_and_decimals_to_their_last_digits():
    assert same_printout("L = 1.2967 (2, 16)\n", "L = 1.2968 (2, 16)\n")
    assert not same_printout("L = 1.2967 (2, 16)\n", "L = 1.3067 (2, 16)\n")
    assert not same_printout("L = 1.2967 (2, 17)\n", "L = 1.2967 (2, 16)\n")
    assert not same_printout("R = 1.2967\n", "L = 1.2967\n")


def test_walkthrough_parser_pairs_code_with_output():
    page = ("x\n```python\nprint(1)\n```\n\n```text\n1\n```\n```bash\nls\n```\n"
            "```python\nprint(2)\n```\n```text\n2\n```\n")
    path = Path(tempfile.mkdtemp()) / "page.md"
    path.write_text(page)
    assert walkthrough_snippets(path) == [("print(1)\n", "1\n"), ("print(2)\n", "2\n")]
    assert run_snippets(walkthrough_snippets(path)) == ["1\n", "2\n"]
    path.write_text(page + "```python\nprint(3)\n```\n")  # a snippet without its output block
    with pytest.raises(AssertionError):
        walkthrough_snippets(path)


# --- figures.py (the command) and draw.py (the helpers) -------------------------------------------------------

def test_figures_command_writes_the_teaching_figures(tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(figures.FIGURES, "teacher", lambda: figures.teacher_figure(steps=3))  # fewer steps
    figures.main(["--out", str(tmp_path)])
    for name in ("beta_density", "mixup", "teacher", "masking"):
        path = tmp_path / f"{name}.png"
        assert 2_000 < path.stat().st_size < 200_000, name
        w, h = Image.open(path).size
        assert 500 <= w <= 1400 and 300 <= h <= 800, (name, w, h)


def test_committed_figures_exist_are_small_and_linked_from_the_walkthrough():
    page = (ROOT / "WALKTHROUGH.md").read_text()
    for name in ("beta_density", "mixup", "teacher", "masking", "runs_matrices", "runs_reconstructions",
                 "run_finetune_reconstructions"):
        path = ROOT / "figures" / f"{name}.png"
        assert path.is_file() and path.stat().st_size < 120_000 and f"(figures/{name}.png)" in page, name


def test_heatmap_writes_the_number_in_every_cell():
    values = [[1.0, 2.5], [None, 40.25]]
    numbers, lay = draw.heatmap(values, ["a", "b"], ["x", "y"], "t", fmt="{:.2f}", with_layout=True)
    blank, lay_blank = draw.heatmap(values, ["a", "b"], ["x", "y"], "t", fmt=lambda v: "", with_layout=True)
    assert numbers.size == lay["size"] == draw.heatmap_layout(values, ["a", "b"], ["x", "y"], "t", "",
                                                                   "{:.2f}")["size"]
    numbers, blank = np.asarray(numbers), np.asarray(blank)
    assert len(lay["cells"]) == 2 and all(len(r) == 2 for r in lay["cells"])
    for v, (x0, y0, x1, y1), (u0, v0, u1, v1) in zip(sum(values, []), sum(lay["cells"], []),
                                                     sum(lay_blank["cells"], [])):
        without = blank[v0 + 2:v1 - 2, u0 + 2:u1 - 2].reshape(-1, 3)
        with_number = numbers[y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3)
        assert (len(np.unique(without, axis=0)) == 1) == (v is not None)  # no number: one plain colour (None: 'n/a')
        background = with_number[0]
        text = with_number[(with_number != background).any(1)]
        assert 20 < len(text) < 0.6 * len(with_number)  # the number's strokes, inside the cell
        ink = draw.GREY if v is None else draw.ink_on(background)  # dark or white on the colour, grey n/a
        assert np.abs(text.astype(int) - np.array(ink)).sum(1).min() < 60
    colours = {tuple(blank[v0 + 3, u0 + 3]) for u0, v0, _, _ in sum(lay_blank["cells"], [])}
    assert len(colours) == 4  # three values on the colour map, one grey 'not measured'


def test_colormap_runs_dark_to_bright_and_text_stays_readable():
    c = draw.colormap(np.linspace(0, 1, 11)).astype(float)
    lum = c @ [0.299, 0.587, 0.114]
    assert (np.diff(lum) > 0).all()  # perceptual: brightness rises monotonically
    assert np.array_equal(draw.colormap(0.2, reverse=True), draw.colormap(0.8))
    assert draw.ink_on(draw.colormap(0.0)) == draw.WHITE
    assert draw.ink_on(draw.colormap(1.0)) == draw.INK


def test_text_is_drawn_with_a_legible_font_and_the_bitmap_fallback(monkeypatch):
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(draw, "font", lambda size: None)
            draw.text_mask.cache_clear()
        w, h = draw.text_size("after T1 (synth_pan)", 13)
        assert 80 < w < 260 and 10 <= h <= 30
        img = Image.new("RGB", (300, 60), draw.WHITE)
        draw.draw_text(img, (150, 30), "R = 0.9836", 13, anchor="mm")
        ink = np.argwhere(np.asarray(img).min(-1) < 128)
        assert len(ink) > 20 and abs(ink[:, 1].mean() - 150) < 12 and abs(ink[:, 0].mean() - 30) < 8  # centred
    draw.text_mask.cache_clear()


def test_image_grid_places_each_picture_in_its_box():
    cells = [[np.full((10, 20, 3), 50 * (i + 2 * j), np.uint8) for j in range(3)] for i in range(2)]
    img = np.asarray(draw.image_grid(cells, ["r0", "r1"], ["c0", "c1", "c2"], "title", notes=[["n"] * 3] * 2))
    lay = draw.grid_layout([20] * 3, [10] * 2, ["r0", "r1"], ["c0", "c1", "c2"], "title", "", True)
    assert img.shape[:2] == (lay["size"][1], lay["size"][0])
    for i in range(2):
        for j in range(3):
            x0, y0, x1, y1 = lay["boxes"][i][j]
            assert (x1 - x0, y1 - y0) == (20, 10) and (img[y0:y1, x0:x1] == 50 * (i + 2 * j)).all()


def test_line_plot_clips_curves_to_the_axes():
    assert draw.clip_polyline([(0, 0), (1, 2), (2, 0)], 0, 1) == [[(0, 0), (0.5, 1.0)], [(1.5, 1.0), (2, 0)]]
    assert draw.clip_polyline([(0, -1), (1, 3)], 0, 1) == [[(0.25, 0.0), (0.5, 1.0)]]  # through both edges
    assert draw.clip_polyline([(0, 2), (1, 3)], 0, 1) == []
    assert draw.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    img = draw.line_plot([dict(x=[0, 1], y=[0, 5], label="a")], "t", "x", "y", ylim=(0, 1), size=(300, 200))
    assert img.size == (300, 200)


# --- the run's pictures ---------------------------------------------------------------------------------------

def test_informative_band_is_shown_in_grey():
    rgb = np.array([[[30, 60, 91], [255, 0, 1]]], np.uint8)  # [1, 2, 3]
    pan = eval_mlknn.band_view(rgb, eval_mlknn.task_band("synth_pan"))
    assert pan[0, :, 0].tolist() == [60, 85] and (pan == pan[..., :1]).all()  # the mean of the bands, grey
    for name, band in (("synth_red", 0), ("synth_green", 1), ("synth_blue", 2)):
        assert eval_mlknn.task_band(name) == band
        assert (eval_mlknn.band_view(rgb, band) == rgb[..., band:band + 1]).all()
    assert eval_mlknn.task_band("potsdam") == "rgb" and eval_mlknn.band_view(rgb, "rgb") is rgb


def test_panel_view_paints_the_removed_patches():
    h = 4
    original = np.random.default_rng(0).integers(0, 255, (h, h, 3), dtype=np.uint8)
    masked = original.copy()
    masked[:2, :2] = (124, 116, 104)  # a removed patch: MAE's mean colour
    panel = np.concatenate([original, masked, original], 1)
    out = eval_mlknn.panel_view(panel, 0)
    assert (out[:2, h:h + 2] == draw.MASK_COLOR).all()
    assert (out[2:, h:2 * h] == original[2:, :, :1]).all() and (out[:, :h] == original[..., :1]).all()
    assert eval_mlknn.panel_view(panel, "rgb") is panel


def picture_cfg(tmp_path, **kw):
    base = dict(tasks=["synth_pan", "synth_red"], model="vit_test", epochs=1, batch_size=8, synth_train=32,
                memory_size=20, log_every=2, out=str(tmp_path / "run"), device="cpu", warmup_epochs=0.5,
                mim_form="simclr")
    return cosmae.resolve(cosmae.Config(**{**base, **kw}))


def run_with_eval(cfg):
    """A run as `python cosmae.py` makes it, in process, with its evaluation callback."""
    with runner.Run(cfg, callbacks=[eval_mlknn.Evaluation(cfg)]) as r:
        cosmae.train(cfg, r)


def check_run_pictures(out: Path, tasks: list, points: int):
    """reconstructions.png: a row per task, a column per evaluation point, each cell the first tile of its task's
    row of reconstructions_T<t>.png; the heat maps: a row per evaluation point, a column per task."""
    rows = eval_mlknn.read_rows(out)
    img, lay = eval_mlknn.reconstructions_picture(out, tasks, rows)
    on_disk = np.asarray(Image.open(out / "reconstructions.png").convert("RGB"))
    assert np.array_equal(on_disk, np.asarray(img))
    assert len(lay["boxes"]) == len(tasks) and all(len(r) == points for r in lay["boxes"])
    size = eval_mlknn.RECON_CELL
    for t in range(points):
        panel = np.asarray(Image.open(out / f"reconstructions_T{t}.png").convert("RGB"))
        h = panel.shape[0] // len(tasks)
        assert panel.shape[0] == h * len(tasks)
        for j in range(len(tasks)):
            x0, y0, x1, y1 = lay["boxes"][j][t]
            assert (x1 - x0, y1 - y0) == (3 * size + 6, size)
            original = np.asarray(Image.fromarray(panel[j * h:(j + 1) * h, :h]).resize((size, size), Image.BOX))
            assert np.array_equal(on_disk[y0:y1, x0:x0 + size], original)
            assert (original == original[..., :1]).all()  # a synthetic sensor: its band in grey
            masked = on_disk[y0:y1, x0 + size + 3:x0 + 2 * size + 3]
            assert (masked == draw.MASK_COLOR).all(-1).mean() > 0.5  # r = 0.75 of it removed (blue)
    drawn = eval_mlknn.run_matrices(tasks, rows, "cosmae")
    assert set(drawn) == {"accuracy_matrix.png", "reconstruction_matrix.png"}
    for name, (img, lay) in drawn.items():
        assert np.array_equal(np.asarray(Image.open(out / name).convert("RGB")), np.asarray(img))
        assert len(lay["cells"]) == points and all(len(r) == len(tasks) for r in lay["cells"])


def test_run_writes_reconstructions_and_matrix_pictures_also_after_a_resume(tmp_path, small_eval, monkeypatch,
                                                                            one_thread):
    cfg = picture_cfg(tmp_path)
    real = cosmae.train_task

    def crash_in_task_2(t, *a, **k):
        if t == 2:
            raise RuntimeError("the process dies here: only the files on disk survive")
        return real(t, *a, **k)

    monkeypatch.setattr(cosmae, "train_task", crash_in_task_2)
    with pytest.raises(RuntimeError):
        run_with_eval(cfg)
    out = Path(cfg.out)
    check_run_pictures(out, cfg.tasks, 2)  # init and after T1
    before = np.asarray(Image.open(out / "reconstructions.png"))
    monkeypatch.setattr(cosmae, "train_task", real)
    run_with_eval(picture_cfg(tmp_path))  # a new process: the resume draws from what is on disk
    check_run_pictures(out, cfg.tasks, 3)
    after = np.asarray(Image.open(out / "reconstructions.png"))
    assert after.shape[1] > before.shape[1] and after.shape[0] == before.shape[0]  # one more column, same rows
    x_init = eval_mlknn.reconstructions_picture(out, cfg.tasks, eval_mlknn.read_rows(out))[1]["boxes"][0][0]
    assert np.array_equal(after[x_init[1]:x_init[3], x_init[0]:x_init[2]], before[x_init[1]:x_init[3],
                                                                                   x_init[0]:x_init[2]])


def test_cli_figures_compare_labels_side_by_side(tmp_path, small_eval, capsys, one_thread):
    for method in ("cosmae", "finetune"):
        run_with_eval(picture_cfg(tmp_path, method=method, out=str(tmp_path / method)))
    folders = [str(tmp_path / "cosmae"), str(tmp_path / "finetune")]
    eval_mlknn.main(folders + ["--figures", str(tmp_path / "figs")])
    assert "pictures:" in capsys.readouterr().out
    labels = eval_mlknn.group_runs([e for f in folders for e in eval_mlknn.load_run(f)])
    assert list(labels) == ["cosmae", "finetune"]
    img, lay = eval_mlknn.compare_reconstructions(labels, ["synth_pan", "synth_red"])
    assert len(lay["boxes"]) == 2 and all(len(r) == 2 for r in lay["boxes"])  # rows = tasks, a column per label
    on_disk = np.asarray(Image.open(tmp_path / "figs" / "reconstructions.png").convert("RGB"))
    assert on_disk.shape[:2] == (lay["size"][1], lay["size"][0])
    for c, method in enumerate(labels):  # each label's column: its run's cells after its last task
        own = eval_mlknn.reconstructions_picture(tmp_path / method, ["synth_pan", "synth_red"],
                                                 eval_mlknn.read_rows(tmp_path / method))
        own_img = np.asarray(own[0])
        for j in range(2):
            x0, y0, x1, y1 = lay["boxes"][j][c]
            u0, v0, u1, v1 = own[1]["boxes"][j][-1]
            assert np.array_equal(on_disk[y0:y1, x0:x1], own_img[v0:v1, u0:u1])
    matrices = Image.open(tmp_path / "figs" / "matrices.png")
    assert matrices.size == eval_mlknn.compare_matrices(labels, ["synth_pan", "synth_red"]).size
    assert matrices.height > 2 * 150 and matrices.width > 2 * 300  # two labels × (A | R)
    with pytest.raises(SystemExit):
        eval_mlknn.main(["--figures", str(tmp_path / "figs")])  # no run folder named


# --- the inferred choices that have a flag: λ1 per image, one teacher per epoch ------------------------------------

def test_lam1_per_image_mixes_each_image_with_its_own_lambda(tmp_path, monkeypatch):
    """Eq. (2) with --lam1-per image: row i of the mixed batch is λ1_i·x_i + (1 − λ1_i)·x_M,i."""
    seen = []
    real = cosmae.mix_batch
    monkeypatch.setattr(cosmae, "mix_batch", lambda x, xm, lam: seen.append((x, xm, lam)) or real(x, xm, lam))
    train(tiny_cfg(tmp_path, lam1_per="image", model_mixup=False))
    x, xm, lam = seen[0]
    assert lam.shape == (8, 1, 1, 1) and len(set(lam.flatten().tolist())) == 8  # one draw per image
    mixed = real(x, xm, lam)
    for i in range(8):
        assert torch.allclose(mixed[i], lam[i, 0, 0, 0] * x[i] + (1 - lam[i, 0, 0, 0]) * xm[i])
    recs = [r for r in records(tmp_path / "run") if r["task"] == 2]
    assert all(0 < r["lam1"] < 1 for r in recs)  # the mean λ1 of the batch is logged


def test_teacher_every_epoch_keeps_one_teacher_for_the_epoch(tmp_path, monkeypatch):
    rebuilt = []
    real = cosmae.MixupTeacher.rebuild
    monkeypatch.setattr(cosmae.MixupTeacher, "rebuild", lambda self, lam2: rebuilt.append(lam2) or real(self, lam2))
    train(tiny_cfg(tmp_path, teacher_every="epoch", epochs=2, log_every=1))
    assert len(rebuilt) == 2  # task 2, two epochs: one teacher each
    lam2 = [(r["epoch"], r["lam2"]) for r in records(tmp_path / "run") if r["task"] == 2]
    assert [l for e, l in lam2 if e == 0] == [rebuilt[0]] * 4 and [l for e, l in lam2 if e == 1] == [rebuilt[1]] * 4
    train(tiny_cfg(tmp_path, out=str(tmp_path / "step"), epochs=2))
    assert len(rebuilt) == 2 + 8  # the default: a new teacher every step
