"""Around the method: the checked command line (one line, exit 2), the run folder (--out, one process each), exact
resume by rerunning, stops (Ctrl-C: 130, non-finite values, full disk), torchrun + DDP; cosmae.train calls a Run."""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import rs_data
from rs_data import DataError, atomic_write, read_json

try:
    import fcntl  # the run-folder lock (Linux, macOS); on Windows runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None


def autocast(device, amp: bool):
    on = amp and torch.device(device).type == "cuda"
    return torch.autocast("cuda", torch.bfloat16) if on else contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda if present, else cpu), cpu, or a CUDA device this machine has (else one line, exit 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DataError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    n_gpu = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cpu" or (dev.type == "cuda" and (dev.index or 0) < n_gpu):
        return dev
    raise DataError(f"--device {name}: this machine has {n_gpu} CUDA device(s); use auto, cpu"
                    + (f" or cuda:0..cuda:{n_gpu - 1}" if n_gpu else ""))


def cli(fn, *args, interrupted: str = "interrupted"):
    """fn(*args): DataError → `error: <one line>`, exit 2; Ctrl-C → its message or `interrupted`, exit 130."""
    try:
        return fn(*args)
    except DataError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
    except KeyboardInterrupt as e:
        print("\n" + (str(e) or interrupted), file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):  # a one-line error, not the whole usage text
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def a_file(path: str) -> str:  # argparse type: '' or an existing file
    if path and not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: must be an existing checkpoint file")
    return path


def parse_args(config_cls, argv=None):
    """argparse from the fields of `config_cls` (help, type and choices from each field's metadata)."""
    p = ArgumentParser(description=(config_cls.__doc__ or "").strip().split("\n\n")[0],
                       formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(config_cls):
        default = f.default_factory()
        kw = {k: v for k, v in f.metadata.items() if k in ("type", "choices")}
        kw.update(default=default, help=f"{f.metadata['help']} [default: {default}]".replace("%", "%%"))
        if "bool" in f.type:
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw.update(nargs="+", type=kw.get("type", str))
        else:
            kw.setdefault("type", type(default))
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return config_cls(**vars(p.parse_args(argv)))


def check_flags(cfg):
    """Every flag against its metadata (finite; ge, gt, le; check=(holds(value, cfg), allowed)), else a DataError."""
    for f in dataclasses.fields(cfg):
        v, m = getattr(cfg, f.name), f.metadata
        values = v if isinstance(v, list) else [v]
        if isinstance(v, float) and not math.isfinite(v):
            allowed = "a finite number"
        elif "le" in m and not m["ge"] <= v <= m["le"]:
            allowed = f"in [{m['ge']}, {m['le']}]"
        elif "ge" in m and not all(x >= m["ge"] for x in values):
            allowed = f"≥ {m['ge']}"
        elif "gt" in m and not v > m["gt"]:
            allowed = f"> {m['gt']}"
        elif "check" in m and not m["check"][0](v, cfg):
            allowed = m["check"][1].format(c=cfg)
        else:
            continue
        raise DataError(f"--{f.name.replace('_', '-')} {' '.join(map(str, values))}: must be {allowed}")


def seed_runs(cfg):
    """The checked config of each run of a command: one per seed (--seeds: OUT/seed<s>, else OUT)."""
    check_flags(cfg)
    cfg.out = os.path.normpath(cfg.out)  # runs/x/ and runs/x are one run folder
    setup_distributed(cfg)
    for seed in cfg.seeds or [cfg.seed]:
        yield dataclasses.replace(cfg, seed=seed, seeds=[], out=os.path.join(cfg.out, f"seed{seed}") if cfg.seeds
                                  else cfg.out)
    teardown_distributed()


# --- multi-GPU: `torchrun --nproc_per_node=W cosmae.py ...`; each process trains on B/W rows of every batch, seeded
# with its rank (as MAE's code); Eq. (4) runs over all processes' features (gather); process 0 writes and evaluates.
DIST = dict(rank=0, world=1)


def setup_distributed(cfg):
    if "RANK" not in os.environ:
        return
    cuda = cfg.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    DIST.update(rank=dist.get_rank(), world=dist.get_world_size())
    if cuda:
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(cfg.device)
    if cfg.batch_size % DIST["world"]:
        raise DataError(f"--batch-size {cfg.batch_size} is not divisible by the {DIST['world']} processes")


def teardown_distributed():
    """Wait for every process, then close the group (closing it while one is in a collective can abort)."""
    if DIST["world"] > 1:
        dist.barrier()
        dist.destroy_process_group()


def gather(x: torch.Tensor) -> torch.Tensor:
    """[n, D] of this process → [n·W, D] of all processes in rank order, with gradient; x itself in one process."""
    if DIST["world"] == 1:
        return x
    import torch.distributed.nn.functional as dist_nn
    return torch.cat(dist_nn.all_gather(x.contiguous()))


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the processes (logging, EWC's Fisher)."""
    if DIST["world"] > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= DIST["world"]
    return x


def load_checkpoint(path, fix: str = "delete it to redo that part of the run", mmap: bool = False) -> dict:
    """torch.load(weights_only=True): tensors and containers, no pickled code; mmap: cheap checks of a large file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, not a torch file, disallowed pickle global, ...
        raise DataError(f"checkpoint {path} is corrupt or not a weights-only torch file ({type(e).__name__}: "
                        f"{str(e)[:200]}); {fix}") from None
    if not isinstance(ck, dict):
        raise DataError(f"checkpoint {path} holds a {type(ck).__name__}, not a dict of weights; {fix}")
    return ck


def load_weights(model: nn.Module, sd, what: str, fix: str, strict: bool = True):
    """model.load_state_dict(sd); torch's message (missing, unexpected keys, shapes) in one line."""
    try:
        model.load_state_dict(sd, strict=strict)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise DataError(f"{what}: its weights do not fit this model ({' '.join(str(e).split())[:300]}); {fix}") \
            from None


def load_init(model: nn.Module, path: str, what: str = "--init"):
    """An MAE checkpoint's weights (ours, or MAE's mae_pretrain_vit_base.pth); those it lacks stay at their init."""
    fix = f"check the {what} path (an MAE or encoder checkpoint of the same --model)"
    sd = load_checkpoint(path, fix)
    sd = sd.get("model", sd.get("encoder", sd))
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise DataError(f"{what} {path}: no weights found in it (expected a state dict, or one under 'model'); {fix}")
    own, state = list(model.encoder_state_dict()), model.state_dict()
    missing = [k for k in own if k not in sd]
    if len(missing) == len(own):
        raise DataError(f"{what} {path}: none of its {len(sd)} weights is an encoder weight of this MAE "
                        f"(e.g. {list(sd)[:3]}); expected facebookresearch/mae names such as blocks.0.attn.qkv.weight")
    load_weights(model, {k: v for k, v in sd.items() if k in state}, f"{what} {path}", fix, strict=False)
    print(f"{what} {path}: every encoder weight loaded" if not missing else
          f"{what} {path}: {len(missing)} encoder weights NOT loaded (left at random init): {missing[:8]}")


def task_file(out, t: int, name: str) -> Path:
    return Path(out) / f"task{t}_{name}.pt"


def finished_tasks(out, tasks: list) -> list:
    """[(t, name, path)] of the task files of a run folder, tasks 1, 2, ... up to the first missing one."""
    files = [(t, name, task_file(out, t, name)) for t, name in enumerate(tasks, 1)]
    return list(itertools.takewhile(lambda f: f[2].is_file(), files))


TODO = "delete it (and rerun) or use another --out"  # what to do about a bad file of a run folder
STOPPED = "every checkpoint so far is finite and kept; lower --lr (or check the data) and rerun with another --out"


class Run(contextlib.AbstractContextManager):
    """The run folder cfg.out (only process 0 writes) and the hooks of the task loop; rerun the command to resume."""

    def __init__(self, cfg, method=None, callbacks=()):
        self.cfg, self.out, self.method, self.callbacks = cfg, Path(cfg.out), method, list(callbacks)
        self.rank, self.main, self.at = DIST["rank"], DIST["rank"] == 0, None
        self.lock, self.created = None, False  # settings: those that decide what is trained, compared on resume
        self.settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("training", 1)}
        try:
            if self.main:
                self.open_folder()
            if (self.out / "config.json").exists():  # a resume: the same training (paths, logging may change)
                self.compare(read_json(self.out / "config.json", dict, TODO), self.out / "config.json")
            self.finished = self.verified_tasks()  # [(t, name, path, lineage, training seconds until then)]
            summary = self.out / "summary.json"
            self.summary = read_json(summary, dict, TODO) if summary.exists() else {}
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.summary.update(method=cfg.method, seed=cfg.seed, tasks=cfg.tasks, completed=len(self.finished))
        self.lineage = self.finished[-1][3] if self.finished else []
        self.seconds = self.finished[-1][4] if self.finished else 0.0

    def open_folder(self):
        """Create --out (refused when it cannot be created or written) and lock it for this process."""
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {self.out} is a file; name a folder")
        try:
            self.created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataError(f"--out {self.out} cannot be created or written ({e.strerror}); name another") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise DataError(f"--out {self.out} is in use by {holder}; wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M')} "
                      f"({' '.join(sys.argv[:1] + sys.argv[1:6])})".encode(), 0)
        self.lock = fd

    def __exit__(self, kind, error, tb):
        """Unlock; a start that failed before config.json leaves no folder behind; Ctrl-C learns where it stopped."""
        if kind is KeyboardInterrupt and not error.args:
            error.args = (f"interrupted {self.where}: finished tasks, last.pt kept; rerun the same command to resume",)
        if self.lock is not None:
            if kind is not None and self.created and not (self.out / "config.json").exists():
                shutil.rmtree(self.out, ignore_errors=True)
            os.close(self.lock)
            self.lock = None
        return False

    def write(self, name, obj):
        if self.main:
            atomic_write(self.out / name, lambda p: p.write_text(json.dumps(obj, indent=1)))

    def compare(self, recorded: dict, where: Path):
        """The training settings recorded in `where` must be this command's."""
        diff = {k: (recorded.get(k), v) for k, v in self.settings.items() if recorded.get(k) != v}
        if diff:
            raise DataError(f"{where} belongs to a run with other settings {diff} (recorded, now); use another --out, "
                            "or the same flags to resume it")

    def verified_tasks(self) -> list:
        """[(t, name, path, lineage, seconds)] of tasks 1, 2, ..., checked; later task files set aside, others named."""
        found, lineage = [], []
        for t, name, path in finished_tasks(self.out, self.cfg.tasks):
            fix = "move it out of the run folder (that task is then trained again) or use another --out"
            ck = load_checkpoint(path, fix, mmap=True)
            if ck.get("task") != t or ck.get("name") != name or not isinstance(ck.get("settings"), dict):
                raise DataError(f"{path} is not the checkpoint of task {t} ({name}) of a run of this version (it "
                                f"records task {ck.get('task')} {ck.get('name')}); {fix}")
            self.compare(ck["settings"], path)
            if list(ck.get("lineage", []))[:-1] != lineage or len(ck.get("lineage", [])) != t:
                raise DataError(f"{path} does not continue the checkpoint of task {t - 1} in this folder (another "
                                f"run's or an older file); {fix}")
            lineage = list(ck["lineage"])
            found.append((t, name, path, lineage, float(ck.get("train_seconds", 0.0))))
        for t, name in list(enumerate(self.cfg.tasks, 1))[len(found) + 1:]:
            path = task_file(self.out, t, name)
            if path.exists() and self.main:
                os.replace(path, path.with_suffix(".pt.set_aside"))
                print(f"{path}: task {len(found) + 1} is not finished, so this later checkpoint cannot be used: set "
                      f"aside as {path.name}.set_aside")
        known = {task_file(self.out, t, n).name for t, n in enumerate(self.cfg.tasks, 1)} | {"last.pt"}
        stray = sorted(p.name for p in self.out.glob("*.pt") if p.name not in known)
        if stray and self.main:
            print(f"{self.out}: ignoring files that are not this run's checkpoints: {', '.join(stray)}")
        return found

    def save(self, path: Path, model: nn.Module, **state):
        """A checkpoint of finite weights only: non-finite ones stop the run and keep the last good files."""
        if not torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all():
            raise DataError(f"the weights became non-finite (NaN/inf) {self.where}: stopped without saving them; "
                            + STOPPED)
        if self.main:
            obj = dict(model=model.state_dict(), settings=self.settings, **state)
            atomic_write(path, lambda tmp: torch.save(obj, tmp))  # a full disk: one line (rs_data.disk_errors)

    @property
    def where(self) -> str:
        if self.at is None or isinstance(self.at, str):
            return self.at or "before task 1"
        t, epoch, step = self.at
        return f"in task {t} ({self.cfg.tasks[t - 1]}), epoch {epoch + 1}, step {step + 1}"

    def start(self, data: dict, model, projector, buffer):
        """Every input checked (task sizes, checkpoints, --init, callbacks), then config.json written."""
        for name, tiles in data.items():
            if len(tiles) < self.cfg.batch_size:
                raise DataError(f"task {name}: {len(tiles)} images, less than one batch (--batch-size "
                                f"{self.cfg.batch_size})")
        for t, name, path, *_ in self.finished:
            load_weights(copy.deepcopy(model), load_checkpoint(path, mmap=True).get("model"), str(path),
                         "it belongs to another --model: move it out of the run folder or use another --out")
        if self.cfg.init and not self.finished:
            load_init(model, self.cfg.init)
        for cb in self.callbacks:
            cb.prepare(self, model)
        self.write("config.json", dataclasses.asdict(self.cfg))
        if self.main:
            print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.cfg).items()))
        for cb in self.callbacks:
            cb.start(self, model)

    def restore(self, t, model, projector, buffer) -> bool:
        """True when task t is finished in the folder; the last finished task's state is loaded."""
        if t > len(self.finished):
            return False
        if t == len(self.finished):
            ck = load_checkpoint(self.finished[-1][2])
            model.load_state_dict(ck["model"])
            projector.load_state_dict(ck["projector"])
            buffer.load_state_dict(ck["buffer"])
            if self.method:
                self.method.load_state_dict(ck["method"])
            print(f"resuming {self.out}: tasks 1..{t} already done (checkpoints verified)")
        return True

    def task_start(self, t, steps, model, projector, opt, theta_prev) -> int:
        """The first epoch to run of task t: 0, or the one after this task's last.pt (another last.pt is set aside)."""
        if self.method:
            self.method.start_task(t, model, theta_prev)
        self.t0, last, start, self.total = time.time(), self.out / "last.pt", 0, self.cfg.epochs * steps
        self.sums, self.n, self.imgs, self.wait, self.t_log = None, 0, 0, 0.0, time.perf_counter()
        if last.exists():
            fix = "delete it: the task restarts from its first epoch"
            ck = load_checkpoint(last, fix)
            if ck.get("task") == t and list(ck.get("lineage", [None])) == self.lineage and ck.get("settings") == \
                    self.settings:
                load_weights(model, ck.get("model"), str(last), fix)
                projector.load_state_dict(ck["projector"])
                opt.load_state_dict(ck["opt"])
                start, self.seconds = int(ck["epoch"]), float(ck["seconds"])
                sums, self.n = ck["meter"]["sums"], int(ck["meter"]["n"])  # the log's running sums
                self.sums = None if sums is None else sums.to(self.cfg.device)
                print(f"resuming task {t} after epoch {start}")
            elif self.main:
                os.replace(last, self.out / "last.pt.set_aside")
                print(f"{last} is not a mid-task checkpoint of task {t} of this run: set aside as last.pt.set_aside")
        self.trim_metrics(t, start * steps)
        return start

    def batches(self, tiles, batch_size: int, rng):
        """One epoch of raw uint8 batches on the device (this process's rows); the wait for each goes to the meter."""
        t0 = time.perf_counter()
        for raw in rs_data.batches(tiles, batch_size, rng, self.cfg.device, (self.rank, DIST["world"])):
            self.wait += time.perf_counter() - t0
            yield raw
            t0 = time.perf_counter()

    def wrap(self, module: nn.Module) -> nn.Module:
        """--compile: the module compiled in place (its forward); under torchrun a trained module in DDP."""
        if self.cfg.compile:
            module.compile(dynamic=False)  # static shapes: a new batch size (ER) compiles anew
        if DIST["world"] == 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        dev = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None)

    def step_end(self, t, epoch, step, n_img, losses, lam1, lam2, lr):
        """Every --log-every steps a progress line and a metrics.jsonl record (data_wait: share of time waiting for
        batches); sums stay on the device in between and go into last.pt (a resumed record covers the same steps)."""
        vals = torch.stack([v.detach().float() for v in losses])
        self.sums = vals if self.sums is None else self.sums + vals
        self.n, self.imgs, self.at = self.n + 1, self.imgs + n_img, (t, epoch, step)
        if (step + 1) % self.cfg.log_every and step + 1 != self.total:
            return
        total, rec, mim = (all_mean(self.sums) / self.n).tolist()  # every process joins the all-reduce
        if not all(map(math.isfinite, (total, rec, mim))):
            raise DataError(f"non-finite loss (total {total}, rec {rec}, mim {mim}) {self.where}: stopped; "
                            + STOPPED)
        seconds = max(time.perf_counter() - self.t_log, 1e-9)
        rate, wait = self.imgs * DIST["world"] / seconds, self.wait / seconds
        self.sums, self.n, self.imgs, self.wait, self.t_log = None, 0, 0, 0.0, time.perf_counter()
        if not self.main:
            return
        eta = (self.total - step - 1) * self.cfg.batch_size / rate
        with rs_data.disk_errors(self.out / "metrics.jsonl"), open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"task": t, "name": self.cfg.tasks[t - 1], "epoch": epoch, "step": step + 1,
                                "loss/total": total, "loss/rec": rec, "loss/mim": mim, "lam1": lam1, "lam2": lam2,
                                "lr": lr, "img/s": rate, "data_wait": wait}) + "\n")
        print(f"task {t} {self.cfg.tasks[t - 1]} | ep {epoch + 1}/{self.cfg.epochs} | step {step + 1}/{self.total} | "
              f"loss {total:.4f} rec {rec:.4f} mim {mim:.4f} | λ1 {lam1:.2f} λ2 {lam2:.2f} | lr {lr:.2e} | "
              f"{rate:.1f} img/s, data wait {100 * wait:.0f} % | ETA task {eta / 60:.1f} min", flush=True)

    def epoch_end(self, t, epoch, model, projector, opt):
        """Every --save-every epochs (not after the last): last.pt, from which an interrupted task continues."""
        if (epoch + 1) % self.cfg.save_every == 0 and epoch + 1 < self.cfg.epochs:
            self.save(self.out / "last.pt", model, task=t, epoch=epoch + 1, projector=projector.state_dict(),
                      opt=opt.state_dict(), lineage=self.lineage, seconds=self.seconds + time.time() - self.t0,
                      meter=dict(sums=None if self.sums is None else self.sums.cpu(), n=self.n))

    def task_end(self, t, model, projector, buffer, tiles):
        """After task t: the baseline's end of task, the checkpoint, the summary, then the callbacks (evaluation)."""
        if self.method:
            self.method.end_task(t, model, tiles, buffer)
        self.seconds += time.time() - self.t0
        self.lineage = self.lineage + [secrets.token_hex(8)]
        path = task_file(self.out, t, self.cfg.tasks[t - 1])
        self.save(path, model, task=t, name=self.cfg.tasks[t - 1], lineage=self.lineage,
                  projector=projector.state_dict(), buffer=buffer.state_dict(), encoder=model.encoder_state_dict(),
                  method=self.method.state_dict() if self.method else {}, train_seconds=self.seconds)
        self.finished.append((t, self.cfg.tasks[t - 1], path, self.lineage, self.seconds))
        if self.main:
            (self.out / "last.pt").unlink(missing_ok=True)
        self.summary.update(completed=t, train_seconds=self.seconds, world=DIST["world"])
        self.write("summary.json", self.summary)
        for cb in self.callbacks:
            cb.task_end(self, t, model)

    def end(self):
        for cb in self.callbacks:
            cb.end(self)

    def trim_metrics(self, t: int, steps_done: int):
        """Drop the metrics.jsonl records of the steps this run replays (each step once) and a torn last one."""
        path = self.out / "metrics.jsonl"
        if not self.main or not path.exists():
            return
        lines, keep = path.read_text().splitlines(), []
        for i, ln in enumerate(lines, 1):
            try:
                r = json.loads(ln)
                task, step = int(r["task"]), int(r["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if i == len(lines):
                    continue  # the torn last record of a crash mid-write
                raise DataError(f"{path} line {i} is not a metrics record ({ln[:60]!r}); delete that line and rerun")
            if task < t or (task == t and step <= steps_done):
                keep.append(ln)
        atomic_write(path, lambda p: p.write_text("".join(ln + "\n" for ln in keep)))

