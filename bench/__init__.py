"""Speed of CoSMAE's hot paths (docs/speed.md): medians of --repeats calls of (a) MAE step, (b) CoSMAE step, (c) teacher
rebuild, (d) input pipeline, (e) feature extraction, (f) ER step, (g) DER step; FLOPs of (a), (b), (f), (g); on a GPU
the share of the card's peak. A real run's img/s and data wait: the progress lines of `python cosmae.py`. On a GPU:
`python -m bench --compile --profile --json h100.json` (ViT-B/16, batch 128, bf16); on a CPU add --model vit_tiny."""
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import baselines
import cosmae
import eval_mlknn
import rs_data
import runner

PEAK_BF16 = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L4", 121)]  # dense TFLOP/s
NAMES = dict(a="(a) MAE step", b="(b) CoSMAE step", c="(c) teacher rebuild", d="(d) input pipeline",
             e="(e) feature extraction", f="(f) ER step", g="(g) DER step")


def parse_args(argv=None):
    p = runner.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--model", default="vit_base", choices=list(cosmae.MODELS))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=0, help="images per step (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher (cfg.compile)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--peak-tflops", type=float, default=0, help="bf16 dense peak of a GPU not in PEAK_BF16")
    p.add_argument("--json", default="", help="also write all figures to this file")
    p.add_argument("--profile", action="store_true", help="also the operations that take the time of (a) and (b)")
    args = p.parse_args(argv)
    for name, lo in (("batch", 0), ("repeats", 1), ("warmup", 0), ("peak_tflops", 0)):
        if not lo <= getattr(args, name) < float("inf"):
            raise rs_data.DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be finite and ≥ {lo}")
    if args.json and (Path(args.json).is_dir() or not rs_data.writable(Path(args.json).parent)):
        raise rs_data.DataError(f"--json {args.json}: cannot write a file there; name a file in a writable folder")
    return args


def main(argv=None):
    runner.cli(run_bench, argv, interrupted="bench: interrupted (nothing to resume: its files were temporary)")


def run_bench(argv):
    args = parse_args(argv)
    cfg = cosmae.resolve(cosmae.Config(model=args.model, tasks=["us3d"], device=args.device, amp=not args.no_amp))
    device, img, rng = torch.device(cfg.device), cosmae.MODELS[cfg.model]["img_size"], np.random.default_rng(0)
    cfg.batch_size = batch = args.batch or (128 if device.type == "cuda" else 8)
    cfg.compile, cuda, gen = args.compile, device.type == "cuda", torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if cuda else torch.cpu.synchronize
    # the model, optimiser, θ_{t−1}, memory buffer and tile cache of a task-2 step; the same batch for every step
    model = cosmae.build_model(cfg).to(device)
    projector = cosmae.make_projector(model.pos_embed.shape[-1], cfg.proj_hidden).to(device)
    opt = cosmae.make_optimizer(model, projector, cfg)
    teacher = cosmae.MixupTeacher(model, {k: v.clone() for k, v in model.encoder_state_dict().items()}, cfg.pool)
    with tempfile.TemporaryDirectory() as tmp:  # random uint8 tiles, memory-mapped as the real tile cache is
        path, size = Path(tmp) / "tiles.npy", rs_data.tile_size(cfg.tasks, img)
        with rs_data.disk_errors(path, "free space in the temporary folder, or point TMPDIR at a folder with more"):
            np.save(path, rng.integers(0, 256, (max(cfg.memory_size, 16 * batch), 3, size, size), dtype=np.uint8))
        tiles = np.load(path, mmap_mode="r")
        buffer = cosmae.ReplayBuffer(cfg.memory_size)
        buffer.add_task(1, tiles, rng)
        raw = torch.from_numpy(np.array(tiles[:batch])).to(device)
        er, der = (baselines.make(baselines.resolve(baselines.BaselineConfig(**{**vars(cfg), "method": m})))
                   for m in ("er", "der"))
        der.end_task(1, model, tiles, buffer)  # its stored features of the buffer

        def pipeline():  # (d): one epoch of the cache
            for r in rs_data.batches(tiles, batch, rng, device):
                rs_data.augment(r, img, gen)
        todo = dict(a=lambda: cosmae.train_step(model, projector, None, opt, raw, buffer, rng, gen, cfg, False),
                    b=lambda: cosmae.train_step(model, projector, teacher, opt, raw, buffer, rng, gen, cfg, True),
                    c=lambda: teacher.rebuild(0.5), d=pipeline,
                    e=lambda: eval_mlknn.extract_features(model, tiles[:2 * batch], cfg.pool, device, cfg.amp, batch),
                    f=lambda: er.step(model, projector, None, opt, raw, buffer, rng, gen, er.cfg, False),
                    g=lambda: der.step(model, projector, None, opt, raw, buffer, rng, gen, der.cfg, False))
        where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
        print(f"device {device} ({where}, load average {os.getloadavg()[0]:.1f}) | {cfg.model}, batch {batch}, {img}px "
              f"from {size}px tiles | amp {cfg.amp and cuda} | compile {cfg.compile} | median of {args.repeats} calls")
        flops = {}  # of one call, the same compiled or not (math attention: the CPU flash kernel has no FLOP formula)
        for k in "abfg":
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                todo[k]()
            flops[k] = counter.get_total_flops()
        for m in (model, teacher) if cfg.compile else ():
            m.compile(dynamic=False)  # in place, as a run compiles them (runner.Run.wrap)
        times = {k: [] for k in todo}
        for i in range(args.warmup + args.repeats):  # taking turns (a, b, ..., a, b, ...): a busy machine slows all
            for k in times:
                sync()
                t0 = time.perf_counter()
                todo[k]()
                sync()
                times[k].append(time.perf_counter() - t0)
        t = {k: float(np.median(v[args.warmup:])) for k, v in times.items()}  # seconds a call
        profiles = {}  # torch.profiler's 12 operations with the most self time (on a GPU: device time) in a call
        for k in "ab" if args.profile else "":
            with torch.profiler.profile() as prof:
                todo[k]()
                sync()
            profiles[k] = prof.key_averages().table(sort_by=f"self_{'device' if cuda else 'cpu'}_time_total",
                                                    row_limit=12)
    ips = {k: batch / t[k] for k in t} | dict(d=len(tiles) // batch * batch / t["d"], e=2 * batch / t["e"])
    peak = args.peak_tflops or next((p for key, p in PEAK_BF16 if all(w in where for w in key.split())), 0)
    r = dict(device=str(device), model=cfg.model, batch=batch, amp=cfg.amp and cuda, compile=cfg.compile, seconds=t,
             images_per_s=ips, flops=flops, profile=profiles)
    for k in t:
        note = "" if k not in flops else f"{t[k] / t['a']:.3f}× (a)'s time for {flops[k] / flops['a']:.3f}× its " \
            f"FLOPs ({flops[k] / batch / 1e9:.2f} GFLOP an image)"
        if cuda and k in "ab":
            r[f"tflops_{k}"] = flops[k] / t[k] / 1e12
            note += f"; {r[f'tflops_{k}']:.1f} TFLOP/s, " + (f"{r[f'tflops_{k}'] / peak:.1%} of {where}'s bf16 dense "
                                                          f"peak {peak:g}" if peak else "peak unknown: --peak-tflops")
        print(f"{NAMES[k]:24s} {1e3 * t[k]:10.1f} ms {ips[k]:10.1f} img/s  {note}")
    print("Table II's hours imply, per step on tasks 2-4 against fine-tuning: +4.5 % for ER, +25 % for DER")
    for k, table in profiles.items():
        print(f"{NAMES[k]}, one call (the median took {1e3 * t[k]:.1f} ms):\n{table}")
    imgs = [n // batch * batch * 300 for n in (21081, 24560, 15870, 15000)]  # US3D, UAVid, Potsdam, TreeSatAI
    r["paper_protocol_hours"] = hours = (imgs[0] / ips["a"] + sum(imgs[1:]) / ips["b"]) / 3600
    print(f"the paper's protocol (4 tasks × 300 epochs of 76511 images) at (a)'s and (b)'s rates: {hours:.1f} h")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
