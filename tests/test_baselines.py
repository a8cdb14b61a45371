import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines
import cosmae
import eval_mlknn
import rs_data
import runner
from cosmae import Config
from conftest import ROOT, encoder_of, records, tiny_cfg, tiny_model, train


@pytest.mark.parametrize("method", ["cosmae", "finetune", "er", "ewc", "der", "lump", "pfr"])
def test_each_method_runs_two_tiny_tasks_with_finite_losses(tmp_path, method, monkeypatch, request):
    """Every row of Table II on two tiny tasks, and what is particular to ER (its batches), DER (its stored
    features) and LUMP (its reservoir and mixup)."""
    sizes, real_augment = [], rs_data.augment  # the batches of cosmae.train_step (ER's too)
    monkeypatch.setattr(rs_data, "augment", lambda tiles, *a: sizes.append(len(tiles)) or real_augment(tiles, *a))
    if method == "cosmae":  # the session's finished run (tiny_cfg)
        out = request.getfixturevalue("finished_run").out
        checkpoints = [p for _, _, p in runner.finished_tasks(out, ["synth_red", "synth_green"])]
    else:
        out = tmp_path / method
        cfg = tiny_cfg(tmp_path, method=method, out=str(out), **(dict(replay_batch=3) if method == "er" else {}))
        checkpoints = train(cfg)["checkpoints"]
    recs = records(out)
    assert len(checkpoints) == 2 and all(math.isfinite(r["loss/total"]) for r in recs)
    t2 = [r for r in recs if r["task"] == 2]
    if method in ("finetune", "er", "lump"):
        assert all(r["loss/mim"] == 0 for r in t2)
    elif method in ("cosmae", "pfr"):  # distillation from the first step of task 2
        assert all(r["loss/mim"] != 0 for r in t2)
    else:  # EWC's penalty and DER's MSE are 0 until the weights leave those of the end of task 1
        assert t2[0]["loss/mim"] == 0 and t2[-1]["loss/mim"] > 0
    assert all(r["lam1"] == 1 for r in t2) == (method not in ("cosmae", "lump"))
    ck1, ck2 = (torch.load(p, weights_only=True) for p in checkpoints)
    if method == "er":  # task 1: the batch alone; task 2: + 3 buffer images
        assert sizes == [8] * 4 + [11] * 4
    if method == "der":  # the stored features are the encoder's right after task 1, when its images were stored
        model = cosmae.build_model(cfg)
        model.load_state_dict(ck1["model"])
        feats = eval_mlknn.extract_features(model, ck1["buffer"]["task1"], cfg.pool, cfg.device)
        assert np.allclose(ck1["method"]["feats1"].numpy(), feats, atol=1e-5)
        assert torch.equal(ck2["method"]["feats1"], ck1["method"]["feats1"])  # kept, not recomputed
        assert len(ck2["buffer"]["task1"]) == 10  # the buffer keeps a prefix; DER uses the same prefix of its features
    if method == "lump":
        assert all(r["lam1"] == 1 for r in recs if r["task"] == 1)  # §III-D: task 1 as every method
        assert all(r["loss/mim"] == 0 for r in recs)
        assert int(ck1["method"]["seen"]) == 32 and int(ck2["method"]["seen"]) == 64  # the stream, every step
        assert ck1["method"]["tiles"].shape[0] == 20  # M images, not balanced per task
        data_mixup_only = train(tiny_cfg(tmp_path, model_mixup=False, out=str(tmp_path / "mixup_only")))
        a, b = encoder_of(checkpoints[-1]), encoder_of(data_mixup_only["checkpoints"][-1])
        assert not all(torch.equal(a[k], b[k]) for k in a)  # Table II's LUMP is not Table I's data-mixup-only row


def test_baselines_cli_runs_a_row_and_cosmae_has_no_baseline_code(tmp_path, capsys):
    baselines.main(["--method", "er", "--tasks", "synth_red", "--model", "vit_test", "--epochs", "1",
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
    assert math.isclose(values[-1], float(want.detach()), rel_tol=1e-5)  # λ/2 · Σ F (θ − θ*)²


def test_pfr_loss_zero_for_identity_projector_and_equal_encoders(tmp_path):
    student, x, g = tiny_model(), torch.randn(4, 3, 32, 32), torch.nn.Identity()
    pfr, latent = baselines.PFR(tiny_cfg(tmp_path, method="pfr")), student.forward_encoder(x, 0.0)[0]
    same = {k: v.clone() for k, v in student.state_dict().items() if cosmae.is_encoder_key(k)}
    pfr.start_task(2, student, same)  # PFR's teacher: e_{t−1}
    assert abs(pfr.term(student, g, x, latent, None, None).item()) < 1e-6
    pfr.start_task(2, student, {k: v + 0.1 * torch.randn_like(v) for k, v in same.items()})
    assert pfr.term(student, g, x, latent, None, None).item() > 1e-3
    p, z = torch.randn(5, 7), torch.randn(5, 7)  # 1 − mean cosine, by hand (p: the mean of the patch tokens)
    pfr.old = lambda x: z
    want = 1 - np.mean([float(p[i] @ z[i] / (p[i].norm() * z[i].norm())) for i in range(5)])
    got = pfr.term(student, g, x, torch.stack([torch.zeros(5, 7), p], 1), None, None).item()
    assert math.isclose(got, want, rel_tol=1e-5)


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
            raw = torch.from_numpy(np.stack([ids // 256, ids % 256, ids * 0], 1).astype(np.uint8)).view(10, 3, 1, 1)
            lump.after_step(raw, rng)
        got = lump.tiles[:, 0, 0, 0].long() * 256 + lump.tiles[:, 1, 0, 0].long()
        assert lump.seen == 500 and len(set(got.tolist())) == 50
        kept[got.numpy()] += 1
    assert abs(kept[:250].sum() - kept[250:].sum()) < 0.25 * kept.sum()  # early and late images alike
    assert 200 < np.mean(np.flatnonzero(kept).repeat(kept[kept > 0].astype(int))) < 300
