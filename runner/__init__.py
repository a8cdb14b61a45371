"""The checked command line (one line, exit 2), the run folder (--out, locked), exact resume, stops, torchrun + DDP."""
import argparse
import contextlib
import dataclasses
import fcntl  # the run-folder lock (Linux, macOS)
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn

import rs_data
from rs_data import DataError, atomic_write, read_json


def autocast(device, amp: bool):
    on = amp and torch.device(device).type == "cuda"
    return torch.autocast("cuda", torch.bfloat16) if on else contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
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
    except (DataError, MemoryError, torch.OutOfMemoryError) as e:  # numpy's "Unable to allocate 5 TiB": before it
        hint = "" if isinstance(e, DataError) else "; lower --batch-size, --memory-size or --synth-train"
        print("error: " + " ".join(str(e).split()) + hint, file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
    except KeyboardInterrupt as e:
        print("\n" + (str(e) or interrupted), file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):  # a one-line error, not the whole usage text
    def error(self, message):
        if message.endswith("expected one argument"):  # --lr -inf: argparse reads -inf as a flag
            message += f"; a value that starts with '-' is written {message.split(':')[0].split()[-1]}=VALUE"
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(config_cls, argv=None):
    """argparse from the fields of `config_cls` (help, type and choices from each field's metadata)."""
    p = ArgumentParser(description=(config_cls.__doc__ or "").strip().split("\n\n")[0])
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
    """Every flag against its metadata (finite; bounds ge or gt, le; check=(holds(value, cfg), allowed))."""
    for f in dataclasses.fields(cfg):
        v, m = getattr(cfg, f.name), f.metadata
        values, hi = v if isinstance(v, list) else [v], m.get("le", math.inf)
        if isinstance(v, float) and not math.isfinite(v):
            allowed = "a finite number"
        elif "ge" in m and not all(m["ge"] <= x <= hi for x in values):
            allowed = f"in [{m['ge']}, {hi}]" if "le" in m else f"≥ {m['ge']}"
        elif "gt" in m and not m["gt"] < v <= hi:
            allowed = f"in ({m['gt']}, {hi}]" if "le" in m else f"> {m['gt']}"
        elif "check" in m and not m["check"][0](v, cfg):
            allowed = m["check"][1].format(c=cfg)
        else:
            continue
        raise DataError(f"--{f.name.replace('_', '-')} {' '.join(map(str, values))}: must be {allowed}")


def seed_runs(cfg):
    check_flags(cfg)
    if os.path.realpath(cfg.out) == os.getcwd():
        raise DataError(f"--out {cfg.out}: must be a run folder, not the current one")
    if cfg.init and not os.path.isfile(cfg.init):
        raise DataError(f"--init {cfg.init}: must be an existing checkpoint file")
    cfg.out = os.path.normpath(cfg.out)  # runs/x/ and runs/x are one run folder
    setup_distributed(cfg)
    for seed in cfg.seeds or [cfg.seed]:
        yield dataclasses.replace(cfg, seed=seed, seeds=[], out=f"{cfg.out}/seed{seed}" if cfg.seeds else cfg.out)
    teardown_distributed()


# multi-GPU (torchrun): each process trains on B/W rows of a batch; Eq. (4) over all features (gather); rank 0 writes
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
    if DIST["world"] > 1:
        dist.barrier()  # every process first: closing the group while one is in a collective can abort
        dist.destroy_process_group()


def gather(x: torch.Tensor) -> torch.Tensor:
    """[n, D] of this process → [n·W, D] of all processes in rank order, with gradient; x itself in one process."""
    return torch.cat(dist_nn.all_gather(x.contiguous())) if DIST["world"] > 1 else x


def all_mean(x: torch.Tensor) -> torch.Tensor:
    if DIST["world"] > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= DIST["world"]
    return x


def load_checkpoint(path, fix: str = "delete it to redo that part of the run", mmap: bool = False) -> dict:
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap))  # dict(): not a list
    except Exception as e:  # missing, truncated zip, not a torch file, disallowed pickle global, not a dict ...
        raise DataError(f"checkpoint {path} cannot be read as a weights-only torch dict ({str(e)[:200]}); {fix}")


def load_weights(model, sd, what: str, fix: str):
    try:
        model.load_state_dict(sd)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as e:
        raise DataError(f"{what}: its weights do not fit this model ({' '.join(str(e).split())[:300]}); {fix}")


def load_init(model: nn.Module, path: str, what: str = "--init"):
    """An MAE checkpoint's weights (ours, or MAE's mae_pretrain_vit_base.pth); those it lacks stay at their init."""
    fix = f"check the {what} path (an MAE or encoder checkpoint of the same --model)"
    sd = load_checkpoint(path, fix)
    sd = sd.get("model", sd.get("encoder", sd))
    sd, own, state = sd if isinstance(sd, dict) else {}, list(model.encoder_state_dict()), model.state_dict()
    missing = [k for k in own if k not in sd]
    if len(missing) == len(own):
        raise DataError(f"{what} {path}: none of its {len(sd)} weights is an encoder weight of this MAE "
                        f"(e.g. {list(sd)[:3]}); expected facebookresearch/mae names such as blocks.0.attn.qkv.weight")
    load_weights(model, {**state, **{k: v for k, v in sd.items() if k in state}}, f"{what} {path}", fix)
    print(f"{what} {path}: every encoder weight loaded" if not missing else
          f"{what} {path}: {len(missing)} encoder weights NOT loaded (left at random init): {missing[:8]}")


def task_file(out, t: int, name: str) -> Path:
    return Path(out) / f"task{t}_{rs_data.task_name(name)}.pt"


def finished_tasks(out, tasks: list) -> list:
    files = [(t, name, task_file(out, t, name)) for t, name in enumerate(tasks, 1)]
    return list(itertools.takewhile(lambda f: f[2].is_file(), files))


def digest(ck: dict) -> str:
    """sha256 of the tensors of a checkpoint's state dicts: corrupted bytes in a file that still loads."""
    h = hashlib.sha256()
    for part in ("model", "projector", "buffer", "method"):
        for v in ck.get(part, {}).values():
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


TODO = "delete it (and rerun) or use another --out"  # what to do about a bad file of a run folder
STOPPED = ("every checkpoint so far is finite and kept; usual causes: too high an --lr, bad input values, bf16 "
           "overflow (try --no-amp); rerun with another --out")


class Run(contextlib.AbstractContextManager):
    """The run folder cfg.out (only process 0 writes) and the hooks of the task loop; rerun the command to resume."""

    def __init__(self, cfg, method=None, callbacks=()):
        self.cfg, self.out, self.method, self.callbacks = cfg, Path(cfg.out), method, list(callbacks)
        self.rank, self.main, self.at = DIST["rank"], DIST["rank"] == 0, "before task 1"  # at: where it is
        self.lock, self.created, self.recorded = None, False, {}  # recorded: config.json of the run resumed
        self.settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("training", 1)}
        try:
            if self.main:
                self.open_folder()
            if (self.out / "config.json").exists():  # a resume: the same training (paths, logging may change)
                self.recorded = read_json(self.out / "config.json", dict, TODO)
                if wrong := self.other_settings(self.recorded):
                    raise DataError(f"{self.out / 'config.json'} {wrong}; use another --out")
            self.finished = self.verified_tasks()  # [(t, name, path)]; sets self.lineage and self.seconds
            if self.main and not self.recorded and not self.finished:  # a fresh start: no results of an older run
                for name in ("eval.json", "summary.json"):
                    (self.out / name).unlink(missing_ok=True)
            summary = self.out / "summary.json"
            self.summary = read_json(summary, dict, TODO) if summary.exists() else {}
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.summary.update(method=cfg.method, seed=cfg.seed, tasks=cfg.tasks, completed=len(self.finished),
                            train_seconds=self.seconds)

    def open_folder(self):
        """Create --out (refused when it cannot be created or written), lock it, remove a killed run's temp files."""
        try:
            self.created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.out).close()  # an existing folder this process cannot write in
            fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataError(f"--out {self.out} cannot be created or written ({e.strerror}); name another") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace") or "another process"
            os.close(fd)
            raise DataError(f"--out {self.out} is in use by {holder}; wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {os.uname().nodename} since {time.strftime('%F %R')}".encode(), 0)
        self.lock = fd
        for tmp in self.out.glob("*.tmp"):  # left by a process killed in an atomic write
            tmp.unlink()

    def __exit__(self, kind, error, tb):
        """Unlock; a start that failed before config.json leaves no folder behind; Ctrl-C learns where it stopped."""
        if kind is KeyboardInterrupt and not error.args:
            error.args = (f"interrupted {self.at}: finished tasks, last.pt kept; rerun the same command to resume",)
        if self.lock is not None:
            if kind is not None and self.created and not (self.out / "config.json").exists():
                shutil.rmtree(self.out, ignore_errors=True)
            os.close(self.lock)

    def write(self, name, obj):
        if self.main:
            atomic_write(self.out / name, lambda p: p.write_text(json.dumps(obj, indent=1)))

    def other_settings(self, recorded: dict) -> str:
        diff = {k: (recorded.get(k), v) for k, v in self.settings.items() if recorded.get(k) != v}
        return f"belongs to a run with other settings {diff} (recorded, now)" if diff else ""

    def mismatch(self, ck: dict, t: int) -> str:
        """'' when ck is a checkpoint (task file or last.pt) of task t of this run after self.lineage, else why not."""
        ours = ck.get("task") == t and list(ck.get("lineage", []))[:t - 1] == self.lineage  # lineage: an id per task
        if not ours or not isinstance(ck.get("settings"), dict):
            return f"is not a checkpoint of task {t} of this run (another run's, or of another version?)"
        if ck.get("digest") != digest(ck):
            return "holds weights that do not match the digest saved with them (corrupted)"
        return self.other_settings(ck["settings"])

    def verified_tasks(self) -> list:
        """[(t, name, path)] of tasks 1, 2, ..., checked; later task files set aside, other *.pt files named."""
        found, self.lineage, self.seconds = finished_tasks(self.out, self.cfg.tasks), [], 0.0
        fix = "move it out of the run folder (that task is then trained again) or use another --out"
        for t, name, path in found:
            ck = load_checkpoint(path, fix, mmap=True)
            if wrong := self.mismatch(ck, t):
                raise DataError(f"{path} {wrong}; {fix}")
            self.lineage, self.seconds = list(ck["lineage"]), float(ck.get("train_seconds", 0.0))
        names = [task_file(self.out, t, name).name for t, name in enumerate(self.cfg.tasks, 1)]
        for p in sorted(self.out.glob("*.pt")) if self.main else []:
            if p.name in names[len(found):]:
                os.replace(p, f"{p}.set_aside")
                print(f"{p}: task {len(found) + 1} is not finished: set aside as {p.name}.set_aside")
            elif p.name not in names + ["last.pt"]:
                print(f"{p}: not a checkpoint of this run: ignored")
        return found

    def save(self, path: Path, model: nn.Module, **state):
        if not torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all():
            raise DataError(f"the weights became non-finite (NaN/inf) {self.at}: not saved; " + STOPPED)
        if self.main:
            obj = dict(model=model.state_dict(), settings=self.settings, **state)
            obj["digest"] = digest(obj)
            atomic_write(path, lambda tmp: torch.save(obj, tmp))  # a full disk: one line (rs_data.disk_errors)

    def start(self, data: dict, model, projector, buffer):
        """Every input checked (task sizes and data, checkpoints, --init, callbacks), then config.json written."""
        prints, threads = {}, torch.get_num_threads()
        for name, tiles in data.items():  # a task's data: its size and a hash of 8 tiles spread over it
            pick = [round(i * (len(tiles) - 1) / 7) for i in range(8)]
            prints[name] = f"{len(tiles)} images, {hashlib.sha256(tiles[pick].tobytes()).hexdigest()[:12]}"
            was, task = self.recorded.get("task_data", prints).get(name, prints[name]), rs_data.task_name(name)
            if len(tiles) < self.cfg.batch_size:
                raise DataError(f"task {task}: {len(tiles)} images < --batch-size {self.cfg.batch_size}")
            if was != prints[name]:
                raise DataError(f"task {task}: other data than the run's ({was} → {prints[name]}); its --data-root?")
        if self.cfg.init and not self.finished:
            load_init(model, self.cfg.init)
        for cb in self.callbacks:
            cb.prepare(self, model)
        if self.recorded.get("threads", threads) != threads and self.main:  # last bits differ from an unbroken run
            print(f"warning: {self.recorded['threads']} torch threads before, {threads} now", file=sys.stderr)
        self.write("config.json", dict(dataclasses.asdict(self.cfg), task_data=prints, threads=threads))
        if self.main:
            print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.cfg).items()))
        for cb in self.callbacks:
            cb.start(self, model)

    def restore(self, t, model, projector, buffer) -> bool:
        """True when task t is finished in the folder; the last finished task's state is loaded."""
        if t == len(self.finished):
            ck = load_checkpoint(self.finished[-1][2])
            for key, part in (("model", model), ("projector", projector), ("buffer", buffer), ("method", self.method)):
                if part is not None:
                    load_weights(part, ck.get(key), f"{self.finished[-1][2]} ({key})", TODO)
            print(f"resuming {self.out}: tasks 1..{t} already done (checkpoints verified)")
        return t <= len(self.finished)

    def task_start(self, t, steps, model, projector, opt, theta_prev) -> int:
        """The first epoch to run of task t: 0, or the one after this task's last.pt (another last.pt is set aside)."""
        if self.method:
            self.method.start_task(t, model, theta_prev)
        self.t0, self.total, self.sums = time.time(), self.cfg.epochs * steps, torch.zeros(3, device=self.cfg.device)
        self.n, self.imgs, self.wait, self.t_log, start, last = 0, 0, 0.0, time.perf_counter(), 0, self.out / "last.pt"
        if last.exists():
            ck = load_checkpoint(last, "delete it: the task restarts from its first epoch")
            if not self.mismatch(ck, t):  # so its weights fit
                for part, key in ((model, "model"), (projector, "projector"), (opt, "opt")):
                    part.load_state_dict(ck[key])
                start, self.seconds = int(ck["epoch"]), float(ck["seconds"])
                self.sums, self.n = ck["meter"]["sums"].to(self.cfg.device), int(ck["meter"]["n"])  # the log's sums
                print(f"resuming task {t} after epoch {start}")
            elif self.main:
                os.replace(last, self.out / "last.pt.set_aside")
                print(f"{last} is not a mid-task checkpoint of task {t} of this run: set aside as last.pt.set_aside")
        metrics = self.out / "metrics.jsonl"  # drop the records of the steps this run replays (each step once)
        if self.main and metrics.exists():
            keep = []
            for i, ln in enumerate(metrics.read_text().split("\n")[:-1], 1):  # [-1]: '' or a record torn by a crash
                try:
                    r = json.loads(ln)
                    if (int(r["task"]), int(r["step"])) <= (t, start * steps):
                        keep.append(ln)
                except (KeyError, TypeError, ValueError):  # ValueError: JSONDecodeError too
                    raise DataError(f"{metrics} line {i} is not a metrics record ({ln[:60]!r}); delete that line")
            atomic_write(metrics, lambda p: p.write_text("".join(ln + "\n" for ln in keep)))
        return start

    def batches(self, tiles, batch_size: int, rng):
        t0 = time.perf_counter()
        for raw in rs_data.batches(tiles, batch_size, rng, self.cfg.device, (self.rank, DIST["world"])):
            self.wait += time.perf_counter() - t0
            yield raw
            t0 = time.perf_counter()

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.cfg.compile:
            module.compile(dynamic=False)  # static shapes: a new batch size (ER) compiles anew
        trained = DIST["world"] > 1 and any(p.requires_grad for p in module.parameters())
        return nn.parallel.DistributedDataParallel(module) if trained else module  # on the module's own device

    def step_end(self, t, epoch, step, n_img, losses, lam1, lam2, lr):
        self.sums += torch.stack([v.detach().float() for v in losses])  # on the device; into last.pt
        self.n, self.imgs, name = self.n + 1, self.imgs + n_img, rs_data.task_name(self.cfg.tasks[t - 1])
        self.at = f"in task {t} ({name}), epoch {epoch + 1}, step {step + 1}"
        if (step + 1) % self.cfg.log_every and step + 1 != self.total:
            return
        total, rec, mim = (all_mean(self.sums) / self.n).tolist()  # every process joins the all-reduce
        if not all(map(math.isfinite, (total, rec, mim))):
            raise DataError(f"non-finite loss (total {total}, rec {rec}, mim {mim}) {self.at}: stopped; " + STOPPED)
        seconds = max(time.perf_counter() - self.t_log, 1e-9)
        rate, wait = self.imgs * DIST["world"] / seconds, self.wait / seconds
        self.sums, self.n, self.imgs, self.wait, self.t_log = self.sums.new_zeros(3), 0, 0, 0.0, time.perf_counter()
        if not self.main:
            return
        with rs_data.disk_errors(self.out / "metrics.jsonl"), open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"task": t, "name": name, "epoch": epoch, "step": step + 1, "loss/total": total,
                                "loss/rec": rec, "loss/mim": mim, "lam1": lam1, "lam2": lam2, "lr": lr,
                                "img/s": rate, "data_wait": wait}) + "\n")
        eta = (self.total - step - 1) * self.cfg.batch_size / rate / 60
        print(f"task {t} {name} | ep {epoch + 1}/{self.cfg.epochs} | step {step + 1}/{self.total} | loss {total:.4f} "
              f"rec {rec:.4f} mim {mim:.4f} | λ1 {lam1:.2f} λ2 {lam2:.2f} | lr {lr:.2e} | {rate:.1f} img/s, data "
              f"wait {100 * wait:.0f} % | ETA task {eta:.1f} min", flush=True)

    def epoch_end(self, t, epoch, model, projector, opt):
        if (epoch + 1) % self.cfg.save_every == 0 and epoch + 1 < self.cfg.epochs:
            self.save(self.out / "last.pt", model, task=t, epoch=epoch + 1, projector=projector.state_dict(),
                      opt=opt.state_dict(), lineage=self.lineage, seconds=self.seconds + time.time() - self.t0,
                      meter=dict(sums=self.sums.cpu(), n=self.n))

    def task_end(self, t, model, projector, buffer, tiles):
        if self.method:
            self.method.end_task(t, model, tiles, buffer)
        self.seconds += time.time() - self.t0
        self.lineage = self.lineage + [os.urandom(8).hex()]
        path = task_file(self.out, t, self.cfg.tasks[t - 1])
        self.save(path, model, task=t, name=self.cfg.tasks[t - 1], lineage=self.lineage,
                  projector=projector.state_dict(), buffer=buffer.state_dict(), encoder=model.encoder_state_dict(),
                  method=self.method.state_dict() if self.method else {}, train_seconds=self.seconds)
        self.finished.append((t, self.cfg.tasks[t - 1], path))
        if self.main:
            (self.out / "last.pt").unlink(missing_ok=True)
        self.summary.update(completed=t, train_seconds=self.seconds, world=DIST["world"])
        self.write("summary.json", self.summary)
        for cb in self.callbacks:
            cb.task_end(self, t, model)

    def end(self):
        for cb in self.callbacks:
            cb.end(self)
