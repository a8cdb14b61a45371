import json
import math
import os
import resource
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import baselines
import bench
import cosmae
import eval_mlknn
import figures
import rs_data
import runner
from cosmae import Config, ReplayBuffer, mim_loss
from conftest import ROOT, records, tiny_cfg, train


def _ddp_worker(rank, world, port, cfg_kw, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = cosmae.resolve(Config(**cfg_kw))
    runner.setup_distributed(cfg)
    res = train(cfg)
    torch.save(res["model"].state_dict(), f"{out}/rank{rank}.pt")
    g = torch.Generator().manual_seed(0)  # Eq. (4) over the global batch: rows 2·rank, 2·rank + 1 are this process's
    z, t = torch.randn(2 * world, 6, generator=g), torch.randn(2 * world, 6, generator=g)
    mine = z[2 * rank:2 * rank + 2].clone().requires_grad_()
    loss = mim_loss(runner.gather(mine), runner.gather(t[2 * rank:2 * rank + 2]), 0.5)
    loss.backward()
    torch.save(dict(loss=loss.detach(), grad=mine.grad), f"{out}/gather{rank}.pt")
    runner.teardown_distributed()  # as runner.main ends a torchrun run


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_train_one_model_log_each_step_once_and_gather_eq4_over_the_global_batch(tmp_path):
    """torchrun's path on CPU (gloo): the two processes end with the same weights; only process 0 writes. Each
    process's Eq. (4) is the loss of the whole global batch; its gradient on its own rows is W times the
    single-process one (all_gather's backward sums the W identical losses), which DDP's mean over the W processes
    turns back into the single-process gradient of the weights."""
    kw = dict(tasks=["synth_red", "synth_green"], model="vit_test", epochs=1, batch_size=8, synth_train=16,
              memory_size=20, eval=False, log_every=1, device="cpu", warmup_epochs=0.5)
    mp.start_processes(_ddp_worker, args=(2, free_port(), dict(kw, out=str(tmp_path / "ddp")), str(tmp_path)),
                       nprocs=2, start_method="fork")  # fork: the children need not import torch again
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the same encoder (and decoder) on both ranks
    log = records(tmp_path / "ddp")
    assert [(r["task"], r["step"]) for r in log] == [(t, s) for t in (1, 2) for s in range(1, 3)]
    assert log[-1]["loss/mim"] != 0 and all(math.isfinite(r["loss/total"]) for r in log)
    assert (tmp_path / "ddp" / "task2_synth_green.pt").exists() and not (tmp_path / "ddp" / "rank1.pt").exists()
    got = [torch.load(tmp_path / f"gather{r}.pt", weights_only=True) for r in (0, 1)]
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


def test_bench_times_each_step_counts_its_flops_profiles_and_writes_json(tmp_path, capfd, one_thread):
    out = tmp_path / "bench.json"
    bench.main(["--model", "vit_test", "--device", "cpu", "--batch", "4", "--repeats", "1", "--warmup", "0",
                "--profile", "--json", str(out)])
    printed = capfd.readouterr().out
    r = json.loads(out.read_text())
    assert all(r["seconds"][k] > 0 and r["images_per_s"][k] > 0 for k in "abcdefg")
    assert all(r["flops"][k] > 0 for k in "abfg") and r["flops"]["b"] > r["flops"]["a"]
    assert "(b) CoSMAE step" in printed and "× (a)'s time for" in printed and r["paper_protocol_hours"] > 0
    for k in "ab":  # the profile: torch.profiler's table of the operations with the most self time
        assert "Self CPU time total" in r["profile"][k] and ("addmm" in r["profile"][k] or "linear" in r["profile"][k])
    assert printed.count("Self CPU time total") == 2


def test_unwritable_table_out_and_bad_eval_flags_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_mlknn, "load_run", lambda *a: (_ for _ in ()).throw(AssertionError("work done")))
    with pytest.raises(SystemExit) as e:
        eval_mlknn.main([str(tmp_path), "--table-out", str(tmp_path / "no" / "such" / "t.md")])
    assert e.value.code == 2 and "--table-out" in capsys.readouterr().err
    for flags, message in ((["--device", "tpu"], "--device tpu: not a device name"),
                           (["--model", "vit_huge"], "--model vit_huge: must be one of")):
        with pytest.raises(SystemExit) as e:
            eval_mlknn.main(["--ucmerced", str(tmp_path)] + flags)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_unwritable_outputs_and_bad_bench_flags_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    def bench_main(*flags):  # → (exit code, stderr)
        with pytest.raises(SystemExit) as e:
            bench.main(list(flags))
        return e.value.code, capsys.readouterr().err.strip()
    assert bench_main("--repeats", "0") == (2, "error: --repeats 0: must be finite and ≥ 1")
    assert bench_main("--peak-tflops", "inf") == (2, "error: --peak-tflops inf: must be finite and ≥ 0")
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file" / "b.json", tmp_path):  # checked before the work: no folder, a folder
        assert bench_main("--json", str(bad)) == (2, f"error: --json {bad}: cannot write a file there; name a file in "
                                                     "a writable folder")
    code, err = bench_main("--device", "tpu")
    assert code == 2 and err.startswith("error: --device tpu: not a device name")
    # a full temporary folder (a file size limit of 1 MiB): one line naming the file and TMPDIR, the folder removed
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        code, err = bench_main("--model", "vit_test", "--device", "cpu")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert code == 2 and err.startswith("error: no space left on the device writing ") and "TMPDIR" in err
    assert len(err.splitlines()) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]
    monkeypatch.setattr(bench, "run_bench", lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert bench_main() == (130, "bench: interrupted (nothing to resume: its files were temporary)")
    monkeypatch.setitem(figures.FIGURES, "mixup", lambda: (_ for _ in ()).throw(AssertionError("work done")))
    with pytest.raises(SystemExit) as e:
        figures.main(["--out", str(tmp_path / "file"), "--only", "mixup"])
    assert e.value.code == 2 and capsys.readouterr().err == (f"error: --out {tmp_path / 'file'}: cannot write there; "
                                                             "name a writable folder (see python -m figures --help)\n")
