"""The epoch loop: `fit` trains any model on any two datasets with a loss and a score function.

`fit` knows nothing about COVID, so ChestX-ray14 pretraining (14 sigmoid outputs, BCE, mean AUROC) reuses
the loop, the checkpoints, resume and DistributedDataParallel; the same code runs in one process or under
`torchrun`. Here too: the optimiser and scheduler factories, the random states a resumed run restores, and
`main_first` (rank 0 prepares data and caches, the other ranks then read them).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import distributed, images, models
from .atomic import save_torch, write_csv
from .config import CHOICES, RunConfig
from .errors import CXRError
from .infer import amp_dtype, predict_dataset, progress_enabled, to_device
from .rundir import BEST, LAST

NAN_CHECK_EVERY = 16  # batches between reads of the non-finite-loss record on a GPU (each read waits for the device)


@dataclass
class FitOptions:
    """How `fit` trains. `monitor` is the key of score_fn's dict that picks the best epoch (higher is better).
    The fields a run also has take RunConfig's defaults (never restated here; tests/test_config.py checks)."""

    epochs: int = RunConfig.epochs
    batch_size: int = RunConfig.batch_size
    optimizer: str = RunConfig.optimizer  # adamw | sgd (momentum 0.9)
    lr: float = RunConfig.lr
    weight_decay: float = RunConfig.weight_decay
    scheduler: str = RunConfig.scheduler  # cosine | step (x0.1 every third of the epochs) | none
    patience: int = RunConfig.patience  # epochs without a better monitor before stopping; 0 disables
    monitor: str = "macro_f1"
    seed: int = RunConfig.seed
    device: str = RunConfig.device
    amp: str = RunConfig.amp  # auto | bf16 | fp16 | off: see infer.amp_dtype
    channels_last: bool = True
    num_workers: int = RunConfig.num_workers
    device_batches: bool = True  # gather and augment batches on the device (images.DeviceBatches) where possible
    eval_batch_size: int = 256  # validation and test forwards: no gradients, so larger batches
    progress: bool | None = None  # None: bars on a terminal or in a notebook, off in logs

    @classmethod
    def from_config(cls, cfg: RunConfig, **overrides: Any) -> "FitOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in cfg.to_dict().items() if k in names}, **overrides})


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epoch: int
    best_score: float
    best_state: dict[str, torch.Tensor]  # state_dict of save_module at the best epoch (CPU tensors)
    stopped_early: bool


def classification_scores(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Validation scores of single-label classification: macro-F1 (classes without support left out) and accuracy."""
    pred = probs.argmax(axis=1)
    labels = list(range(probs.shape[1]))
    return {"macro_f1": float(f1_score(targets, pred, labels=labels, average="macro", zero_division=np.nan)),
            "accuracy": float(accuracy_score(targets, pred))}


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    loss_fn: nn.Module,
    opts: FitOptions,
    out_dir: str | Path | None = None,
    *,
    sampler: torch.utils.data.WeightedRandomSampler | None = None,
    score_fn: Callable[[np.ndarray, np.ndarray], Mapping[str, float]] = classification_scores,
    output: str = "softmax",
    model_meta: Mapping[str, Any] | None = None,
    save_module: nn.Module | None = None,
    resume: bool = False,
    history_extra: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train `model` on `train_set`, score each epoch on `val_set`, keep the best epoch; resumable, DDP-aware.

    Datasets yield (input, target, ...). `sampler` (e.g. data.weighted_sampler) replaces shuffling;
    under torchrun it becomes a WeightedShardSampler drawing the same weighted sample on every rank.
    `score_fn(targets, probs)` returns the validation scores (probs = softmax or sigmoid of the
    outputs, per `output`); `opts.monitor` names the one that selects the best epoch and drives early
    stopping. With `out_dir`, rank 0 writes history.csv, model.pt (`model_meta` + the state_dict of
    `save_module`, default `model`, at the best epoch) and checkpoint-last.pt after every epoch,
    atomically; `resume=True` continues from checkpoint-last.pt with its RNG states, so the result
    equals an uninterrupted run. Frozen modules (models.freeze_model) stay in eval mode.
    """
    info = distributed.current()
    device = distributed.resolve_device(opts.device, info)
    dtype = amp_dtype(opts.amp, device)
    out_dir = Path(out_dir) if out_dir is not None else None
    save_module = save_module if save_module is not None else model
    if out_dir is not None and info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(_place(model, loss_fn, device, opts), opts)
    scheduler = make_scheduler(optimizer, opts)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    feed = _Feed.make(train_set, sampler, opts, info, device)
    val_on_device = images.DeviceBatches.of(val_set, device) if opts.device_batches else None
    net = model
    if info.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    last = out_dir / LAST if out_dir is not None else None
    if resume and last is not None and last.is_file():
        state, best_state = _restore(last, model, optimizer, scheduler, scaler, feed, info)
    else:
        seed_everything(opts.seed + info.rank)
        state, best_state = {"epoch": 0, "best_score": -float("inf"), "best_epoch": 0, "bad_epochs": 0,
                             "history": [], "stopped": False}, None

    show = info.is_main and progress_enabled(opts.progress)
    epochs = range(state["epoch"], opts.epochs) if not state["stopped"] else range(0)
    for epoch in tqdm(epochs, desc="epochs", disable=not show, initial=state["epoch"], total=opts.epochs):
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        _train_mode(model)
        train_loss = _train_epoch(net, feed, epoch, loss_fn, optimizer, scaler, dtype, device, opts, show, info)
        if scheduler is not None:
            scheduler.step()
        probs, targets, val_loss = predict_dataset(
            model, val_set if val_on_device is None else val_on_device, batch_size=opts.eval_batch_size,
            device=device, amp=opts.amp, output=output, loss_fn=loss_fn, channels_last=opts.channels_last,
            num_workers=opts.num_workers, device_batches=opts.device_batches)
        if not np.isfinite(probs).all():  # finite losses, yet the last step left weights that overflow
            raise CXRError(f"non-finite validation outputs after epoch {epoch + 1}: training diverged and stopped; "
                           f"lower the learning rate (lr={opts.lr:g})")
        scores = dict(score_fn(targets, probs))
        if opts.monitor not in scores:
            raise CXRError(f"monitor={opts.monitor!r} is not among the validation scores {sorted(scores)}")
        shown = {k: v for k, v in scores.items() if np.isscalar(v)}
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
               **{f"val_{k}": v for k, v in shown.items()},
               "lr": lr, "seconds": time.perf_counter() - start, **(history_extra or {})}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        score = scores[opts.monitor]
        if score is not None and np.isfinite(score) and score > state["best_score"]:
            state.update(best_score=float(score), best_epoch=epoch + 1, bad_epochs=0)
            best_state = _cpu_state(save_module)
            if out_dir is not None and info.is_main:
                save_torch({**(model_meta or {}), "state_dict": best_state, "epoch": epoch + 1, "val": shown},
                           out_dir / BEST)
        else:
            state["bad_epochs"] += 1
        state["stopped"] = opts.patience > 0 and state["bad_epochs"] >= opts.patience
        rng = distributed.gather_objects(_rng_state(feed.sampler, feed.rng))
        if out_dir is not None and info.is_main:
            write_csv(pd.DataFrame(state["history"]), out_dir / "history.csv")
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "scaler": scaler.state_dict(), "state": state, "rng": rng, "options": dataclasses.asdict(opts)},
                       last)
        if info.is_main and opts.progress is not False:  # one line per epoch, also in logs without bars
            tqdm.write(f"epoch {epoch + 1}/{opts.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                       + ", ".join(f"val {k} {v:.4f}" for k, v in shown.items()) + f" ({row['seconds']:.0f} s)")
        distributed.barrier()
        if state["stopped"]:
            break
    if best_state is None:  # no epoch scored (NaN monitor throughout): keep the last weights
        best_state = _cpu_state(save_module)
    return FitResult(pd.DataFrame(state["history"]), state["best_epoch"], state["best_score"], best_state,
                     state["stopped"])


def _place(model: nn.Module, loss_fn: nn.Module, device: torch.device, opts: FitOptions) -> list[nn.Parameter]:
    """Model and loss on the device (channels-last if asked); the parameters to train (CXRError when none)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    loss_fn.to(device)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CXRError("nothing to train: every parameter of the model is frozen")
    return params


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@dataclasses.dataclass
class _Feed:
    """Where training batches come from: a DataLoader, or the images already on the device (DeviceBatches), in
    the order of `sampler`, with `rng` for the loader's workers and the device path's augmentation draws."""

    sampler: torch.utils.data.Sampler
    rng: torch.Generator
    loader: DataLoader | None
    on_device: images.DeviceBatches | None
    batch_size: int
    drop_last: bool

    @classmethod
    def make(cls, train_set: Dataset, weighted: torch.utils.data.WeightedRandomSampler | None, opts: FitOptions,
             info: distributed.DistInfo, device: torch.device) -> "_Feed":
        sampler = _train_sampler(train_set, weighted, opts.seed, info)
        rng = torch.Generator().manual_seed(opts.seed + info.rank)
        # Drop the last batch only when it would hold one image: BatchNorm cannot train on a batch of one.
        drop_last = len(sampler) % opts.batch_size == 1 and len(sampler) > 1
        on_device = images.DeviceBatches.of(train_set, device) if opts.device_batches else None
        loader = None if on_device is not None else DataLoader(
            train_set, batch_size=opts.batch_size, sampler=sampler, drop_last=drop_last,
            num_workers=opts.num_workers, worker_init_fn=_seed_worker, generator=rng,
            pin_memory=device.type == "cuda", persistent_workers=False)
        return cls(sampler, rng, loader, on_device, opts.batch_size, drop_last)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if self.loader is not None:
            return self.loader
        return self.on_device.batches(list(self.sampler), self.batch_size, self.drop_last, self.rng)


def _train_epoch(net: nn.Module, feed: _Feed, epoch: int, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, dtype: torch.dtype | None, device: torch.device, opts: FitOptions,
                 show: bool, info: distributed.DistInfo) -> float:
    """One pass over the training batches; the mean training loss over every process's images.

    A non-finite loss stops training with CXRError naming its epoch and batch (recorded on the device, so no step
    waits for it): in one process at that batch on a CPU, within NAN_CHECK_EVERY batches on a GPU (each read waits
    for the device); under torchrun at the epoch's end, on every rank together (a rank stopping alone would leave
    the others waiting in their next all-reduce)."""
    loss_sum, seen = torch.zeros((), device=device), 0
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first batch whose loss is not finite
    for k, batch in enumerate(tqdm(feed.epoch(epoch), desc=f"epoch {epoch + 1}", disable=not show, leave=False,
                                   total=len(feed))):
        x, y = to_device(batch[0], device, opts.channels_last), batch[1].to(device, non_blocking=True)
        loss = train_step(net, x, y, loss_fn, optimizer, scaler, dtype)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), k, first_bad)
        loss_sum += loss * len(y)
        seen += len(y)
        if (not info.distributed and (device.type != "cuda" or k % NAN_CHECK_EVERY == 0)
                and int(first_bad) >= 0):
            raise _diverged(epoch, int(first_bad), len(feed), opts)
    totals = distributed.gather_objects((float(loss_sum), seen, int(first_bad)))
    bad = [t[2] for t in totals if t[2] >= 0]
    if bad:
        raise _diverged(epoch, min(bad), len(feed), opts)
    return sum(t[0] for t in totals) / max(1, sum(t[1] for t in totals))


def _diverged(epoch: int, batch: int, batches: int, opts: FitOptions) -> CXRError:
    """The error that stops a run at its first non-finite loss (`epoch` and `batch` count from 0)."""
    return CXRError(f"non-finite training loss (NaN or inf) in epoch {epoch + 1}, batch {batch + 1} of {batches}: "
                    f"training diverged and stopped; lower the learning rate (lr={opts.lr:g})")


def _restore(last: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
             feed: _Feed, info: distributed.DistInfo) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Resume from checkpoint-last.pt: weights, optimiser, schedule, scaler, RNG states; the best epoch's weights."""
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == info.world_size:
        _set_rng_state(ckpt["rng"][info.rank], feed.sampler, feed.rng)
    best = last.parent / BEST
    best_state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"] if best.is_file() else None
    return ckpt["state"], best_state


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, dtype: torch.dtype | None) -> torch.Tensor:
    """One optimiser step under autocast (`dtype`, None = fp32); the loss, detached. `fit` and the benchmarks
    time the same step."""
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = net(x)
    loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def make_optimizer(params: Sequence[nn.Parameter], opts: FitOptions) -> torch.optim.Optimizer:
    """AdamW or SGD, fused (one kernel for all parameters) where every parameter is a float tensor on a CPU
    or GPU: on one CPU thread that made a ResNet50 AdamW step 3x faster than the default for-each one."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=fused)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay, fused=fused)
    raise CXRError(f"parameter optimizer={opts.optimizer!r}: choose one of {', '.join(CHOICES['optimizer'])}")


def make_scheduler(optimizer: torch.optim.Optimizer, opts: FitOptions) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch schedules: cosine to 0 over all epochs, or x0.1 every third of them."""
    if opts.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, opts.epochs))
    if opts.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, opts.epochs // 3), gamma=0.1)
    if opts.scheduler == "none":
        return None
    raise CXRError(f"parameter scheduler={opts.scheduler!r}: choose one of {', '.join(CHOICES['scheduler'])}")


def _train_sampler(dataset: Dataset, weighted: torch.utils.data.WeightedRandomSampler | None, seed: int,
                   info: distributed.DistInfo) -> torch.utils.data.Sampler:
    """Shuffling (DistributedSampler, also for one process: the same order whatever the world size) or weighted."""
    if weighted is None:
        return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
    if not info.distributed:
        return weighted
    return distributed.WeightedShardSampler(weighted.weights, weighted.num_samples, info.rank, info.world_size, seed)


def _train_mode(model: nn.Module) -> None:
    """Train mode; frozen backbone parts stay in eval so their BatchNorm statistics stay those of the weights."""
    if getattr(model, "frozen_modules", None) is not None:
        models.train_mode(model)
    else:
        model.train()


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every GPU) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: torch seeds each from the loader's generator; NumPy and random follow it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _rng_state(sampler: torch.utils.data.Sampler, loader_rng: torch.Generator) -> dict[str, Any]:
    """This rank's random states as tensors and plain lists (checkpoints load with weights_only=True)."""
    np_state = np.random.get_state()
    gen = getattr(sampler, "generator", None)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [list(random.getstate()[1]), random.getstate()[0]],
        "sampler": gen.get_state() if gen is not None else None,
        "loader": loader_rng.get_state(),
    }


def _set_rng_state(rng: dict[str, Any], sampler: torch.utils.data.Sampler, loader_rng: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    random.setstate((rng["python"][1], tuple(rng["python"][0]), None))
    gen = getattr(sampler, "generator", None)
    if gen is not None and rng["sampler"] is not None:
        gen.set_state(rng["sampler"])
    loader_rng.set_state(rng["loader"])


class main_first:
    """Context manager: rank 0 runs the block first, the other ranks after it (warm caches, no races)."""

    def __init__(self, info: distributed.DistInfo):
        self.info = info

    def __enter__(self):
        if not self.info.is_main:
            distributed.barrier()

    def __exit__(self, *exc):
        if self.info.is_main and exc[0] is None:
            distributed.barrier()
        return False
