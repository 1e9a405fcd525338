"""Fine-tuning a Classifier end to end, the way docs/transfer.md prescribes (LP-FT).

1. Head phase (`settings.head_epochs`): body frozen, only the new head trains, at head_lr/10: a fresh head is
   random and its large early errors would wreck pretrained weights if they could move, and ours starts as
   the linear probe's, which a full head_lr pulls apart.
2. Body phase: unfreeze the groups `policy.choose_depth` decided, with discriminative learning rates
   (head, head/10, head/100 inwards), a fresh warmup + cosine schedule, weight decay and label smoothing.
   Frozen groups keep BatchNorm in eval mode (their ImageNet statistics stay intact). Below "all" depth
   (i.e. small and medium data) the unfrozen groups' BatchNorm statistics stay frozen too, only its affine
   weights train: a few dozen steps cannot re-estimate them (EfficientNet-Lite's momentum is 0.01), and
   batch statistics in training vs stale running ones at evaluation cost accuracy (Fashion-MNIST, 400
   images, depth "last": val loss 0.73 with frozen statistics vs 1.33 with them training). At "all" they
   stay frozen as well unless `settings.adapt_batchnorm` (then at momentum BN_MOMENTUM): with them adapting,
   500 labels/class, validation accuracy fell from 0.83 to 0.50 in one body epoch (bench/finetune.py).

Every epoch is scored on the validation set and the best epoch's weights are returned: fine-tuning can
overfit or transfer negatively, and the caller compares the result against the simpler model anyway.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader

from flywheel.atomic import atomic_path, verify_checksum
from flywheel.config import FinetuneSettings
from flywheel.errors import CorruptFileError, DataError
from flywheel.features.backbones import BackboneSpec, Classifier, get_spec
from flywheel.features.pipeline import Forward, auto_workers
from flywheel.features.store import resolve_device
from flywheel.sources.images import Augmentation, ImageDataset, ImageItem, choose_augmentation, forked_worker_init
from flywheel.training.policy import DepthDecision, Schedule, param_groups, set_frozen_eval, training_schedule

LABEL_SMOOTHING = 0.1
WARMUP_FRACTION = 0.1  # of each phase's optimizer steps; at least one step
HEAD_PHASE = DepthDecision(0, "head", "LP-FT head phase: body frozen")
HEAD_PHASE_LR_FACTOR = 0.1  # the head phase trains an LP-fitted head: at head_lr itself it fell apart
# (bench/finetune.py, head_lr 1e-2: validation 0.84 -> 0.07 at 10 labels/class, 0.84 -> 0.78 at 500)
VAL_CACHE_BYTES = 1 << 30  # keep the preprocessed validation set in memory below this size
BN_MOMENTUM = 0.1  # PyTorch's default; used for BatchNorm layers that adapt (depth "all")


@dataclass
class FinetuneResult:
    """The best-validation-epoch model (on CPU, eval mode) and what happened, for MLflow and the logs."""

    classifier: Classifier
    decision: DepthDecision
    history: list[dict[str, Any]]  # per epoch: epoch, phase ("head"|"body"), trainable_groups, train_loss,
    # val_accuracy, val_loss, seconds
    lr_by_group: dict[str, float]  # peak learning rate of each trained group ("head", "stage7", ...)
    seconds: float
    device: str
    best_epoch: int = 0  # 1-based; 0: no epoch beat the starting weights on validation, they are returned
    notes: list[str] = field(default_factory=list)
    augmentation: Augmentation | None = None
    stopped_early: bool = False
    resumed_from: int | None = None  # epochs already done when this call resumed a checkpoint


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _autocast(device: torch.device) -> AbstractContextManager[None]:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _check_targets(
    paths: Sequence[str], targets: npt.NDArray[np.integer[Any]], n_classes: int, what: str
) -> npt.NDArray[np.int64]:
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if len(targets) != len(paths):
        raise DataError(f"{what}: {len(paths)} paths but {len(targets)} targets")
    if len(targets) and (targets.min() < 0 or targets.max() >= n_classes):
        raise DataError(f"{what}: targets must lie in [0, {n_classes}), got [{targets.min()}, {targets.max()}]")
    return targets


def _num_workers(device: torch.device) -> int:
    """Decode in the main process on CPU (the cores are busy with the model); on CUDA in as many workers as
    the embedding pipeline uses (embed_pipeline.auto_workers: up to 8, a core left for the main process)."""
    return auto_workers(device) if device.type == "cuda" else 0


def _eval_batch_size(n: int, device: torch.device) -> int:
    """Up to 256 images a batch, but small enough that every loader worker gets one: a 256-image validation
    set in one batch was decoded by a single worker while the others idled."""
    return max(1, min(256, math.ceil(n / max(1, _num_workers(device)))))


def _warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over WARMUP_FRACTION of the steps, then cosine decay to zero."""
    warmup = max(1, math.ceil(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(
    classifier: Classifier,
    paths: Sequence[str],
    targets: npt.NDArray[np.int64] | None,
    batch_size: int,
    device: torch.device,
) -> DataLoader[ImageItem]:
    spec = get_spec(classifier.backbone)
    dataset = ImageDataset(paths, spec, classifier.image_size, targets)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=_num_workers(device),
        pin_memory=device.type == "cuda",
        worker_init_fn=forked_worker_init,
    )


@torch.inference_mode()
def _logits(
    model: Classifier,
    batches: Iterable[torch.Tensor | list[torch.Tensor]],
    device: torch.device,
    forward: Forward | None = None,
) -> torch.Tensor:
    """(N, C) float32 logits on CPU over an iterable of x or (x, y) batches; `forward`: model or its compiled form."""
    model.eval()
    forward = model if forward is None else forward
    out: list[torch.Tensor] = []
    with _autocast(device):
        for batch in batches:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            out.append(forward(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(model.classes))


def predict_proba(
    classifier: Classifier,
    paths: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "auto",
) -> npt.NDArray[np.float32]:
    """Class probabilities (N, C) float32, rows sum to 1, columns in classifier.classes order.

    Moves `classifier` to the device (channels_last) and leaves it in eval mode.
    """
    dev = _as_device(device)
    classifier.to(dev).to(memory_format=torch.channels_last)
    logits = _logits(classifier, _batches(classifier, paths, None, batch_size, dev), dev)
    return torch.softmax(logits, dim=1).numpy().astype(np.float32)


def evaluate(
    classifier: Classifier,
    paths: Sequence[str],
    targets: npt.NDArray[np.integer[Any]],
    *,
    batch_size: int = 256,
    device: torch.device | str = "auto",
) -> float:
    """Top-1 accuracy on the given images (NaN when there are none)."""
    targets = _check_targets(paths, targets, len(classifier.classes), "evaluate")
    if not len(targets):
        return float("nan")
    probs = predict_proba(classifier, paths, batch_size=batch_size, device=device)
    return float((probs.argmax(1) == targets).mean())


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _train_epoch(
    model: Classifier,
    loader: DataLoader[ImageItem],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    *,
    adapt_bn: bool,
    forward: Forward,
) -> float:
    """One pass over the training set; returns the mean training loss. `forward`: model or its compiled form."""
    model.train()
    set_frozen_eval(model.body)  # after .train(): frozen groups keep their BatchNorm statistics
    if not adapt_bn:
        for bn in _batchnorms(model.body):
            bn.eval()
    total, count = torch.zeros((), device=device), 0  # summed on the device: no host sync per step
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with _autocast(device):
            loss = loss_fn(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach() * len(y)
        count += len(y)
    return float(total) / max(1, count)


def unfrozen_count(body_epoch: int, body_epochs: int, n_groups: int, *, gradual: bool) -> int:
    """How many of the policy's body groups (from the top) train in body epoch `body_epoch` (0-based).

    Gradual unfreezing (ULMFiT-style, docs/transfer.md: head first, then the body) spreads the groups
    over the first half of the body phase, one or more per epoch, so the whole chosen depth trains for at
    least the second half: 4 body epochs, 4 groups -> 2, 4, 4, 4; 4 body epochs, 9 groups -> 5, 9, 9, 9.
    """
    if not gradual or n_groups == 0:
        return n_groups
    ramp = max(1, body_epochs // 2)
    return min(n_groups, math.ceil((body_epoch + 1) * n_groups / ramp))


def should_stop(history: Sequence[dict[str, Any]], patience: int) -> bool:
    """Early stopping: the last `patience` body epochs all failed to beat the best validation score so far.

    Scores are (accuracy, -loss), as for the best epoch. Head epochs count for the best score but never
    stop the run (LP-FT needs its body phase). patience 0 or no validation: never stops.
    """
    scored = [h for h in history if h.get("val_accuracy") is not None]
    if patience <= 0 or not scored or history[-1]["phase"] != "body":
        return False
    best = max(range(len(scored)), key=lambda i: (scored[i]["val_accuracy"], -scored[i]["val_loss"]))
    since = scored[best + 1 :]
    return len(since) >= patience and all(h["phase"] == "body" for h in since[-patience:])


LabelledImages = tuple[Sequence[str], npt.NDArray[np.integer[Any]]]
"""Image paths and their class indices, row for row."""


def run_key(
    classifier: Classifier,
    train: LabelledImages,
    val: LabelledImages,
    *,
    decision: DepthDecision,
    settings: FinetuneSettings,
    seed: int,
    augmentation: Augmentation,
) -> str:
    """A digest of everything that determines a fine-tune: a checkpoint only resumes the very same run."""
    digest = hashlib.sha256()
    sets = {"train": train, "val": val}
    config = {
        "backbone": classifier.backbone,
        "classes": classifier.classes,
        "image_size": classifier.image_size,
        "decision": [decision.trainable_groups, decision.label],
        "settings": settings.model_dump(mode="json", exclude={"resume", "backbones", "transferability"}),
        "seed": seed,
        "augmentation": [augmentation.hflip, augmentation.colour_jitter, list(augmentation.crop_scale)],
        **{name: [list(map(str, paths)), np.asarray(targets).tolist()] for name, (paths, targets) in sets.items()},
    }
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in classifier.state_dict().items():  # the starting weights (body version, LP head)
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file in the same folder, then os.replace, with a sha256 sidecar: a crash never
    leaves half a checkpoint, and a damaged one is refused on resume (`_load_checkpoint`)."""
    with atomic_path(path, checksum=True) as tmp:
        torch.save(obj, tmp)


def _cpu_copy(obj: object) -> Any:
    """obj with every tensor in it (nested dicts, lists, tuples) copied to the CPU: a snapshot training
    cannot change afterwards."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class _CheckpointWriter:
    """Writes epoch checkpoints on a background thread, so the next epoch trains while the last is saved.

    A ResNet-50 checkpoint with its AdamW state is about 300 MB plus its sha256; written in line it cost
    0.9 s an epoch on an H200 (ResNet-50, 4,096 images an epoch: 1,206 img/s against 1,651 without).
    `save` snapshots the state to the CPU first and waits for the previous write; `wait` returns once the
    last one is on disk and re-raises its error. As a context manager it waits on exit, also when the
    run fails, so an interrupted run leaves its last checkpoint whole. path None: saves nothing.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flywheel-checkpoint") if path else None
        self._pending: Future[None] | None = None

    def save(self, state: dict[str, Any]) -> None:
        if self._pool is None or self.path is None:
            return
        self.wait()
        self._pending = self._pool.submit(_save_atomic, _cpu_copy(state), self.path)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _CheckpointWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.wait()  # a failed write is this run's error; after a failed run, the run's own is reported
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # also lets a write in flight finish


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by _save_atomic (tensors and plain data only: weights_only=True); CorruptFileError
    naming it, and how to start over, when its checksum does not match."""
    try:
        verify_checksum(path)
    except CorruptFileError as exc:
        raise CorruptFileError(
            f"fine-tune checkpoint refused: {exc}; delete {path.parent} (or set finetune.resume=false, "
            "FLYWHEEL_FINETUNE__RESUME=false) to start this fine-tune over"
        ) from exc
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint


@dataclass(frozen=True)
class EpochEnd:
    """What `on_epoch_end` sees after each epoch (and after its checkpoint is on disk: with a callback
    the checkpoint write is waited for before the call)."""

    epoch: int  # 1-based, over both phases
    entry: dict[str, Any]
    model: Classifier
    optimizer: torch.optim.Optimizer
    checkpoint: Path | None


@dataclass(frozen=True)
class _Trainer:
    """The copy being tuned and the data every epoch feeds it: built once per run, under the run's seeded RNG."""

    model: Classifier
    forward: Forward  # model or its compiled form
    loader: DataLoader[ImageItem]  # the training images, shuffled by `generator`
    generator: torch.Generator  # the loader's own stream: checkpointed and restored with the run
    val_batches: Iterable[torch.Tensor | list[torch.Tensor]]  # in memory when small (VAL_CACHE_BYTES)
    val_y: torch.Tensor
    loss_fn: nn.Module
    device: torch.device

    def validate(self) -> tuple[float, float]:
        """(accuracy, loss) of the model as it is now on the validation images."""
        logits = _logits(self.model, self.val_batches, self.device, self.forward)
        accuracy = float((logits.argmax(1) == self.val_y).float().mean())
        return accuracy, float(nn.functional.cross_entropy(logits, self.val_y))


def _make_trainer(
    classifier: Classifier,
    settings: FinetuneSettings,
    *,
    spec: BackboneSpec,
    train_paths: Sequence[str],
    train_targets: npt.NDArray[np.int64],
    val_paths: Sequence[str],
    val_targets: npt.NDArray[np.int64],
    augmentation: Augmentation,
    seed: int,
    device: torch.device,
) -> _Trainer:
    """A copy of `classifier` on the device with its training loader and validation batches. Call it under the
    run's seeded RNG: every pass over a loader (caching the validation set is one) draws a seed from it."""
    model = copy.deepcopy(classifier).to(device).to(memory_format=torch.channels_last)
    # compiled once; freezing changes recompile it a few times (one per unfreeze step), weights are shared
    forward = torch.compile(model) if settings.compile else model
    generator = torch.Generator().manual_seed(seed)
    n_train = len(train_targets)
    loader = DataLoader(
        ImageDataset(train_paths, spec, classifier.image_size, train_targets, augment=augmentation),
        batch_size=settings.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=_num_workers(device),
        worker_init_fn=forked_worker_init,
        pin_memory=device.type == "cuda",
        # BatchNorm cannot train on a batch of one: drop such a trailing batch.
        drop_last=n_train % settings.batch_size == 1 and n_train > 1,
    )
    val_loader = _batches(model, val_paths, val_targets, _eval_batch_size(len(val_targets), device), device)
    val_batches: Iterable[torch.Tensor | list[torch.Tensor]] = val_loader
    if len(val_targets) * 3 * classifier.image_size**2 * 4 <= VAL_CACHE_BYTES:
        val_batches = [x for x, _ in val_loader]  # decode and resize the validation set once
    loss_fn = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    return _Trainer(model, forward, loader, generator, val_batches, torch.as_tensor(val_targets), loss_fn, device)


def _phase_plan(settings: FinetuneSettings, decision: DepthDecision) -> list[str]:
    """Each epoch's phase ("head" or "body"): LP-FT's head epochs first, then the body epochs."""
    head_epochs = min(settings.head_epochs, settings.epochs)
    if decision.trainable_groups == 0:
        head_epochs = settings.epochs  # the decision is "head only": every epoch is a head epoch
    return ["head"] * head_epochs + ["body"] * (settings.epochs - head_epochs)


@dataclass
class _RunState:
    """What a run carries from epoch to epoch. Its checkpoints hold all of it but the `resumed_*` fields and
    the notes (a resumed run starts its own)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[float, float] | None = None  # (val_accuracy, -val_loss) of the best weights so far
    best_state: dict[str, torch.Tensor] | None = None  # those weights, on the CPU
    best_epoch: int = 0
    lr_by_group: dict[str, float] = field(default_factory=dict)
    stopped: bool = False
    notes: list[str] = field(default_factory=list)
    resumed_from: int | None = None  # epochs done by the checkpoint this run resumed
    resumed_optimizer: dict[str, Any] | None = None  # that checkpoint's "optimizer" and "scheduler" states
    select_by_validation: bool = True  # False: validation is scored and logged, but the last epoch is kept


def _checkpoint(run: _RunState, trainer: _Trainer, *, phase: _Phase, epoch: int) -> dict[str, Any]:
    """Everything a resume needs after `epoch` epochs (`_restore` reads it back): the weights, the optimizer
    and its schedule, the random number streams, and the run's state."""
    return {
        "epoch": epoch,
        "model": trainer.model.state_dict(),
        "optimizer": phase.optimizer.state_dict(),
        "scheduler": phase.scheduler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_loader": trainer.generator.get_state(),
        "rng_cuda": torch.cuda.get_rng_state(trainer.device) if trainer.device.type == "cuda" else None,
        "history": run.history,
        "best": list(run.best) if run.best is not None else None,
        "best_state": run.best_state,
        "best_epoch": run.best_epoch,
        "lr_by_group": run.lr_by_group,
        "stopped": run.stopped,
    }


def _restore(run: _RunState, saved: dict[str, Any], *, trainer: _Trainer) -> None:
    """Put the model, the run's state and the random number streams back where a `_checkpoint` left them."""
    trainer.model.load_state_dict(saved["model"])
    run.history, run.best_epoch, run.lr_by_group = saved["history"], saved["best_epoch"], saved["lr_by_group"]
    run.best = tuple(saved["best"]) if saved["best"] is not None else None
    run.best_state, run.stopped, run.resumed_from = saved["best_state"], saved["stopped"], saved["epoch"]
    run.resumed_optimizer = {"optimizer": saved["optimizer"], "scheduler": saved["scheduler"]}
    torch.set_rng_state(saved["rng_torch"])
    trainer.generator.set_state(saved["rng_loader"])
    if trainer.device.type == "cuda" and saved.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(saved["rng_cuda"], trainer.device)


def _start_run(
    trainer: _Trainer,
    plan: Sequence[str],
    *,
    decision: DepthDecision,
    checkpoint: Path | None,
    resume: bool,
    schedule: Schedule,
) -> _RunState:
    """The run's state before its first epoch: restored from `checkpoint` when resuming one, else fresh."""
    run = _RunState(select_by_validation=schedule.select_by_validation, notes=[schedule.reason])
    if decision.trainable_groups != 0 and "head" not in plan:
        run.notes.append("head_epochs=0: body unfrozen with a random head (no LP-FT warm start)")
    if checkpoint is not None and resume and checkpoint.exists():
        _restore(run, _load_checkpoint(checkpoint), trainer=trainer)
        run.notes.append(f"resumed from {checkpoint} after epoch {run.resumed_from}")
    if not run.resumed_from and len(trainer.val_y) and run.select_by_validation:
        # The starting weights (the champion's body, the LP head) are a candidate too: a fine-tune whose
        # every epoch scores worse on validation returns what it was given (best_epoch 0).
        start_accuracy, start_loss = trainer.validate()
        run.best, run.best_state = (start_accuracy, -start_loss), _cpu_copy(trainer.model.state_dict())
    return run


@dataclass(frozen=True)
class _Phase:
    """A phase's optimizer: AdamW over its parameter groups, under a fresh warmup + cosine schedule."""

    name: str  # "head" | "body"
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    body_groups: list[dict[str, Any]]  # the body groups it trains, from the output end inwards
    lr_by_group: dict[str, float]  # each group's peak learning rate
    adapt_bn: bool  # BatchNorm statistics train too


def _start_phase(
    model: Classifier,
    name: str,
    *,
    decision: DepthDecision,
    settings: FinetuneSettings,
    total_steps: int,
    resume: dict[str, Any] | None,
) -> _Phase:
    """The phase's parameter groups with their per-stage learning rates (the head phase: the head alone, at
    HEAD_PHASE_LR_FACTOR of head_lr) and its optimizer. `resume`: the states of a checkpoint taken mid-phase,
    from which the optimizer and its schedule go on."""
    head_phase = name == "head"
    groups = param_groups(
        model,
        HEAD_PHASE if head_phase else decision,
        settings.head_lr * (HEAD_PHASE_LR_FACTOR if head_phase else 1.0),
        settings.weight_decay,
    )
    lr_by_group = {g["name"]: g["lr"] for g in groups}  # before the schedule scales them
    adapt_bn = name == "body" and decision.label == "all" and settings.adapt_batchnorm
    if adapt_bn:
        for bn in _batchnorms(model.body):
            bn.momentum = max(bn.momentum or 0.0, BN_MOMENTUM)
    optimizer = torch.optim.AdamW(groups)
    scheduler = _warmup_cosine(optimizer, total_steps)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    return _Phase(name, optimizer, scheduler, groups[1:], lr_by_group, adapt_bn)


def _unfreeze(body_groups: Sequence[dict[str, Any]], n: int) -> None:
    """Gradual unfreezing: the first `n` body groups (from the output end inwards) train, the rest stay frozen."""
    for i, group in enumerate(body_groups):
        for p in group["params"]:
            p.requires_grad_(i < n)


def _epoch(trainer: _Trainer, phase: _Phase, *, run: _RunState, epoch: int, trainable_groups: int) -> dict[str, Any]:
    """Train one epoch and score it on validation, keeping its weights when they are the best so far (accuracy
    first, ties to the lower loss); returns its history entry."""
    t0 = time.perf_counter()
    train_loss = _train_epoch(
        trainer.model, trainer.loader, phase.optimizer, phase.scheduler, trainer.loss_fn, trainer.device,
        adapt_bn=phase.adapt_bn, forward=trainer.forward,
    )  # fmt: skip
    entry: dict[str, Any] = {
        "epoch": epoch,
        "phase": phase.name,
        "trainable_groups": trainable_groups,
        "train_loss": train_loss,
        "val_accuracy": None,
        "val_loss": None,
    }
    if len(trainer.val_y):
        entry["val_accuracy"], entry["val_loss"] = trainer.validate()
        score = (entry["val_accuracy"], -entry["val_loss"])
        if run.select_by_validation and (run.best is None or score > run.best):
            run.best, run.best_epoch = score, epoch
            run.best_state = _cpu_copy(trainer.model.state_dict())
    entry["seconds"] = time.perf_counter() - t0
    return entry


def _record(run: _RunState, entry: dict[str, Any], *, patience: int) -> None:
    """Add the epoch to the history, and stop early when it is the `patience`-th body epoch without a better score."""
    run.history.append(entry)
    run.stopped = should_stop(run.history, patience)
    if run.stopped:
        run.notes.append(f"early stop after epoch {entry['epoch']}: no better validation score for {patience} epochs")


@contextmanager
def _epoch_bar(show: bool, *, total: int, completed: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A transient progress bar over the epochs (rich is imported only to show one); yields the update to call
    with each epoch's history entry, which does nothing when the bar is not shown."""
    if not show:
        yield lambda entry: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("fine-tune", total=total, completed=completed)

        def update(entry: dict[str, Any]) -> None:
            acc = entry["val_accuracy"]
            bar.update(
                task,
                advance=1,
                description=f"fine-tune {entry['phase']} "
                f"loss {entry['train_loss']:.3f}" + (f" val {acc:.3f}" if acc is not None else ""),
            )

        yield update


def _run_epochs(
    trainer: _Trainer,
    run: _RunState,
    *,
    plan: Sequence[str],
    decision: DepthDecision,
    settings: FinetuneSettings,
    checkpoint: Path | None,
    progress: bool,
    on_epoch_end: Callable[[EpochEnd], None] | None,
) -> None:
    """The planned epochs left after `run.resumed_from`, up to an early stop: a new optimizer at each phase, the
    body groups unfrozen on schedule, a checkpoint after every epoch but the last, then `on_epoch_end`."""
    start = run.resumed_from or 0
    phase: _Phase | None = None
    with _epoch_bar(progress, total=settings.epochs, completed=start) as show, _CheckpointWriter(checkpoint) as writer:
        for e in range(start, len(plan)):
            if run.stopped:
                break
            if phase is None or plan[e] != phase.name:
                mid_phase = e == start and e > 0 and plan[e - 1] == plan[e]  # the resumed phase goes on
                phase = _start_phase(
                    trainer.model, plan[e], decision=decision, settings=settings,
                    total_steps=plan.count(plan[e]) * len(trainer.loader),
                    resume=run.resumed_optimizer if mid_phase else None,
                )  # fmt: skip
                run.lr_by_group.update(phase.lr_by_group)
            n_trainable = 0
            if phase.name == "body":
                body_epoch, body_epochs = e - plan.count("head"), plan.count("body")
                n_trainable = unfrozen_count(
                    body_epoch, body_epochs, len(phase.body_groups), gradual=settings.gradual_unfreeze
                )
                _unfreeze(phase.body_groups, n_trainable)
            entry = _epoch(trainer, phase, run=run, epoch=e + 1, trainable_groups=n_trainable)
            _record(run, entry, patience=settings.patience if run.select_by_validation else 0)
            if checkpoint is not None and not run.stopped and e + 1 < len(plan):  # after the last epoch the run ends
                writer.save(_checkpoint(run, trainer, phase=phase, epoch=e + 1))
            if on_epoch_end is not None:
                writer.wait()
                on_epoch_end(EpochEnd(e + 1, entry, trainer.model, phase.optimizer, checkpoint))
            show(entry)


def _finish(
    run: _RunState,
    trainer: _Trainer,
    *,
    decision: DepthDecision,
    augmentation: Augmentation,
    checkpoint: Path | None,
    started: float,
) -> FinetuneResult:
    """The result: the best epoch's weights (the starting ones when no epoch beat them, the last epoch's without
    validation) on the CPU in eval mode. A completed run's checkpoint is removed."""
    if run.best_state is None:
        if not len(trainer.val_y):
            run.notes.append("no validation images: returning the last epoch's weights")
        run.best_epoch = len(run.history)
    elif run.best_epoch == 0:
        assert run.best is not None  # set with best_state
        run.notes.append(
            f"no epoch beat the starting weights on validation (accuracy {run.best[0]:.3f}): returning them unchanged"
        )
    model = trainer.model.to("cpu").to(memory_format=torch.contiguous_format)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    if checkpoint is not None:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)  # complete: the model goes to MLflow, not here
    return FinetuneResult(
        classifier=model,
        decision=decision,
        history=run.history,
        lr_by_group=run.lr_by_group,
        seconds=time.perf_counter() - started,
        device=str(trainer.device),
        best_epoch=run.best_epoch,
        notes=run.notes,
        augmentation=augmentation,
        stopped_early=any(n.startswith("early stop") for n in run.notes),
        resumed_from=run.resumed_from,
    )


def finetune(
    classifier: Classifier,
    train_paths: Sequence[str],
    train_targets: npt.NDArray[np.integer[Any]],
    val_paths: Sequence[str],
    val_targets: npt.NDArray[np.integer[Any]],
    *,
    decision: DepthDecision,
    settings: FinetuneSettings,
    seed: int,
    progress: bool = True,
    augmentation: Augmentation | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
) -> FinetuneResult:
    """LP-FT fine-tune of a copy of `classifier`; the input is left untouched (it stays the champion).

    targets: (N,) int in [0, C), indices into classifier.classes. With no validation images the last
    epoch's weights are returned (and a note says so).

    Checkpoints: with `checkpoint_dir`, everything a resume needs is written atomically after every epoch but
    the last, in the background (_CheckpointWriter), to checkpoint_dir/<run_key>/last.pt; `resume=True`
    continues from there (on CPU to bit-identical weights); a completed run removes the file.
    `augmentation` defaults to `images.choose_augmentation` on the training images.
    """
    started = time.perf_counter()
    n_classes = len(classifier.classes)
    train_targets = _check_targets(train_paths, train_targets, n_classes, "train")
    val_targets = _check_targets(val_paths, val_targets, n_classes, "validation")
    if not len(train_targets):
        raise DataError("fine-tune needs at least one training image, got 0")
    schedule = training_schedule(
        len(train_targets), len(val_targets), settings, trains_body=bool(decision.trainable_groups)
    )
    settings = settings.model_copy(update={"epochs": schedule.epochs, "head_epochs": schedule.head_epochs})
    device = resolve_device(settings.device)
    spec = get_spec(classifier.backbone)
    if augmentation is None:
        augmentation = choose_augmentation(train_paths, hflip=settings.hflip)
    ckpt: Path | None = None
    if checkpoint_dir is not None:
        key = run_key(
            classifier, (train_paths, train_targets), (val_paths, val_targets),
            decision=decision, settings=settings, seed=seed, augmentation=augmentation,
        )  # fmt: skip
        ckpt = Path(checkpoint_dir) / key / "last.pt"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        trainer = _make_trainer(
            classifier, settings, spec=spec, train_paths=train_paths, train_targets=train_targets,
            val_paths=val_paths, val_targets=val_targets, augmentation=augmentation, seed=seed, device=device,
        )  # fmt: skip
        plan = _phase_plan(settings, decision)
        run = _start_run(trainer, plan, decision=decision, checkpoint=ckpt, resume=resume, schedule=schedule)
        _run_epochs(
            trainer, run, plan=plan, decision=decision, settings=settings,
            checkpoint=ckpt, progress=progress, on_epoch_end=on_epoch_end,
        )  # fmt: skip
    return _finish(run, trainer, decision=decision, augmentation=augmentation, checkpoint=ckpt, started=started)
