"""Everything a long run needs around the method, so that cosmae.py can be the paper and nothing else.

- the command line: flags built from a Config dataclass, each flag checked against its meaning (one line, exit 2);
- the run folder (--out): config.json, metrics.jsonl, summary.json, a checkpoint after every task, last.pt
  inside a task; one process per folder (a lock the OS releases when the process dies);
- resume: a rerun of the same command continues after the last finished task, from the last saved epoch. A
  finished task is the file named for it (task<t>_<name>.pt), verified before use: its task index and name, the
  training settings, the lineage of the checkpoints before it, and the model's keys and shapes;
- stops: Ctrl-C says where the run stopped (exit 130); a non-finite loss or weight stops the run without saving
  it; a full disk is one line naming the file;
- multi-GPU: torchrun + DistributedDataParallel; Eq. (4) over the global batch through `gather`.

The task loop of cosmae.py calls a Run's hooks (as mammoth's `end_task` or Lightning's callbacks):
    start(data, model, projector, buffer)              checks, --init, config.json, the evaluation of the init
    restore(t, model, projector, buffer) -> bool       task t is already finished in the folder (its state loaded)
    task_start(t, steps, model, projector, opt, θ_{t−1}) -> e   the first epoch to run (> 0: an interrupted task)
    batches(tiles, B, rng), wrap(module), rank         the loader, DDP / --compile, the process index
    step_end(...), epoch_end(...), task_end(...), end()
This file imports nothing from cosmae.py; eval_mlknn.py plugs its evaluation in as a callback.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
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
import torch.nn as nn

import rs_data
from rs_data import DataError, atomic_write

try:
    import fcntl  # the run-folder lock (Linux, macOS); on Windows runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

NOT_TRAINING = ("out", "seeds", "device", "eval", "log_every", "save_every", "data_root", "cache_dir", "compile",
                "ucmerced", "mlknn_count_self")  # settings that do not change what is trained: a resume may change them


def training_settings(cfg) -> dict:
    """The settings that decide what is trained (every Config field but NOT_TRAINING): kept in config.json and in
    every checkpoint, compared on resume."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TRAINING}


# --- the command line ------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (what is wrong and where to look), not the whole usage text."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(config_cls, argv=None):
    """argparse built from the fields of `config_cls`: `--help` shows each field's text and default."""
    p = ArgumentParser(description=(config_cls.__doc__ or "").strip().split("\n\n")[0],
                       formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(config_cls):
        default, meta = f.default_factory(), dict(f.metadata)
        kw = dict(default=default, help=f"{meta.pop('help')} [default: {default}]".replace("%", "%%"), **meta)
        if "bool" in f.type:
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw.update(nargs="+", type=int if f.name == "seeds" else str)
        else:
            kw["type"] = type(default)
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return config_cls(**vars(p.parse_args(argv)))


def enforce(cfg, rules: list):
    """rules [(field, holds, what is allowed)] → a DataError naming the first flag that breaks its rule."""
    for name, ok, allowed in rules:
        if not ok:
            raise DataError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {allowed}")


def check_flags(cfg, models: dict):
    """Every flag against its meaning: one line naming the flag, its value and what is allowed (exit 2). Called
    right after parsing, before anything is read or written."""
    unknown = [t for t in cfg.tasks if t not in rs_data.SYNTH_TASKS and t not in rs_data.REAL_TASKS]
    if unknown:
        raise DataError(f"unknown task name(s) {unknown}; known: real {list(rs_data.REAL_TASKS)}, "
                        f"synthetic {list(rs_data.SYNTH_TASKS)}")
    synthetic = [t in rs_data.SYNTH_TASKS for t in cfg.tasks]
    if any(synthetic) and not all(synthetic):
        raise DataError(f"--tasks {' '.join(cfg.tasks)}: synthetic and real tasks cannot be mixed in one sequence")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise DataError(f"--{f.name.replace('_', '-')} {v}: must be a finite number")
    m = models.get(cfg.model, {})
    grid = m.get("img_size", 0) // m.get("patch_size", 1)
    enforce(cfg, [
        ("model", cfg.model in models, f"one of {list(models)}"),
        ("epochs", cfg.epochs >= 1, "≥ 1 (0 = by preset)"),
        ("batch_size", cfg.batch_size >= 1, "≥ 1 (0 = by preset)"),
        ("warmup_epochs", 0 <= cfg.warmup_epochs <= cfg.epochs, "between 0 and --epochs (-1 = by preset)"),
        ("mask_ratio", 0 < cfg.mask_ratio < 1 and 1 <= int(grid ** 2 * (1 - cfg.mask_ratio)) < grid ** 2,
         f"in (0, 1), leaving at least one of the {grid ** 2} patches visible and one masked"),
        ("lr", cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, "≥ 0"), ("tau", cfg.tau > 0, "> 0"),
        ("beta", cfg.beta >= 0, "≥ 0"), ("alpha1", cfg.alpha1 > 0, "> 0 (Beta(α1, α1))"),
        ("alpha2", cfg.alpha2 > 0, "> 0 (Beta(α2, α2))"), ("lam1_value", 0 <= cfg.lam1_value <= 1, "in [0, 1]"),
        ("lam2_value", 0 <= cfg.lam2_value <= 1, "in [0, 1]"), ("proj_hidden", cfg.proj_hidden >= 1, "≥ 1"),
        ("memory_size", cfg.memory_size >= (1 if cfg.data_mixup else 0),
         "≥ 1 with data mixup (Eq. (2) draws from the buffer; --no-data-mixup allows 0)"),
        ("log_every", cfg.log_every >= 1, "≥ 1"), ("save_every", cfg.save_every >= 1, "≥ 1"),
        ("synth_train", cfg.synth_train >= cfg.batch_size or cfg.tasks[0] in rs_data.REAL_TASKS,
         f"≥ --batch-size ({cfg.batch_size})"),
        ("seed", cfg.seed >= 0, "≥ 0"), ("seeds", all(s >= 0 for s in cfg.seeds), "≥ 0 each"),
        ("init", not cfg.init or Path(cfg.init).is_file(), "an existing checkpoint file"),
        ("out", cfg.out.strip() not in ("", "."), "a run folder (not empty, not the current folder)")])
    check_device(cfg.device)


def check_device(name: str):
    """--device: cpu, or a CUDA device this machine has (one line and exit 2 otherwise)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DataError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    n_gpu = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and (dev.index or 0) >= n_gpu):
        raise DataError(f"--device {name}: this machine has {n_gpu} CUDA device(s); use auto, cpu"
                        + (f" or cuda:0..cuda:{n_gpu - 1}" if n_gpu else ""))


def main(argv, config_cls, resolve, train, models: dict, make_method=None, evaluation=None):
    """Parse, resolve and check the flags, then one run per seed (--seeds: OUT/seed<s>), each in its locked run
    folder: train(cfg, run) or, for a Table II baseline, train(cfg, run, method.step). A bad input is one line and
    exit 2; Ctrl-C says where the run stopped and exits 130 (finished tasks and the last last.pt are kept)."""
    run = None
    try:
        cfg = resolve(parse_args(config_cls, argv))
        check_flags(cfg, models)
        cfg.out = os.path.normpath(cfg.out)  # runs/x/ and runs/x are one run folder
        setup_distributed(cfg)
        for seed in cfg.seeds or [cfg.seed]:
            out = os.path.join(cfg.out, f"seed{seed}") if cfg.seeds else cfg.out
            run_cfg = dataclasses.replace(cfg, seed=seed, seeds=[], out=out)
            method = make_method(run_cfg) if make_method else None
            with Run(run_cfg, method, [evaluation(run_cfg)] if evaluation and run_cfg.eval else []) as run:
                train(run_cfg, run, method.step) if method else train(run_cfg, run)
        teardown_distributed()
    except DataError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted {run.where if run else 'while reading the data'}. Finished tasks and the last mid-task "
              "checkpoint (every --save-every epochs) are kept: rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)


# --- multi-GPU: torchrun + DistributedDataParallel; all of it is the identity in a single process ------------------
# `torchrun --nproc_per_node=W cosmae.py ...`: each process trains on its B/W rows of every global batch of B
# images, draws its own crops, masks and buffer images (seeded with its index, as MAE's reference code does), and
# Eq. (4) runs over the features gathered from all processes. Only process 0 writes files and evaluates.
DIST = dict(rank=0, world=1)


def setup_distributed(cfg):
    if "RANK" not in os.environ:
        return
    import torch.distributed as dist
    cuda = cfg.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    DIST.update(rank=dist.get_rank(), world=dist.get_world_size())
    if cuda:
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(cfg.device)
    if cfg.batch_size % DIST["world"]:
        raise DataError(f"--batch-size {cfg.batch_size} is not divisible by the {DIST['world']} processes")


def teardown_distributed():
    """After the last run under torchrun: each process waits for the others, then closes the process group (one
    that closes it, or exits, while another is still in a collective can abort with SIGABRT)."""
    if DIST["world"] > 1:
        import torch.distributed as dist
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
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x)
        x /= DIST["world"]
    return x


# --- checkpoint files: atomic, weights-only, a full disk named ----------------------------------------------------

def save_torch(path: Path, obj: dict):
    """torch.save, atomically. torch's writer hides the OSError of a full disk behind a RuntimeError: the file
    object below keeps it, so that atomic_write can name the disk problem."""
    class Keep(io.RawIOBase):
        def __init__(self, f):
            self.f, self.error = f, None

        def writable(self):
            return True

        def write(self, b):
            try:
                return self.f.write(b)
            except OSError as e:
                self.error = e
                raise

    def write(tmp):
        with open(tmp, "wb") as f:
            keep = Keep(f)
            try:
                torch.save(obj, keep)
            except RuntimeError:
                if keep.error:
                    raise keep.error from None
                raise

    atomic_write(path, write)


def load_checkpoint(path, fix: str = "delete it to redo that part of the run", mmap: bool = False) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary pickles. mmap: the
    tensors stay on disk until used (cheap checks of a large file)."""
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


def check_weights(sd, model: nn.Module, what: str, fix: str):
    """sd must hold exactly the model's keys with the model's shapes (a checkpoint of another --model is refused)."""
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise DataError(f"{what}: no model weights in it; {fix}")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = [f"{k} {got[k]} (model: {want[k]})" for k in want if k in got and got[k] != want[k]]
        raise DataError(f"{what}: its weights do not fit this model (missing {missing[:3]}, unexpected {extra[:3]}, "
                        f"other shapes {shapes[:2]}); {fix}")


def finite(model: nn.Module) -> bool:
    """True when every weight is finite (one host sync; checked before a checkpoint is written)."""
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all())


def load_init(model: nn.Module, path: str, what: str = "--init"):
    """The encoder weights of an MAE checkpoint (this project's, or facebookresearch/mae's mae_pretrain_vit_base.pth)
    into `model` (--init, or a checkpoint to evaluate); the decoder stays at its initialisation."""
    fix = f"check the {what} path (an MAE or encoder checkpoint of the same --model)"
    sd = load_checkpoint(path, fix)
    sd = sd.get("model", sd.get("encoder", sd))
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise DataError(f"{what} {path}: no weights found in it (expected a state dict, or one under 'model'); {fix}")
    own = list(model.encoder_state_dict())
    missing = [k for k in own if k not in sd]
    if len(missing) == len(own):
        raise DataError(f"{what} {path}: none of its {len(sd)} weights is an encoder weight of this MAE "
                        f"(e.g. {list(sd)[:3]}); expected facebookresearch/mae names such as blocks.0.attn.qkv.weight")
    own_sd = model.state_dict()
    shapes = [f"{k} {tuple(sd[k].shape)} (model: {tuple(v.shape)})" for k, v in own_sd.items()
              if k in sd and sd[k].shape != v.shape]
    if shapes:
        raise DataError(f"{what} {path}: weights do not fit this --model ({len(shapes)} of other shapes, e.g. "
                        f"{'; '.join(shapes[:2])}); {fix}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own_sd}, strict=False)
    print(f"{what} {path}: every encoder weight loaded" if not missing else
          f"{what} {path}: {len(missing)} encoder weights NOT loaded (left at random init): {missing[:8]}")


def task_file(out, t: int, name: str) -> Path:
    """The checkpoint of finished task t of a run folder."""
    return Path(out) / f"task{t}_{name}.pt"


def finished_tasks(out, tasks: list) -> list:
    """[(t, name, path)] of the task files of a run folder, tasks 1, 2, ... in order up to the first missing one
    (names only: the Run verifies their content)."""
    found = []
    for t, name in enumerate(tasks, 1):
        if not task_file(out, t, name).is_file():
            break
        found.append((t, name, task_file(out, t, name)))
    return found


# --- the run folder ---------------------------------------------------------------------------------------------

class Run:
    """Everything a run writes under cfg.out, and the hooks the task loop calls. Under torchrun only process 0
    writes. Resume = rerun the same command with the same --out."""

    def __init__(self, cfg, method=None, callbacks=()):
        self.cfg, self.out, self.method, self.callbacks = cfg, Path(cfg.out), method, list(callbacks)
        self.rank, self.main, self.at = DIST["rank"], DIST["rank"] == 0, None
        self.settings, self.lock, self.created = training_settings(cfg), None, False
        self.meter, self.t0 = None, None
        try:
            if self.main:
                self.open_folder()
            old = self.read("config.json", None, dict)
            if old is not None:  # a resume: the same training; paths, device, logging, evaluation may change
                self.compare(old, self.out / "config.json")
            self.finished = self.verified_tasks()  # [(t, name, path, lineage, training seconds until then)]
            self.summary = self.read("summary.json", {}, dict)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.summary.update(method=cfg.method, seed=cfg.seed, tasks=cfg.tasks, completed=len(self.finished))
        self.lineage = self.finished[-1][3] if self.finished else []
        self.seconds = self.finished[-1][4] if self.finished else 0.0

    # -- the folder: created, writable, locked ----------------------------------------------------------------
    def open_folder(self):
        """Create --out (refused when it cannot be created or written) and lock it for this process."""
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {self.out} is a file; name a folder")
        try:
            self.created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataError(f"--out {self.out} cannot be created or written ({e.strerror}); name a folder you can "
                            "write to") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise DataError(f"--out {self.out} is in use by {holder}: one process per run folder; wait for it to "
                                "end or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M')} "
                      f"({' '.join(sys.argv[:1] + sys.argv[1:6])})".encode(), 0)
        self.lock = fd

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        """Release the lock; a start that failed before config.json leaves no run folder behind."""
        if self.lock is not None:
            if kind is not None and self.created and not (self.out / "config.json").exists():
                shutil.rmtree(self.out, ignore_errors=True)
            os.close(self.lock)
            self.lock = None
        return False

    # -- files --------------------------------------------------------------------------------------------------
    def read(self, name, default, kind):
        """A JSON file of the folder (default when absent); corrupt or of the wrong shape: one line, exit 2."""
        path = self.out / name
        try:
            obj = json.loads(path.read_text()) if path.exists() else default
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is corrupt ({e}); delete it (and rerun) or use another --out") from None
        if obj is not None and not isinstance(obj, kind):
            raise DataError(f"{path} holds a {type(obj).__name__}, expected a JSON {kind.__name__}; delete it (and "
                            "rerun) or use another --out")
        return obj

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
        """[(t, name, path, lineage, seconds)]: the finished tasks 1, 2, ... of this run, each file checked (task
        index and name, training settings, lineage = the ids of tasks 1..t, each continuing the one before). A
        missing task ends the list; the files of later tasks are set aside (renamed *.set_aside), never used in its
        place; other *.pt files are named in a warning and never used."""
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
            if task_file(self.out, t, name).exists() and self.main:
                aside = task_file(self.out, t, name).with_suffix(".pt.set_aside")
                os.replace(task_file(self.out, t, name), aside)
                print(f"{task_file(self.out, t, name)}: task {len(found) + 1} is not finished, so this later "
                      f"checkpoint cannot be used: set aside as {aside.name}")
        known = {task_file(self.out, t, n).name for t, n in enumerate(self.cfg.tasks, 1)} | {"last.pt"}
        stray = sorted(p.name for p in self.out.glob("*.pt") if p.name not in known)
        if stray and self.main:
            print(f"{self.out}: ignoring files that are not this run's checkpoints: {', '.join(stray)}")
        return found

    def save(self, path: Path, model: nn.Module, **state):
        """A checkpoint of finite weights only: non-finite ones stop the run and keep the last good files."""
        if not finite(model):
            raise DataError(f"the weights became non-finite (NaN/inf) {self.where}: stopped without saving them; every "
                            "checkpoint written so far is finite and kept. Lower --lr (or check the data) and start "
                            "again with another --out")
        if self.main:
            save_torch(path, dict(model=model.state_dict(), settings=self.settings, **state))

    @property
    def where(self) -> str:
        """Where the run is, for the messages of a stop: set by the meter (every step) and the evaluation."""
        if self.at is None or isinstance(self.at, str):
            return self.at or "before task 1"
        t, epoch, step = self.at
        return f"in task {t} ({self.cfg.tasks[t - 1]}), epoch {epoch + 1}, step {step + 1}"

    # -- the hooks of the task loop ----------------------------------------------------------------------------
    def start(self, data: dict, model, projector, buffer):
        """Every input has been read and is checked here: each task's size, the checkpoints' keys and shapes,
        --init, the evaluation data (the callbacks' prepare); then config.json is written (the run exists from now
        on) and the callbacks start (the evaluation of the init)."""
        for name, tiles in data.items():
            if len(tiles) < self.cfg.batch_size:
                raise DataError(f"task {name}: {len(tiles)} images, less than one batch (--batch-size "
                                f"{self.cfg.batch_size})")
        for t, name, path, *_ in self.finished:
            check_weights(load_checkpoint(path, mmap=True).get("model"), model, str(path),
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
        """True when task t is finished in the folder. The last finished task's state (model, projector, buffer,
        the baseline's state) is loaded: the next task continues from it."""
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
        """The first epoch to run of task t (`steps` per epoch): 0, or the epoch after the last mid-task checkpoint
        (last.pt) of this very task of this run (another last.pt is set aside)."""
        if self.method:
            self.method.start_task(t, model, theta_prev)
        self.t0, last, start = time.time(), self.out / "last.pt", 0
        self.meter = Meter(self, self.cfg.epochs * steps)
        if last.exists():
            ck = load_checkpoint(last, "delete it: the task restarts from its first epoch")
            if ck.get("task") == t and list(ck.get("lineage", [None])) == self.lineage and ck.get("settings") == \
                    self.settings:
                check_weights(ck.get("model"), model, str(last), "delete it: the task restarts from its first epoch")
                model.load_state_dict(ck["model"])
                projector.load_state_dict(ck["projector"])
                opt.load_state_dict(ck["opt"])
                start, self.seconds = int(ck["epoch"]), float(ck["seconds"])
                self.meter.load_state_dict(ck["meter"])
                print(f"resuming task {t} after epoch {start}")
            elif self.main:
                os.replace(last, self.out / "last.pt.set_aside")
                print(f"{last} is not a mid-task checkpoint of task {t} of this run: set aside as last.pt.set_aside")
        self.trim_metrics(t, start * steps)
        return start

    def batches(self, tiles, batch_size: int, rng):
        """One epoch of raw uint8 batches on the device (rs_data.batches); under torchrun this process's rows. The
        time the loop waits for each batch goes to the meter ("data wait": the share of the time the loop waited
        for the data; near 0 %, loading is not what limits the speed)."""
        it = rs_data.batches(tiles, batch_size, rng, self.cfg.device, (self.rank, DIST["world"]))
        while True:
            t0 = time.perf_counter()
            raw = next(it, None)
            self.meter.wait += time.perf_counter() - t0
            if raw is None:
                return
            yield raw

    def wrap(self, module: nn.Module) -> nn.Module:
        """--compile: the module compiled in place (its forward); under torchrun a trained module in DDP."""
        if self.cfg.compile:
            module.compile(dynamic=False)  # static shapes: a new batch size (ER) compiles anew
        if DIST["world"] == 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        dev = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None)

    def step_end(self, t, epoch, step, n_img, losses, lam1, lam2, lr):
        self.meter.update(t, epoch, step, n_img, losses, lam1, lam2, lr)

    def epoch_end(self, t, epoch, model, projector, opt):
        """Every --save-every epochs (not after the last): last.pt, from which an interrupted task continues."""
        if (epoch + 1) % self.cfg.save_every == 0 and epoch + 1 < self.cfg.epochs:
            self.save(self.out / "last.pt", model, task=t, epoch=epoch + 1, projector=projector.state_dict(),
                      opt=opt.state_dict(), lineage=self.lineage, seconds=self.seconds + time.time() - self.t0,
                      meter=self.meter.state_dict())

    def task_end(self, t, model, projector, buffer, tiles):
        """After task t: the baseline's end-of-task work, the checkpoint (everything the next task needs), the
        summary; then the callbacks (evaluation)."""
        if self.method:
            self.method.end_task(t, model, tiles, buffer)
        self.seconds += time.time() - self.t0
        self.lineage = self.lineage + [secrets.token_hex(8)]
        self.save(task_file(self.out, t, self.cfg.tasks[t - 1]), model, task=t, name=self.cfg.tasks[t - 1],
                  lineage=self.lineage, projector=projector.state_dict(), buffer=buffer.state_dict(),
                  encoder=model.encoder_state_dict(),
                  method=self.method.state_dict() if self.method else {}, train_seconds=self.seconds)
        self.finished.append((t, self.cfg.tasks[t - 1], task_file(self.out, t, self.cfg.tasks[t - 1]), self.lineage,
                              self.seconds))
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
        """Drop the metrics.jsonl records of the steps of task t (and later) that this run replays: after a
        resume every step is logged once. A torn last record (a crash mid-write) is dropped; any other line that
        is not a record is an error naming it."""
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


class Meter:
    """Progress lines and metrics.jsonl records every cfg.log_every steps. Losses stay on the device between log
    points: the only host syncs are at a log point, where a non-finite loss stops the run. Its running sums go
    into last.pt, so the first record after a mid-task resume covers the same steps as without the stop. Each
    record also gives the share of its time the loop waited for the next batch (data_wait)."""

    def __init__(self, run: Run, total: int):
        self.run, self.cfg, self.total = run, run.cfg, total
        self.sums, self.n, self.imgs, self.wait, self.t0 = None, 0, 0, 0.0, time.perf_counter()

    def state_dict(self) -> dict:
        return dict(sums=self.sums.cpu() if self.sums is not None else None, n=self.n)

    def load_state_dict(self, sd: dict):
        self.sums = sd["sums"].to(self.cfg.device) if sd["sums"] is not None else None
        self.n = int(sd["n"])

    def update(self, t, epoch, step, n_img, losses, lam1, lam2, lr):
        vals = torch.stack([v.detach().float() for v in losses])
        self.sums = vals if self.sums is None else self.sums + vals
        self.n, self.imgs = self.n + 1, self.imgs + n_img
        self.run.at = (t, epoch, step)  # formatted only when a message needs it
        if (step + 1) % self.cfg.log_every and step + 1 != self.total:
            return
        total, rec, mim = (all_mean(self.sums) / self.n).tolist()  # every process joins the all-reduce
        if not all(map(math.isfinite, (total, rec, mim))):
            raise DataError(f"non-finite loss (total {total}, rec {rec}, mim {mim}) {self.run.where}: stopped; every "
                            "checkpoint written so far is finite and kept. Lower --lr (or check the data) and start "
                            "again with another --out")
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        rate, wait = self.imgs * DIST["world"] / seconds, self.wait / seconds
        self.sums, self.n, self.imgs, self.wait, self.t0 = None, 0, 0, 0.0, time.perf_counter()
        if not self.run.main:
            return
        eta = (self.total - step - 1) * self.cfg.batch_size / rate
        with rs_data.disk_errors(self.run.out / "metrics.jsonl"), open(self.run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"task": t, "name": self.cfg.tasks[t - 1], "epoch": epoch, "step": step + 1,
                                "loss/total": total, "loss/rec": rec, "loss/mim": mim, "lam1": lam1, "lam2": lam2,
                                "lr": lr, "img/s": rate, "data_wait": wait}) + "\n")
        print(f"task {t} {self.cfg.tasks[t - 1]} | ep {epoch + 1}/{self.cfg.epochs} | step {step + 1}/{self.total} | "
              f"loss {total:.4f} rec {rec:.4f} mim {mim:.4f} | λ1 {lam1:.2f} λ2 {lam2:.2f} | lr {lr:.2e} | "
              f"{rate:.1f} img/s, data wait {100 * wait:.0f} % | ETA task {eta / 60:.1f} min", flush=True)
