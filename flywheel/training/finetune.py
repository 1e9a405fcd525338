"""Fine-tuning a Classifier end to end, the way TRANSFER.md prescribes (LP-FT).

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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader

from flywheel.atomic import atomic_path, verify_checksum
from flywheel.config import FinetuneSettings
from flywheel.errors import CorruptFileError, DataError
from flywheel.features.backbones import Classifier, get_spec
from flywheel.features.pipeline import Forward, auto_workers
from flywheel.features.store import resolve_device
from flywheel.sources.images import Augmentation, ImageDataset, ImageItem, choose_augmentation, forked_worker_init
from flywheel.training.policy import DepthDecision, param_groups, set_frozen_eval

if TYPE_CHECKING:
    from rich.progress import Progress

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

    Gradual unfreezing (ULMFiT-style, TRANSFER.md's "fine-tuning continues transfer") spreads the groups
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


def run_key(
    classifier: Classifier,
    train_paths: Sequence[str],
    train_targets: npt.NDArray[np.integer[Any]],
    val_paths: Sequence[str],
    val_targets: npt.NDArray[np.integer[Any]],
    *,
    decision: DepthDecision,
    settings: FinetuneSettings,
    seed: int,
    augmentation: Augmentation,
) -> str:
    """A digest of everything that determines a fine-tune: a checkpoint only resumes the very same run."""
    digest = hashlib.sha256()
    config = {
        "backbone": classifier.backbone,
        "classes": classifier.classes,
        "image_size": classifier.image_size,
        "decision": [decision.trainable_groups, decision.label],
        "settings": settings.model_dump(mode="json", exclude={"resume", "backbones", "transferability"}),
        "seed": seed,
        "augmentation": [augmentation.hflip, augmentation.colour_jitter, list(augmentation.crop_scale)],
        "train": [list(map(str, train_paths)), np.asarray(train_targets).tolist()],
        "val": [list(map(str, val_paths)), np.asarray(val_targets).tolist()],
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
        ) from None
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

    Checkpoints: with `checkpoint_dir`, the model, optimizer, scheduler, RNG states, history and best-so-far
    are written atomically after every epoch but the last (or an early stop), in the background while the
    next epoch trains (_CheckpointWriter), to checkpoint_dir/<run_key>/last.pt; `resume=True` continues
    from there (on CPU to bit-identical final weights) and the file is removed once the run completes.
    `augmentation` defaults to `images.choose_augmentation` on the training images.
    """
    started = time.perf_counter()
    n_classes = len(classifier.classes)
    train_targets = _check_targets(train_paths, train_targets, n_classes, "train")
    val_targets = _check_targets(val_paths, val_targets, n_classes, "validation")
    if not len(train_targets):
        raise DataError("fine-tune needs at least one training image, got 0")
    device = resolve_device(settings.device)
    spec = get_spec(classifier.backbone)
    cuda = device.type == "cuda"
    notes: list[str] = []
    if augmentation is None:
        augmentation = choose_augmentation(train_paths, hflip=settings.hflip)
    ckpt: Path | None = None
    if checkpoint_dir is not None:
        key = run_key(
            classifier, train_paths, train_targets, val_paths, val_targets,
            decision=decision, settings=settings, seed=seed, augmentation=augmentation,
        )  # fmt: skip
        ckpt = Path(checkpoint_dir) / key / "last.pt"

    with torch.random.fork_rng(devices=[device] if cuda else []):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = copy.deepcopy(classifier).to(device).to(memory_format=torch.channels_last)
        # compiled once; freezing changes recompile it a few times (one per unfreeze step), weights are shared
        forward = torch.compile(model) if settings.compile else model
        gen = torch.Generator().manual_seed(seed)
        n_train = len(train_targets)
        loader = DataLoader(
            ImageDataset(train_paths, spec, classifier.image_size, train_targets, augment=augmentation),
            batch_size=settings.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=_num_workers(device),
            worker_init_fn=forked_worker_init,
            pin_memory=cuda,
            # BatchNorm cannot train on a batch of one: drop such a trailing batch.
            drop_last=n_train % settings.batch_size == 1 and n_train > 1,
        )
        val_loader = _batches(model, val_paths, val_targets, _eval_batch_size(len(val_targets), device), device)
        val_cache: list[torch.Tensor] | None = None
        if len(val_targets) * 3 * classifier.image_size**2 * 4 <= VAL_CACHE_BYTES:
            val_cache = [x for x, _ in val_loader]  # decode and resize the validation set once
        val_y = torch.as_tensor(val_targets)

        def validate() -> tuple[float, float]:
            """(accuracy, loss) of the model as it is now on the validation images."""
            logits = _logits(model, val_cache if val_cache is not None else val_loader, device, forward)
            return float((logits.argmax(1) == val_y).float().mean()), float(nn.functional.cross_entropy(logits, val_y))

        loss_fn = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        steps = len(loader)

        head_epochs = min(settings.head_epochs, settings.epochs)
        if decision.trainable_groups == 0:
            head_epochs = settings.epochs  # the decision is "head only": every epoch is a head epoch
        elif head_epochs == 0:
            notes.append("head_epochs=0: body unfrozen with a random head (no LP-FT warm start)")
        body_epochs = settings.epochs - head_epochs
        plan = ["head"] * head_epochs + ["body"] * body_epochs

        history: list[dict[str, Any]] = []
        best: tuple[float, float] | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch = 0
        lr_by_group: dict[str, float] = {}
        stopped = False
        start = 0
        saved: dict[str, Any] | None = None
        if ckpt is not None and resume and ckpt.exists():
            saved = _load_checkpoint(ckpt)
            model.load_state_dict(saved["model"])
            history, best_epoch, lr_by_group = saved["history"], saved["best_epoch"], saved["lr_by_group"]
            best = tuple(saved["best"]) if saved["best"] is not None else None
            best_state, stopped, start = saved["best_state"], saved["stopped"], saved["epoch"]
            torch.set_rng_state(saved["rng_torch"])
            gen.set_state(saved["rng_loader"])
            if cuda and saved.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(saved["rng_cuda"], device)
            notes.append(f"resumed from {ckpt} after epoch {start}")

        if start == 0 and len(val_targets):
            # The starting weights (the champion's body, the LP head) are a candidate too: a fine-tune whose
            # every epoch scores worse on validation returns what it was given (best_epoch 0).
            start_accuracy, start_loss = validate()
            best = (start_accuracy, -start_loss)
            best_state = _cpu_copy(model.state_dict())

        bar_ctx: AbstractContextManager[Progress | None] = nullcontext(None)
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar_ctx = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
        with bar_ctx as bar, _CheckpointWriter(ckpt) as writer:
            task = bar.add_task("fine-tune", total=settings.epochs, completed=start) if bar else None
            phase_now: str | None = None
            optimizer = scheduler = None
            body_groups: list[dict[str, Any]] = []
            adapt_bn = False
            for e in range(start, len(plan)):
                if stopped:
                    break
                phase = plan[e]
                if phase != phase_now:
                    phase_now = phase
                    head_phase = phase == "head"
                    groups = param_groups(
                        model,
                        HEAD_PHASE if head_phase else decision,
                        settings.head_lr * (HEAD_PHASE_LR_FACTOR if head_phase else 1.0),
                        settings.weight_decay,
                    )
                    body_groups = groups[1:]  # from the output end inwards
                    lr_by_group.update({g["name"]: g["lr"] for g in groups})
                    adapt_bn = phase == "body" and decision.label == "all" and settings.adapt_batchnorm
                    if adapt_bn:
                        for bn in _batchnorms(model.body):
                            bn.momentum = max(bn.momentum or 0.0, BN_MOMENTUM)
                    optimizer = torch.optim.AdamW(groups)
                    scheduler = _warmup_cosine(optimizer, plan.count(phase) * steps)
                    if saved is not None and e == start and e > 0 and plan[e - 1] == phase:
                        optimizer.load_state_dict(saved["optimizer"])
                        scheduler.load_state_dict(saved["scheduler"])
                n_trainable = 0
                if phase == "body":
                    body_epoch = e - head_epochs
                    n_trainable = unfrozen_count(
                        body_epoch, body_epochs, len(body_groups), gradual=settings.gradual_unfreeze
                    )
                    for i, group in enumerate(body_groups):
                        for p in group["params"]:
                            p.requires_grad_(i < n_trainable)
                assert optimizer is not None and scheduler is not None  # made when the first epoch's phase starts
                t0 = time.perf_counter()
                train_loss = _train_epoch(
                    model, loader, optimizer, scheduler, loss_fn, device, adapt_bn=adapt_bn, forward=forward
                )
                entry: dict[str, Any] = {
                    "epoch": e + 1,
                    "phase": phase,
                    "trainable_groups": n_trainable,
                    "train_loss": train_loss,
                    "val_accuracy": None,
                    "val_loss": None,
                }
                if len(val_targets):
                    entry["val_accuracy"], entry["val_loss"] = validate()
                    score = (entry["val_accuracy"], -entry["val_loss"])
                    if best is None or score > best:  # accuracy first; ties go to the lower loss
                        best, best_epoch = score, entry["epoch"]
                        best_state = _cpu_copy(model.state_dict())
                entry["seconds"] = time.perf_counter() - t0
                history.append(entry)
                stopped = should_stop(history, settings.patience)
                if stopped:
                    notes.append(
                        f"early stop after epoch {e + 1}: no better validation score for {settings.patience} epochs"
                    )
                if ckpt is not None and not stopped and e + 1 < len(plan):  # after the last epoch the run ends
                    writer.save(
                        {
                            "epoch": e + 1,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "rng_torch": torch.get_rng_state(),
                            "rng_loader": gen.get_state(),
                            "rng_cuda": torch.cuda.get_rng_state(device) if cuda else None,
                            "history": history,
                            "best": list(best) if best is not None else None,
                            "best_state": best_state,
                            "best_epoch": best_epoch,
                            "lr_by_group": lr_by_group,
                            "stopped": stopped,
                        }
                    )
                if on_epoch_end is not None:
                    writer.wait()
                    on_epoch_end(EpochEnd(e + 1, entry, model, optimizer, ckpt))
                if bar is not None and task is not None:
                    acc = entry["val_accuracy"]
                    bar.update(
                        task,
                        advance=1,
                        description=f"fine-tune {phase} "
                        f"loss {train_loss:.3f}" + (f" val {acc:.3f}" if acc is not None else ""),
                    )

    if best_state is None:
        notes.append("no validation images: returning the last epoch's weights")
        best_epoch = len(history)
    elif best_epoch == 0:
        assert best is not None  # set with best_state
        notes.append(
            f"no epoch beat the starting weights on validation (accuracy {best[0]:.3f}): returning them unchanged"
        )
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    if best_state is not None:
        model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    if ckpt is not None:
        shutil.rmtree(ckpt.parent, ignore_errors=True)  # complete: the model goes to MLflow, not here
    return FinetuneResult(
        classifier=model,
        decision=decision,
        history=history,
        lr_by_group=lr_by_group,
        seconds=time.perf_counter() - started,
        device=str(device),
        best_epoch=best_epoch,
        notes=notes,
        augmentation=augmentation,
        stopped_early=any(n.startswith("early stop") for n in notes),
        resumed_from=start if saved is not None else None,
    )
