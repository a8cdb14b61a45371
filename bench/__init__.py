"""Speed of CoSMAE's hot paths, measured in one run on the same model, batch and device.

    (a) a plain MAE training step            train_step(..., teacher=None, mixup=False)    (task 1)
    (b) a full CoSMAE step                   train_step(..., MixupTeacher, mixup=True)      (tasks 2..T)
        = augment + data mixup (Eq. 2) + teacher rebuild (Eq. 3) + teacher forward + projector + Eq. (4)-(5)
          + backward + AdamW
    (c) the teacher rebuild alone            MixupTeacher.rebuild(λ2)
    (d) the input pipeline alone             memory-mapped uint8 .npy cache → rs_data.batches() → augment()
    (e) frozen-encoder feature extraction    eval_mlknn.extract_features() (what the ML-kNN evaluation runs)
    (f) an ER step (baselines.py)            (a) on the batch plus ⌈0.045·B⌉ buffer images
    (g) a DER step (baselines.py)            (a) plus an unmasked encoder pass on ⌈0.14·B⌉ buffer images

(h) --end-to-end: `python cosmae.py` itself, in the paper's shape: US3D then UAVid files generated in their
    official layouts at their real sizes, read through the tile cache; task 1, then task 2 with the buffer and the
    teacher; at least --e2e-steps steps of each. Its measured img/s (from metrics.jsonl) against (a) and (b), and
    the share of the time the loop waited for the data.

Each figure is the median of --repeats timed calls after --warmup calls; on CUDA the device is synchronised
around each timed call, never inside it. FLOPs (forward + backward) are counted with FlopCounterMode over
one step of (a), (b), (f) and (g): (b)/(a) in time should approach (b)/(a) in FLOPs, since everything (b) adds
that is not a matmul (buffer draw, mixup, rebuild, loss) should be cheap. (f)/(a) and (g)/(a) are the costs of
ER and DER over fine-tuning; Table II's training hours imply +4.5 % and +25 % on tasks 2-4 (README, "Speed").

Run:
    python bench.py --device cpu --batch 8 --repeats 3     # ViT-B/16 on a small CPU box (~12 min on 2 cores)
    python bench.py --model vit_tiny --device cpu          # seconds
    python bench.py                                        # GPU: ViT-B/16, batch 128, bf16 autocast
    python bench.py --compile --json bench_h100.json       # torch.compile, and all figures as JSON
    python bench.py --end-to-end                           # GPU: also a real run, 2 × 300 steps (~4 GB of files)
    python bench.py --profile                              # also where the time of (a) and (b) goes
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import baselines
import cosmae
import eval_mlknn
import rs_data
import runner
from rs_data import DataError

PAPER_TRAIN = {"us3d": 21081, "uavid": 24560, "potsdam": 15870, "treesat": 15000}  # training images per task
PAPER_EPOCHS = 300
TMP_TODO = "free space in the temporary folder, or point TMPDIR at a folder with more, and rerun"
PEAK_BF16 = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L4", 121)]  # dense TFLOP/s


def parse_args():
    p = runner.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base", choices=list(cosmae.MODELS))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=0, help="images per step (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher (cfg.compile)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (torch.set_num_threads; 0 = torch's default)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--peak-tflops", type=float, default=0, help="bf16 dense peak of a GPU not in PEAK_BF16")
    p.add_argument("--json", default="", help="also write all figures to this file")
    p.add_argument("--profile", action="store_true", help="also where the time of (a) and (b) goes: torch.profiler's "
                   "operations with the most self time on the device, and how busy the device was")
    p.add_argument("--end-to-end", action="store_true", help="also run python cosmae.py on generated US3D and UAVid "
                   "files in their official layouts (h) and compare its measured speed with (a) and (b)")
    p.add_argument("--e2e-steps", type=int, default=300, help="steps of each of the two tasks of --end-to-end")
    args = p.parse_args()
    for name, ok, allowed in [("batch", args.batch >= 0, "≥ 0 (0 = by device)"),
                              ("repeats", args.repeats >= 1, "≥ 1"),
                              ("warmup", args.warmup >= 0, "≥ 0"), ("threads", args.threads >= 0, "≥ 0"),
                              ("e2e_steps", args.e2e_steps >= 2, "≥ 2"),
                              ("peak_tflops", 0 <= args.peak_tflops < float("inf"), "a finite number ≥ 0")]:
        if not ok:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {allowed}")
    return args


def timeit(fns: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    """Median wall time in seconds of each fn() in `fns`. The fns take turns (a, b, c, ..., a, b, c, ...), so
    that a noisy machine slows them alike; the device is synchronised around each timed call only."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def count_flops(fn) -> int:
    """FLOPs of one call of fn (matmuls, convolutions, attention; forward and backward). Attention runs
    through the math backend here so that every device counts it (the CPU flash kernel has no formula)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def tile_cache(path: Path, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random uint8 [n, 3, size, size] .npy written and memory-mapped back, as the real tile cache is."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    for i in range(0, n, 256):
        out[i:i + 256] = rng.integers(0, 256, out[i:i + 256].shape, dtype=np.uint8)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def peak_tflops(device: torch.device, given: float) -> float:
    """bf16 dense peak of the GPU from PEAK_BF16 by device name (--peak-tflops wins); 0 = unknown."""
    name = torch.cuda.get_device_name(device)
    return given or next((peak for key, peak in PEAK_BF16 if all(w in name for w in key.split())), 0)


def paper_hours(ips_a: float, ips_b: float, batch: int) -> float:
    """Wall time of the paper's protocol (4 tasks × 300 epochs, drop_last batches): task 1 at (a)'s
    images/s, tasks 2-4 at (b)'s."""
    imgs = [n // batch * batch * PAPER_EPOCHS for n in PAPER_TRAIN.values()]
    return (imgs[0] / ips_a + sum(imgs[1:]) / ips_b) / 3600


def profile(fns: dict, names: dict, device: torch.device, calls: int = 3, rows: int = 12) -> dict:
    """Where the time of each fn goes: torch.profiler over `calls` calls after one warm-up call → per fn the wall
    time of a call, the time the device was busy in it (on a GPU: the sum of its kernels' times; below the wall
    time, the device waited for the host) and the `rows` operations with the most self time, printed."""
    from torch.profiler import ProfilerActivity
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}
    for k, fn in fns.items():
        fn()
        sync()
        acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            wall = (time.perf_counter() - t0) / calls
        ops = [e for e in prof.key_averages()  # on a GPU its kernels (an operator's self device time repeats them)
               if not cuda or (e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)]
        ops = sorted(ops, key=lambda e: getattr(e, key), reverse=True)
        busy = sum(getattr(e, key) for e in ops) / calls / 1e6  # seconds per call
        top = [(e.key, getattr(e, key) / calls / 1e3, 100 * getattr(e, key) / calls / 1e6 / busy) for e in ops[:rows]]
        out[k] = dict(wall_ms=1e3 * wall, busy_ms=1e3 * busy, top=top)
        where = "the device busy" if cuda else "the operations' self CPU time"
        print(f"{names[k]}: {1e3 * wall:.1f} ms a call (profiled), {where} {1e3 * busy:.1f} ms of it"
              f"{f' ({100 * busy / wall:.0f} %)' if cuda else ''}; the operations that took the most:")
        for name, ms, pct in top:
            print(f"    {pct:5.1f} %  {ms:8.2f} ms  {name[:90]}")
    return out


E2E_TASKS = ("us3d", "uavid")  # the paper's first two tasks; write_layouts writes their files


def write_layouts(root: Path, patches: int, rng: np.random.Generator):
    """US3D and UAVid in their official layouts (README, "Data layout") at their real image sizes, with at least
    `patches` training patches each: 1024×1024 RGB TIFF tiles (16 patches each) and 3840×2160 PNG frames (120
    patches each), plus one validation image each. Random pixels: the speed does not depend on them."""
    for sub, n in (("Train-Track1-RGB", -(-patches // 16)), ("Validate-Track1-RGB", 1)):
        (root / "US3D" / sub).mkdir(parents=True)
        for i in range(n):
            tifffile.imwrite(root / "US3D" / sub / f"JAX_{i:03d}_001_RGB.tif",
                             rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    for split, seq, n in (("uavid_train", "seq1", -(-patches // 120)), ("uavid_val", "seq16", 1)):
        (root / "UAVid" / split / seq / "Images").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8)).save(
                root / "UAVid" / split / seq / "Images" / f"{i:06d}.png", compress_level=1)


def end_to_end(args, cfg, ips: dict, tmp: Path) -> dict:
    """(h): `python cosmae.py --tasks us3d uavid` on generated files, at least --e2e-steps steps a task (epochs of
    about 20 steps: a 3840×2160 frame holds 120 patches, so UAVid's can be longer), everything as in a real run
    (tile cache, background reading, checkpoints). → per task its img/s (the median of its metrics.jsonl records
    after the first, which holds the warm-up; and over all those records together, epoch ends included) against
    bench's (a) or (b), and its data wait."""
    per_epoch = min(20, args.e2e_steps)
    epochs = -(-args.e2e_steps // per_epoch)
    t0 = time.perf_counter()
    with rs_data.disk_errors(tmp / "data", TMP_TODO):
        write_layouts(tmp / "data", per_epoch * cfg.batch_size, np.random.default_rng(1))
    print(f"(h) end to end: files written in {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "cosmae.py"), "--tasks", *E2E_TASKS,
           "--data-root", str(tmp / "data"), "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "run"),
           "--model", cfg.model, "--batch-size", str(cfg.batch_size), "--epochs", str(epochs), "--warmup-epochs", "0",
           "--log-every", str(max(1, args.e2e_steps // 10)), "--device", cfg.device, "--no-eval"]
    cmd += ["--compile"] * args.compile + ["--no-amp"] * args.no_amp
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        raise DataError("(h) end to end: python cosmae.py failed (its message is above)")
    recs = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for t, k in ((1, "a"), (2, "b")):
        rs = [r for r in recs if r["task"] == t]
        steps = [r["step"] - prev["step"] for prev, r in zip(rs, rs[1:])]  # the steps each record covers
        rs = rs[1:]
        imgs, secs = sum(steps) * cfg.batch_size, sum(n * cfg.batch_size / r["img/s"] for n, r in zip(steps, rs))
        rate = statistics.median(r["img/s"] for r in rs)
        out[k] = dict(task=E2E_TASKS[t - 1], steps=rs[-1]["step"],
                      img_per_s_median=rate, img_per_s_overall=imgs / secs, of_bench=rate / ips[k],
                      data_wait_max=max(r["data_wait"] for r in rs),
                      data_wait_mean=sum(n * r["data_wait"] for n, r in zip(steps, rs)) / sum(steps))
    return out


def main():
    try:
        run_bench(parse_args())
    except DataError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench.py: interrupted (nothing to resume: its files were temporary)", file=sys.stderr)
        sys.exit(130)


def run_bench(args):
    if args.threads:  # on a shared CPU box, 1 thread avoids OpenMP stalls behind other processes
        torch.set_num_threads(args.threads)
    cfg = cosmae.resolve(cosmae.Config(model=args.model, tasks=["us3d"], device=args.device, amp=not args.no_amp))
    cfg.batch_size = batch = args.batch or (128 if cfg.device.startswith("cuda") else 8)
    runner.check_flags(cfg, cosmae.MODELS)  # --device
    cfg.compile = compile_ = args.compile
    device, img, rng = torch.device(cfg.device), cosmae.MODELS[cfg.model]["img_size"], np.random.default_rng(0)
    gen = torch.Generator(device).manual_seed(0)

    # --- the model, optimiser, θ_{t−1}, memory buffer and tile cache of a task-2 step ---------------------
    model = cosmae.build_model(cfg).to(device)
    projector = cosmae.make_projector(model.pos_embed.shape[-1], cfg.proj_hidden).to(device)
    opt = cosmae.make_optimizer(model, projector, cfg)
    theta_prev = {k: v.detach().clone() for k, v in model.state_dict().items() if cosmae.is_encoder_key(k)}
    teacher = cosmae.MixupTeacher(model, theta_prev, cfg.pool)
    net, teacher_c = (torch.compile(m, dynamic=False) for m in (model, teacher)) if compile_ else (model, teacher)
    tmp = tempfile.TemporaryDirectory()
    with rs_data.disk_errors(Path(tmp.name) / "tiles.npy", TMP_TODO):
        tiles = tile_cache(Path(tmp.name) / "tiles.npy", max(cfg.memory_size, 16 * batch),
                           rs_data.tile_size(cfg.tasks, img), rng)
    buffer = cosmae.ReplayBuffer(cfg.memory_size)
    buffer.add_task(1, tiles, rng)
    raw = torch.from_numpy(np.array(tiles[:batch])).to(device)  # the same batch for every step
    bcfg = {m: baselines.resolve(baselines.BaselineConfig(**{**vars(cfg), "method": m})) for m in ("er", "der")}
    er, der = baselines.ER(bcfg["er"]), baselines.DER(bcfg["der"])
    der.end_task(1, model, tiles, buffer)  # its stored features of the buffer

    def step_a():
        cosmae.train_step(net, projector, None, opt, raw, buffer, rng, gen, cfg, mixup=False)

    def step_b(t=teacher_c, m=net):
        cosmae.train_step(m, projector, t, opt, raw, buffer, rng, gen, cfg, mixup=True)

    def step_f():
        er.step(net, projector, None, opt, raw, buffer, rng, gen, bcfg["er"], False)

    def step_g():
        der.step(net, projector, None, opt, raw, buffer, rng, gen, bcfg["der"], False)

    def pipeline():
        for r in rs_data.batches(tiles, batch, rng, device):
            rs_data.augment(r, img, gen)

    feat_tiles = tiles[:2 * batch]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"device {device} ({where}) | {cfg.model}, batch {batch}, {img}px from {tiles.shape[-1]}px tiles"
          f" | amp {cfg.amp and device.type == 'cuda'}"
          f" | compile {compile_} | median of {args.repeats} after {args.warmup} warm-up", flush=True)

    # --- FLOPs of one step each, on the uncompiled model (FLOPs do not depend on compilation) --------------
    flops_a = count_flops(lambda: cosmae.train_step(model, projector, None, opt, raw, buffer, rng, gen, cfg, False))
    flops_b = count_flops(lambda: step_b(teacher, model))
    flops_f = count_flops(lambda: er.step(model, projector, None, opt, raw, buffer, rng, gen, bcfg["er"], False))
    flops_g = count_flops(lambda: der.step(model, projector, None, opt, raw, buffer, rng, gen, bcfg["der"], False))

    # --- timings --------------------------------------------------------------------------------------------
    t = timeit(dict(a=step_a, b=step_b, c=lambda: teacher.rebuild(0.5), d=pipeline,  # (d): one epoch of the cache
                    e=lambda: eval_mlknn.extract_features(model, feat_tiles, cfg.pool, device, cfg.amp, batch),
                    f=step_f, g=step_g),
               args.warmup, args.repeats, device)
    n_img = dict(a=batch, b=batch, c=batch, d=len(tiles) // batch * batch, e=len(feat_tiles), f=batch, g=batch)
    ips = {k: n_img[k] / t[k] for k in t}
    r = dict(device=str(device), model=cfg.model, batch=batch, amp=cfg.amp and device.type == "cuda",
             compile=compile_, seconds=t, images_per_s=ips, flops_a=flops_a, flops_b=flops_b,
             time_ratio_b_a=t["b"] / t["a"], flop_ratio_b_a=flops_b / flops_a, flops_f=flops_f, flops_g=flops_g,
             time_ratio_f_a=t["f"] / t["a"], flop_ratio_f_a=flops_f / flops_a,
             time_ratio_g_a=t["g"] / t["a"], flop_ratio_g_a=flops_g / flops_a,
             rebuild_pct_of_b=100 * t["c"] / t["b"], pipeline_x_b=ips["d"] / ips["b"])

    names = dict(a="(a) MAE step", b="(b) CoSMAE step", c="(c) teacher rebuild", d="(d) input pipeline",
                 e="(e) feature extraction", f="(f) ER step", g="(g) DER step")
    extra = dict(a=f"{flops_a / 1e9:9.4g} GFLOP", b=f"{flops_b / 1e9:9.4g} GFLOP",
                 c=f"{r['rebuild_pct_of_b']:9.2f} % of (b)", d=f"{r['pipeline_x_b']:9.1f} × (b)'s img/s", e="",
                 f=f"{flops_f / 1e9:9.4g} GFLOP", g=f"{flops_g / 1e9:9.4g} GFLOP")
    for k in t:
        print(f"{names[k]:24s} {1e3 * t[k]:10.1f} ms {ips[k]:10.1f} img/s  {extra[k]}")
    dev_pct = 100 * (r["time_ratio_b_a"] / r["flop_ratio_b_a"] - 1)
    print(f"(b)/(a): time {r['time_ratio_b_a']:.3f}×, FLOPs {r['flop_ratio_b_a']:.3f}× ({dev_pct:+.1f} % off)")
    for k, paper in (("f", "+4.5 %"), ("g", "+25 %")):
        print(f"({k})/(a): time {r[f'time_ratio_{k}_a']:.3f}×, FLOPs {r[f'flop_ratio_{k}_a']:.3f}× (Table II's hours "
              f"imply {paper} per step on tasks 2-4)")
    print(f"FLOPs per image (FlopCounterMode over one step, forward + backward: matmuls, convolutions, attention): "
          f"(a) {flops_a / batch / 1e9:.2f} GFLOP, (b) {flops_b / batch / 1e9:.2f} GFLOP")
    if device.type == "cuda":
        peak, card = peak_tflops(device, args.peak_tflops), torch.cuda.get_device_name(device)
        for k, f in (("a", flops_a), ("b", flops_b)):
            r[f"tflops_{k}"] = f / t[k] / 1e12
            r[f"mfu_{k}"] = r[f"tflops_{k}"] / peak if peak else None
            mfu = (f"MFU {100 * r[f'mfu_{k}']:.1f} % of {peak:g} TFLOP/s, the bf16 dense peak of {card}" if peak
                   else "peak of this card unknown: give it with --peak-tflops")
            print(f"{names[k]:24s} {r[f'tflops_{k}']:8.1f} TFLOP/s = {f / batch / 1e9:.2f} GFLOP per image × "
                  f"{ips[k]:.0f} img/s ({mfu})")
    if args.profile:
        r["profile"] = profile(dict(a=step_a, b=step_b), names, device)
    r["paper_protocol_hours"] = paper_hours(ips["a"], ips["b"], batch)
    print(f"paper protocol projected from (a) and (b), not measured (4 tasks × {PAPER_EPOCHS} epochs of "
          f"{sum(PAPER_TRAIN.values())} images; task 1 at (a), 2-4 at (b)): {r['paper_protocol_hours']:.1f} h")
    if args.end_to_end:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the run below is another process: leave it the memory of this one's steps
        e2e = r["end_to_end"] = end_to_end(args, cfg, ips, Path(tmp.name))
        for k, what in (("a", "task 1 (us3d), a MAE step"), ("b", "task 2 (uavid), a CoSMAE step")):
            m = e2e[k]
            print(f"(h) {what}: {m['img_per_s_median']:.1f} img/s in the loop (median of its records; "
                  f"{m['img_per_s_overall']:.1f} over them all) = {100 * m['of_bench']:.1f} % of ({k})'s "
                  f"{ips[k]:.1f} | data wait {100 * m['data_wait_mean']:.1f} % of the time, "
                  f"at most {100 * m['data_wait_max']:.1f} % in a record")
        r["paper_protocol_hours_measured"] = paper_hours(e2e["a"]["img_per_s_median"],
                                                         e2e["b"]["img_per_s_median"], batch)
        print(f"paper protocol at the loop's measured rates (the medians: epoch ends and checkpoints, far more "
              f"frequent here than in the paper's epochs, left out; training only): "
              f"{r['paper_protocol_hours_measured']:.1f} h")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    tmp.cleanup()
