"""The one training loop: epochs of steps, warm-up + cosine schedule, AMP on GPU, gradient
clipping, a checkpoint every epoch with resume, the best epoch kept by a validation metric,
a progress bar with loss and ETA, and a JSONL log.

Models differ only in their `Task`: how a batch becomes a loss dict (torchvision detectors
already return one) and how validation turns the model into metrics. The scheduler steps
after the optimizer (the Deep SAD reference does it the other way round).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import pickle
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.io import unwritable
from pipelines.outputs import sweep_temporaries, write_atomically
from pipelines.training.distributed import DistInfo, all_reduce_mean, barrier

log = logging.getLogger(__name__)


class Task(Protocol):
    def training_step(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """Loss terms for one batch; the loop optimises their sum."""

    def batch_size(self, batch: Any) -> int: ...

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Metrics on the validation set (called on rank 0 with the unwrapped model)."""


@dataclass
class LoopConfig:
    out_dir: Path
    epochs: int = 12
    # no learning rate here: the caller builds the optimizer with its own (a field that was
    # never read suggested it set one)
    warmup_iters: int = 100
    schedule: str = "cosine"  # or "constant" (the paper's stage-2 recipes name no schedule)
    grad_clip: float | None = 10.0
    amp: bool = True  # bf16 autocast, only where CUDA is present
    select_metric: str = "map"
    select_mode: str = "max"
    resume: bool = False
    max_steps_per_epoch: int | None = None  # smoke runs and tests
    validate_every: int = 1
    progress: bool = True
    log_every: int = 20  # steps between log lines (the bar is invisible in CI logs and nohup files)
    # the caller's training settings (`recipe_of`): a resume with other ones is refused
    recipe: dict[str, str] = field(default_factory=dict)


# Settings a resume may change: they do not change what is trained (or, --epochs, only how long)
CHANGEABLE_ON_RESUME = frozenset({"epochs", "resume", "progress", "log_every", "workers", "device", "out_dir",
                                  "max_steps_per_epoch"})


def recipe_of(cfg: Any) -> dict[str, str]:
    """A training config (a dataclass) as the settings a resume must keep: each field as JSON
    text, but for `CHANGEABLE_ON_RESUME`."""
    return {k: json.dumps(v, default=str, sort_keys=True) for k, v in asdict(cfg).items()
            if k not in CHANGEABLE_ON_RESUME}


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_weights: Path | None = None


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  constant: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 1/1000 of the rate, then cosine to zero (or flat), per iteration."""

    def factor(it: int) -> float:
        if it < warmup:
            return 0.001 + (1 - 0.001) * it / max(1, warmup)
        if constant:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class DivergedError(ValueError, FloatingPointError):
    """A loss that is not finite: a ValueError, so that every training command names it in one
    line as it does bad input (it was a 60-line traceback)."""


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


def _atomic_save(obj: Any, path: Path) -> None:
    def save(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's writer on a full disk
            raise unwritable(path, e) from e

    write_atomically(path, save)


def _check_can_train(cfg: LoopConfig, loader: Iterable, ckpt_path: Path, log_path: Path) -> None:
    """Refusals before the first step, each once a silent loss: fewer training items than one
    batch (the loaders drop the last partial batch) trained nothing and exported the untrained
    model with exit code 0; a second run into a run folder without --resume overwrote its
    checkpoint and weights and appended a second epoch 0 to its log."""
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {cfg.epochs}")
    if len(loader) == 0:  # type: ignore[arg-type]
        items = len(getattr(loader, "dataset", ()))
        size = getattr(loader, "batch_size", None)
        raise ValueError(f"no training step: {items} training items do not fill one batch of {size} (the last "
                         "partial batch is dropped); lower --batch-size or add data")
    if not cfg.resume and (ckpt_path.exists() or log_path.exists()):
        raise ValueError(f"{ckpt_path.parent} already holds a training run: pass --resume to continue it, or "
                         "choose another output folder")


def _rng_state() -> dict[str, Any]:
    """Every random state an epoch draws from (augmentation, shuffling, dropout, the loaders'
    worker seeds), as tensors and lists a weights-only load takes: without them a resumed epoch
    k replayed epoch 0's draws, and a resumed run was not the run it continued."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(state), gauss_next]}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = rng["python"]
    random.setstate((version, tuple(state), gauss_next))


def apart_for_rank(rank: int) -> None:
    """A rank after a resume: its own random streams again. The checkpoint holds rank 0's state
    alone, and every rank that restored it drew rank 0's augmentations and worker seeds (an
    audit); a start seeds `seed + rank`. Rank 0 keeps the restored state, so a resumed
    single-process run is still the run it continued."""
    if rank:
        seed = int(torch.randint(0, 2**31 - 1, (1,))) + rank  # the same draw on every rank, then apart
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)


class ResumeRefused(ValueError):
    """The checkpoint is sound but this run's settings are not its own."""


def _check_recipe(saved: dict[str, str], now: dict[str, str], ckpt_path: Path) -> None:
    """A resume with other settings trained on under the checkpoint's optimizer state (a new
    --lr was not applied) and other data, and the card recorded the new settings for the
    whole run. Only `CHANGEABLE_ON_RESUME` may change; checkpoints without a recipe (older
    runs) are not checked."""
    changed = [f"{k}: {saved.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
               for k in sorted(set(saved) | set(now)) if saved and saved.get(k) != now.get(k)]
    if changed:
        raise ResumeRefused(f"cannot resume {ckpt_path.parent} with other settings than it was started with "
                            f"({'; '.join(changed)}): only --epochs (and train-detector's --workers and "
                            "--max-steps) may change; resume "
                            "with the same settings, or train into another folder")


def _check_world_size(history: list[dict[str, Any]], world_size: int, ckpt_path: Path) -> None:
    """A run resumed by another number of processes: each process draws its share of an
    epoch, so the steps per epoch, the effective batch and the schedule's length all changed
    under the optimizer's state, unsaid (a 2-process run went on as 1: an audit)."""
    before = history[-1].get("world_size", 1) if history else world_size
    if before != world_size:
        raise ResumeRefused(f"cannot resume {ckpt_path.parent} with {world_size} training process(es): it was "
                            f"trained by {before} (torchrun --nproc-per-node {before}); resume with as many, or "
                            "train into another folder")


def _check_epochs(trained: int, wanted: int, ckpt_path: Path) -> None:
    """A resume with fewer --epochs than already trained re-exported the run with a card that
    recorded the smaller count beside a log of the larger one."""
    if wanted < trained:
        raise ResumeRefused(f"cannot resume {ckpt_path.parent} with --epochs {wanted}: it has trained {trained} "
                            f"epochs; pass --epochs {trained} to export it again, or more to go on")


def _commit_pending_best(ck: dict[str, Any], best_path: Path, pending: Path) -> None:
    """A new best epoch's weights are written aside (`pending`), then the checkpoint commits the
    epoch, then they are renamed into place. A run killed between those steps leaves a pending
    file: the checkpoint's (its sha256 recorded there) is put in place, another epoch's is
    dropped; and the best weights in place must be the checkpoint's. Before, a kill during the
    checkpoint's write shipped the next epoch's weights under the previous epoch's card."""
    from models.io import sha256_file

    want = ck.get("best_sha256")
    if pending.exists():
        if want is not None and sha256_file(pending) == want:
            pending.replace(best_path)
        else:
            pending.unlink()
    if want is not None and best_path.exists() and sha256_file(best_path) != want:
        raise ValueError(f"{best_path} is not the best epoch's weights its checkpoint records (written by another "
                         "run?): move the folder away to train from the start")


def fit(
    model: nn.Module,
    task: Task,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    cfg: LoopConfig,
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
) -> FitResult:
    from safetensors.torch import save as safetensors_bytes

    out = Path(cfg.out_dir)
    ckpt_path, best_path, log_path = out / "checkpoint.pt", out / "best.safetensors", out / "metrics.jsonl"
    pending = out / "best.pending.safetensors"
    _check_can_train(cfg, loader, ckpt_path, log_path)
    out.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)  # a checkpoint's half-write a kill left (hundreds of MB), over an hour old
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    scheduler = warmup_cosine(optimizer, cfg.warmup_iters, cfg.epochs * steps, constant=cfg.schedule == "constant")
    start_epoch, best, history, best_epoch, best_metrics, best_sha256 = 0, None, [], -1, {}, None
    if cfg.resume and ckpt_path.is_file():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            # the settings first: another --arch was "damaged ... move it away", for want of a name
            _check_recipe(ck.get("recipe", {}), cfg.recipe, ckpt_path)
            _check_epochs(ck["epoch"] + 1, cfg.epochs, ckpt_path)
            _check_world_size(json.loads(ck["history"]), dist_info.world_size, ckpt_path)
            _unwrap(model).load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            start_epoch, best, best_epoch = ck["epoch"] + 1, ck["best"], ck["best_epoch"]
            history, best_metrics = json.loads(ck["history"]), json.loads(ck["best_metrics"])
            planned = json.loads(ck.get("config", "{}")).get("epochs", cfg.epochs)
            if planned != cfg.epochs and dist_info.is_main:
                # the schedule is per iteration over the run's whole length: a new length moves
                # every remaining step's rate (a run done at 2 epochs had reached 0, and its
                # 3rd epoch began at the 4-epoch schedule's half-way rate: an audit)
                log.warning("resumed with --epochs %d, planned %d: the learning rate follows the %d-epoch "
                            "schedule from epoch %d on, not the one trained under so far (metrics.jsonl records "
                            "each epoch's rate)", cfg.epochs, planned, cfg.epochs, start_epoch)
        except ResumeRefused:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
            # a truncated file, another architecture's weights: say which checkpoint, not `Errno 22`
            raise ValueError(f"cannot resume from {ckpt_path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             "it is damaged or from another model: move it away to train from the start") from None
        best_sha256 = ck.get("best_sha256")
        if dist_info.is_main:
            _commit_pending_best(ck, best_path, pending)
        if "rng" in ck:
            _set_rng_state(ck["rng"])
            apart_for_rank(dist_info.rank)
        if dist_info.is_main:
            log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif dist_info.is_main:
        pending.unlink(missing_ok=True)  # a first epoch's, killed before its checkpoint
        if cfg.resume:  # a mistyped -o trained a whole run from scratch under --resume, unsaid (an
            # audit); a warning, not a refusal: a run killed in its first epoch, or Deep SAD's
            # second stage after a resumed pretraining, has nothing to resume either
            log.warning("--resume: %s holds no checkpoint.pt: training from the start", out)

    use_amp = cfg.amp and device.type == "cuda"
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            model.train()
            sums: dict[str, float] = {}
            seen, done, t0 = 0, 0, time.perf_counter()
            bar = _Bar(steps, epoch, cfg.epochs, enabled=cfg.progress and dist_info.is_main)
            # islice: a break at `steps` had drawn one batch more (its random draws with it), and
            # the epoch's mean loss was then divided by one step too many (an audit)
            for step, batch in enumerate(itertools.islice(loader, steps)):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    losses = task.training_step(model, batch, device)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    terms = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in losses.items())
                    raise DivergedError(f"loss is {loss.detach().item()} at epoch {epoch} step {step} ({terms}): "
                                        "training diverged; train again into a new folder with a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                seen += task.batch_size(batch)
                done = step + 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                bar.update(step + 1, sums["loss"] / (step + 1))
                if dist_info.is_main and cfg.log_every and (step + 1) % cfg.log_every == 0:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    eta = (steps - step - 1) * (time.perf_counter() - t0) / (step + 1)
                    log.info("epoch %d step %d/%d loss %.4f, %.1f images/s, epoch ETA %.0f s",
                             epoch + 1, step + 1, steps, sums["loss"] / (step + 1), rate, eta)
            bar.close()
            seconds = time.perf_counter() - t0
            record: dict[str, Any] = {
                "epoch": epoch, "lr": scheduler.get_last_lr()[0], "seconds": round(seconds, 2),
                "world_size": dist_info.world_size,  # the processes whose losses are averaged here
                # the same seed trains the same weights only at the same thread count too
                "threads": torch.get_num_threads(),
                "train_images_per_s": round(seen * dist_info.world_size / max(seconds, 1e-9), 2),
                **{f"train_{k}": all_reduce_mean(v / max(1, done), dist_info) for k, v in sums.items()},
            }
            if dist_info.is_main and ((epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs):
                metrics = task.validate(_unwrap(model), device)
                record.update({f"val_{k}": v for k, v in metrics.items()})
                score = metrics[cfg.select_metric]
                new_best = _better(score, best, cfg.select_mode)
                if new_best:  # aside until the checkpoint commits this epoch (`_commit_pending_best`)
                    best, best_epoch, best_metrics = score, epoch, metrics
                    data = safetensors_bytes({k: v.detach().contiguous().cpu()
                                              for k, v in _unwrap(model).state_dict().items()})
                    best_sha256 = hashlib.sha256(data).hexdigest()
                    write_atomically(pending, lambda tmp, data=data: tmp.write_bytes(data))
                log.info("epoch %d: %s", epoch, {k: v for k, v in record.items() if not k.startswith("train_l")})
            else:
                new_best = False
            history.append(record)
            if dist_info.is_main:
                # the log rewritten from the history the checkpoint holds: a resume after a kill
                # between the two wrote a second, different record of the same epoch
                lines = "".join(json.dumps(r) + "\n" for r in history)
                write_atomically(log_path, lambda tmp, lines=lines: tmp.write_text(lines))
                _atomic_save({
                    "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "best_epoch": best_epoch,
                    "history": json.dumps(history), "best_metrics": json.dumps(best_metrics),
                    "config": json.dumps(asdict(cfg), default=str), "recipe": cfg.recipe, "best_sha256": best_sha256,
                    "rng": _rng_state(),
                }, ckpt_path)
                if new_best:
                    pending.replace(best_path)
            barrier(dist_info)
    except KeyboardInterrupt:
        if dist_info.is_main:
            done = len(history)
            log.warning("interrupted in epoch %d; %s", done, f"the checkpoint holds epochs 0-{done - 1}: the same "
                        "command with --resume continues" if done else "no epoch was finished")
        raise
    return FitResult(best_epoch, best_metrics, history, best_path if best_path.exists() else None)


class _Bar:
    """A rich progress bar on the main rank (loss and ETA), silent elsewhere."""

    def __init__(self, total: int, epoch: int, epochs: int, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
                                     TimeRemainingColumn(), transient=True, console=Console(stderr=True))
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, loss=float("nan"))

    def update(self, done: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, loss=loss)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
