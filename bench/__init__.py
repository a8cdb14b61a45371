"""Speed of CoSMAE's hot paths on one model, batch and device (docs/speed.md): (a) MAE step, (b) CoSMAE step,
(c) teacher rebuild, (d) input pipeline, (e) feature extraction, (f) ER step, (g) DER step (medians of --repeats
calls) and the FLOPs of (a), (b), (f), (g); (h) --end-to-end: `python cosmae.py` on generated US3D and UAVid files.

    python -m bench --model vit_tiny --device cpu          # seconds (ViT-B/16 on 2 CPU cores: ~12 min)
    python -m bench --compile --json bench_h100.json       # GPU: ViT-B/16, batch 128, bf16, torch.compile
    python -m bench --end-to-end --profile                 # also a real run (~4 GB of files) and a profile
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
NAMES = dict(a="(a) MAE step", b="(b) CoSMAE step", c="(c) teacher rebuild", d="(d) input pipeline",
             e="(e) feature extraction", f="(f) ER step", g="(g) DER step")


def parse_args(argv=None):
    p = runner.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base", choices=list(cosmae.MODELS))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=0, help="images per step (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher (cfg.compile)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--peak-tflops", type=float, default=0, help="bf16 dense peak of a GPU not in PEAK_BF16")
    p.add_argument("--json", default="", help="also write all figures to this file")
    p.add_argument("--profile", action="store_true", help="also where the time of (a) and (b) goes (torch.profiler)")
    p.add_argument("--end-to-end", action="store_true", help="also (h): python cosmae.py on generated US3D and UAVid")
    p.add_argument("--e2e-steps", type=int, default=300, help="steps of each of the two tasks of --end-to-end")
    args = p.parse_args(argv)
    for name, ok, allowed in [("batch", args.batch >= 0, "≥ 0 (0 = by device)"), ("repeats", args.repeats >= 1, "≥ 1"),
                              ("warmup", args.warmup >= 0, "≥ 0"), ("threads", args.threads >= 0, "≥ 0"),
                              ("e2e_steps", args.e2e_steps >= 2, "≥ 2"),
                              ("peak_tflops", 0 <= args.peak_tflops < float("inf"), "a finite number ≥ 0")]:
        if not ok:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {allowed}")
    return args


def timeit(fns: dict, warmup: int, repeats: int, sync) -> dict:
    """Median seconds of each fn(), taking turns (a, b, ..., a, b, ...) so a noisy machine slows them alike."""
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
    """FLOPs of one call (math attention backend: the CPU flash kernel has no FLOP formula)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def paper_hours(ips_a: float, ips_b: float, batch: int) -> float:
    """The paper's protocol (4 tasks × 300 epochs, drop_last): task 1 at (a)'s images/s, tasks 2-4 at (b)'s."""
    imgs = [n // batch * batch * PAPER_EPOCHS for n in PAPER_TRAIN.values()]
    return (imgs[0] / ips_a + sum(imgs[1:]) / ips_b) / 3600


def profile(fns: dict, device: torch.device, sync, calls: int = 3, rows: int = 12) -> dict:
    """Per fn: wall time of a call, device busy time (CPU: ops' self time) and the `rows` ops with most self time."""
    cuda, out = device.type == "cuda", {}
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    for k, fn in fns.items():
        fn()
        sync()
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            wall = (time.perf_counter() - t0) / calls
        ops = sorted([e for e in prof.key_averages()  # on a GPU its kernels (operators repeat their kernels' time)
                      if not cuda or (e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)],
                     key=lambda e: getattr(e, key), reverse=True)
        busy = sum(getattr(e, key) for e in ops) / calls / 1e6  # seconds per call
        top = [(e.key, getattr(e, key) / calls / 1e3, 100 * getattr(e, key) / calls / 1e6 / busy) for e in ops[:rows]]
        out[k] = dict(wall_ms=1e3 * wall, busy_ms=1e3 * busy, top=top)
        where = f"device busy {100 * busy / wall:.0f} %" if cuda else "ops' self CPU time"
        print(f"{NAMES[k]}: {1e3 * wall:.1f} ms a call, {where} {1e3 * busy:.1f} ms; the operations that took the "
              "most:")
        for name, ms, pct in top:
            print(f"    {pct:5.1f} %  {ms:8.2f} ms  {name[:90]}")
    return out


def write_layouts(root: Path, patches: int, rng: np.random.Generator):
    """Random US3D (1024² TIFF, 16 patches) and UAVid (3840×2160 PNG, 120 patches) files in their official layouts."""
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
    """(h): `python cosmae.py --tasks us3d uavid` on generated files → per task its img/s and data wait."""
    per_epoch = min(20, args.e2e_steps)
    t0 = time.perf_counter()
    with rs_data.disk_errors(tmp / "data", TMP_TODO):
        write_layouts(tmp / "data", per_epoch * cfg.batch_size, np.random.default_rng(1))
    print(f"(h) end to end: files written in {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = [sys.executable, str(Path(__file__).parents[1] / "cosmae.py"), "--tasks", "us3d", "uavid",
           "--data-root", str(tmp / "data"), "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "run"),
           "--model", cfg.model, "--batch-size", str(cfg.batch_size), "--epochs", str(-(-args.e2e_steps // per_epoch)),
           "--warmup-epochs", "0", "--log-every", str(max(1, args.e2e_steps // 10)), "--device", cfg.device,
           "--no-eval"] + ["--compile"] * args.compile + ["--no-amp"] * args.no_amp
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        raise DataError("(h) end to end: python cosmae.py failed (its message is above)")
    recs, out = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()], {}
    for t, k, task in ((1, "a", "us3d"), (2, "b", "uavid")):
        rs = [r for r in recs if r["task"] == t]  # the first record is the warm-up
        steps = [r["step"] - prev["step"] for prev, r in zip(rs, rs[1:])]  # the steps each record covers
        rs = rs[1:]
        secs = sum(n * cfg.batch_size / r["img/s"] for n, r in zip(steps, rs))
        rate = statistics.median(r["img/s"] for r in rs)
        out[k] = dict(task=task, steps=rs[-1]["step"], img_per_s_median=rate,
                      img_per_s_overall=sum(steps) * cfg.batch_size / secs, of_bench=rate / ips[k],
                      data_wait_max=max(r["data_wait"] for r in rs),
                      data_wait_mean=sum(n * r["data_wait"] for n, r in zip(steps, rs)) / sum(steps))
        print(f"(h) task {t} ({task}): median {rate:.1f} img/s ({out[k]['img_per_s_overall']:.1f} overall) = "
              f"{100 * rate / ips[k]:.1f} % of ({k})'s {ips[k]:.1f} | data wait {100 * out[k]['data_wait_mean']:.1f} "
              f"%, at most {100 * out[k]['data_wait_max']:.1f} %")
    return out


def main(argv=None):
    runner.cli(lambda: run_bench(parse_args(argv)),
               interrupted="bench: interrupted (nothing to resume: its files were temporary)")


def run_bench(args):
    if args.threads:  # on a shared CPU box, 1 thread avoids OpenMP stalls behind other processes
        torch.set_num_threads(args.threads)
    cfg = cosmae.resolve(cosmae.Config(model=args.model, tasks=["us3d"], device=args.device, amp=not args.no_amp))
    device, img, rng = torch.device(cfg.device), cosmae.MODELS[cfg.model]["img_size"], np.random.default_rng(0)
    cfg.batch_size = batch = args.batch or (128 if device.type == "cuda" else 8)
    cfg.compile, cuda, gen = args.compile, device.type == "cuda", torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # the model, optimiser, θ_{t−1}, memory buffer and tile cache of a task-2 step; the same batch for every step
    model = cosmae.build_model(cfg).to(device)
    projector = cosmae.make_projector(model.pos_embed.shape[-1], cfg.proj_hidden).to(device)
    opt = cosmae.make_optimizer(model, projector, cfg)
    teacher = cosmae.MixupTeacher(model, {k: v.detach().clone() for k, v in model.state_dict().items()
                                          if cosmae.is_encoder_key(k)}, cfg.pool)
    with tempfile.TemporaryDirectory() as tmp:
        path, size = Path(tmp) / "tiles.npy", rs_data.tile_size(cfg.tasks, img)
        with rs_data.disk_errors(path, TMP_TODO):  # random uint8 tiles, memory-mapped as the real tile cache is
            np.save(path, rng.integers(0, 256, (max(cfg.memory_size, 16 * batch), 3, size, size), dtype=np.uint8))
        tiles = np.load(path, mmap_mode="r")
        buffer = cosmae.ReplayBuffer(cfg.memory_size)
        buffer.add_task(1, tiles, rng)
        raw = torch.from_numpy(np.array(tiles[:batch])).to(device)
        bcfg = {m: baselines.resolve(baselines.BaselineConfig(**{**vars(cfg), "method": m})) for m in ("er", "der")}
        er, der = baselines.ER(bcfg["er"]), baselines.DER(bcfg["der"])
        der.end_task(1, model, tiles, buffer)  # its stored features of the buffer

        def steps(m, t):  # (a), (b), (f), (g) with model m and teacher t
            return dict(a=lambda: cosmae.train_step(m, projector, None, opt, raw, buffer, rng, gen, cfg, False),
                        b=lambda: cosmae.train_step(m, projector, t, opt, raw, buffer, rng, gen, cfg, True),
                        f=lambda: er.step(m, projector, None, opt, raw, buffer, rng, gen, bcfg["er"], False),
                        g=lambda: der.step(m, projector, None, opt, raw, buffer, rng, gen, bcfg["der"], False))

        def pipeline():  # (d): one epoch of the cache
            for r in rs_data.batches(tiles, batch, rng, device):
                rs_data.augment(r, img, gen)

        feat_tiles = tiles[:2 * batch]
        where = torch.cuda.get_device_name(device) if cuda else \
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
        print(f"device {device} ({where}) | {cfg.model}, batch {batch}, {img}px from {tiles.shape[-1]}px tiles | amp "
              f"{cfg.amp and cuda} | compile {cfg.compile} | median of {args.repeats} after {args.warmup} warm-up",
              flush=True)
        flops = {k: count_flops(fn) for k, fn in steps(model, teacher).items()}  # the same compiled or not
        nets = [torch.compile(m, dynamic=False) for m in (model, teacher)] if cfg.compile else [model, teacher]
        fns = steps(*nets)
        t = timeit(dict(a=fns["a"], b=fns["b"], c=lambda: teacher.rebuild(0.5), d=pipeline,
                        e=lambda: eval_mlknn.extract_features(model, feat_tiles, cfg.pool, device, cfg.amp, batch),
                        f=fns["f"], g=fns["g"]), args.warmup, args.repeats, sync)
        n_img = dict(a=batch, b=batch, c=batch, d=len(tiles) // batch * batch, e=len(feat_tiles), f=batch, g=batch)
        ips = {k: n_img[k] / t[k] for k in t}
        r = dict(device=str(device), model=cfg.model, batch=batch, amp=cfg.amp and cuda, compile=cfg.compile,
                 seconds=t, images_per_s=ips, rebuild_pct_of_b=100 * t["c"] / t["b"], pipeline_x_b=ips["d"] / ips["b"],
                 **{f"flops_{k}": f for k, f in flops.items()})
        extra = {k: f"{f / 1e9:9.4g} GFLOP, {f / batch / 1e9:.2f} per image" for k, f in flops.items()} | dict(
            c=f"{r['rebuild_pct_of_b']:9.2f} % of (b)", d=f"{r['pipeline_x_b']:9.1f} × (b)'s img/s", e="")
        for k in t:
            print(f"{NAMES[k]:24s} {1e3 * t[k]:10.1f} ms {ips[k]:10.1f} img/s  {extra[k]}")
        for k, paper in (("b", ""), ("f", "+4.5 %"), ("g", "+25 %")):
            time_x, flop_x = r[f"time_ratio_{k}_a"], r[f"flop_ratio_{k}_a"] = t[k] / t["a"], flops[k] / flops["a"]
            note = f"Table II's hours imply {paper} per step on tasks 2-4" if paper else \
                f"{time_x / flop_x - 1:+.1%} off"
            print(f"({k})/(a): time {time_x:.3f}×, FLOPs {flop_x:.3f}× ({note})")
        if cuda:
            peak = args.peak_tflops or next((p for key, p in PEAK_BF16 if all(w in where for w in key.split())), 0)
            for k in "ab":
                r[f"tflops_{k}"] = flops[k] / t[k] / 1e12
                r[f"mfu_{k}"] = r[f"tflops_{k}"] / peak if peak else None
                mfu = f"MFU {r[f'mfu_{k}']:.1%} of {peak:g}, the bf16 dense peak of {where}" if peak else \
                    "peak of this card unknown: give it with --peak-tflops"
                print(f"{NAMES[k]:24s} {r[f'tflops_{k}']:8.1f} TFLOP/s ({mfu})")
        if args.profile:
            r["profile"] = profile(dict(a=fns["a"], b=fns["b"]), device, sync)
        r["paper_protocol_hours"] = paper_hours(ips["a"], ips["b"], batch)
        print(f"paper protocol projected from (a) and (b) (4 tasks × {PAPER_EPOCHS} epochs of "
              f"{sum(PAPER_TRAIN.values())} images): {r['paper_protocol_hours']:.1f} h")
        if args.end_to_end:
            if cuda:
                torch.cuda.empty_cache()  # the run is another process: leave it the memory of this one's steps
            e2e = r["end_to_end"] = end_to_end(args, cfg, ips, Path(tmp))
            r["paper_protocol_hours_measured"] = paper_hours(*(e2e[k]["img_per_s_median"] for k in "ab"), batch)
            print(f"paper protocol at the loop's measured rates: {r['paper_protocol_hours_measured']:.1f} h")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
