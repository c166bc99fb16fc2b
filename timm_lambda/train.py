""" The trainer shared by `dilute` and `finetune`: one process, or many under torchrun (DDP).

timm's machinery throughout: `create_transform` augmentation (RandAugment, random erasing), `Mixup` /
CutMix, repeated augmentation, `create_optimizer_v2`, `create_scheduler_v2` (stepped per update or per epoch,
with warm-up and cool-down), `ModelEmaV3`, gradient clipping, stochastic depth, bf16 autocast or fp16
autocast with timm's `NativeScaler`. Knowledge distillation from a frozen teacher (soft-target KL with
temperature).

Nothing is lost: `last.pth` is written atomically every epoch and every `checkpoint_every` steps, and a
resumed run continues exactly (weights, optimizer, scheduler, loss scaler, EMA, lam, every rank's RNG
states, the data order and the position within the epoch). A non-finite loss stops the run before anything
is written.

`train(model, train_dataset, val_dataset, config)` is the Python entry point; the CLI wraps it.
"""
import copy
import logging
import math
import os
import random
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from timm.data import Mixup
from timm.layers import DropPath, calculate_drop_path_rates
from timm.models.vision_transformer import VisionTransformer
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, random_seed
from timm.utils.distributed import init_distributed_device_so, is_distributed_env

from .atomic import torch_save, write_json
from .checkpoint import load_torch_file
from .data import (
    TransformDataset, create_eval_loader, create_train_loader, eval_transform, resolve_data_config,
    seeded_subset, train_transform,
)
from .dilution import TARGETS, LAM_SCHEDULES, LamSchedule, diluted_blocks, dilute_model, fold_model, set_lam
from .evaluate import autocast, evaluate_top1
from .hub import save_model_dir
from .models import validate_layers

__all__ = [
    'TrainConfig', 'TrainResult', 'Trainer', 'NonFiniteLossError', 'kd_loss', 'set_drop_path', 'train',
    'check_run_output', 'CHECKPOINT_NAME', 'SCHEDULERS', 'AMP_DTYPES', 'DROP_PATH_RULES',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = 'last.pth'
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly')  # all a function of the update (or epoch) count
_CYCLIC_SCHEDULERS = ('cosine', 'tanh', 'poly')  # those that end at min_lr, for a cool-down to hold
AMP_DTYPES = ('bfloat16', 'float16')
# per-block stochastic depth: timm's linear ramp 0 -> rate, the rate in every block, or the authors' rule
DROP_PATH_RULES = ('linear', 'uniform', 'paper')
PAPER_UNIFORM_WIDTH = 768  # the authors' rule: uniform from DeiT-Base's width up, linear for Small / Tiny
# config fields that must match for a resumed run to continue the same trajectory
_RESUME_KEYS = ('epochs', 'cooldown_epochs', 'batch_size', 'layers', 'target', 'lam_schedule', 'lam_on_updates',
                'dilution_frac', 'train_samples', 'aug_repeats', 'seed', 'kd', 'model_ema', 'opt', 'sched',
                'sched_on_updates')


@dataclass
class TrainConfig:
    """Everything the trainer needs besides the model and the data; names follow timm's train.py flags.

    `recipe` names the preset the settings started from (`timm_lambda.recipes`); it is recorded in
    metrics.json, the trainer reads only the fields themselves.
    """
    output: str
    recipe: str = 'default'
    epochs: int = 10  # the length of the lr and lam schedules; cool-down epochs follow
    batch_size: int = 64  # per process
    # dilution (no layers: plain training / fine-tuning)
    layers: Tuple[int, ...] = ()
    target: str = 'identity'
    lam_schedule: str = 'linear'
    lam_on_updates: bool = True  # lam per optimizer update; False: per epoch, the authors' way
    dilution_frac: float = 0.75
    # knowledge distillation from the frozen teacher (default: the model as it was before training)
    kd: bool = True
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    # optimizer and learning-rate schedule
    opt: str = 'adamw'
    lr: Optional[float] = None  # default: lr_base * global batch / lr_base_size
    lr_base: float = 5e-4
    lr_base_size: int = 512
    momentum: float = 0.9
    weight_decay: float = 0.05
    sched: str = 'cosine'
    sched_on_updates: bool = True  # step the lr schedule per update; False: per epoch (timm's default)
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    cooldown_epochs: int = 0  # epochs at min_lr after the schedule (timm's meaning: trained on top of `epochs`)
    smoothing: float = 0.1
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    # augmentation (DeiT's recipe by default)
    no_aug: bool = False
    scale: Optional[Tuple[float, float]] = None
    hflip: float = 0.5
    color_jitter: float = 0.3
    aa: Optional[str] = 'rand-m9-mstd0.5-inc1'
    reprob: float = 0.25
    remode: str = 'pixel'
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    crop_pct: Optional[float] = None
    aug_repeats: int = 0  # repeated augmentation: each sample this many times per epoch (0, 1: off)
    # stochastic depth (None: the model's own), spread over the blocks by `drop_path_rule`
    drop_path: Optional[float] = None
    drop_path_rule: str = 'linear'
    # EMA of the weights (evaluated and exported alongside, to OUTPUT/ema)
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # run
    amp: bool = False  # autocast to `amp_dtype`; float16 adds a loss scaler
    amp_dtype: str = 'bfloat16'
    seed: int = 42
    train_samples: Optional[int] = None
    val_samples: Optional[int] = None
    workers: int = 2
    device: str = field(default_factory=lambda: 'cuda' if torch.cuda.is_available() else 'cpu')
    checkpoint_every: int = 0  # steps; 0: every epoch only
    resume: Optional[str] = None  # a checkpoint file, or an output folder holding one
    overwrite: bool = False  # start a new run in a folder that holds another run's checkpoint
    log_interval: int = 50
    progress: bool = True

    def validate(self) -> None:
        """Raise a clear ValueError for settings that cannot work."""
        checks = [
            (self.epochs >= 1, f'--epochs must be at least 1, got {self.epochs}.'),
            (self.batch_size >= 1, f'--batch-size must be positive, got {self.batch_size}.'),
            (self.target in TARGETS, f'--target must be one of {", ".join(TARGETS)}, got {self.target!r}.'),
            (self.lam_schedule in LAM_SCHEDULES,
             f'--lam-schedule must be one of {", ".join(LAM_SCHEDULES)}, got {self.lam_schedule!r}.'),
            (0. <= self.dilution_frac <= 1., f'--dilution-frac must be in [0, 1], got {self.dilution_frac}.'),
            (not self.layers or self.lam_on_updates or self.dilution_frac * self.epochs <= self.num_epochs - 1,
             f'With lam per epoch (--no-lam-on-updates), lam must reach 0 by the last epoch for the fold: '
             f'--dilution-frac x --epochs = {self.dilution_frac * self.epochs:g} must not exceed '
             f'{self.num_epochs - 1}: train more epochs or lower --dilution-frac.'),
            (0. <= self.kd_weight <= 1., f'--kd-weight must be in [0, 1], got {self.kd_weight}.'),
            (self.kd_temperature > 0., f'--kd-temperature must be positive, got {self.kd_temperature}.'),
            (self.lr is None or self.lr > 0., f'--lr must be positive, got {self.lr}.'),
            (self.sched in SCHEDULERS, f'--sched must be one of {", ".join(SCHEDULERS)}, got {self.sched!r}.'),
            (self.warmup_epochs >= 0, f'--warmup-epochs must not be negative, got {self.warmup_epochs}.'),
            (self.cooldown_epochs >= 0, f'--cooldown-epochs must not be negative, got {self.cooldown_epochs}.'),
            (not self.cooldown_epochs or self.sched in _CYCLIC_SCHEDULERS,
             f'--cooldown-epochs holds the min lr after a {"/".join(_CYCLIC_SCHEDULERS)} schedule; '
             f'--sched {self.sched} has no end to hold.'),
            (0. <= self.smoothing < 1., f'--smoothing must be in [0, 1), got {self.smoothing}.'),
            (0. <= self.reprob <= 1., f'--reprob must be in [0, 1], got {self.reprob}.'),
            (self.mixup >= 0. and self.cutmix >= 0., '--mixup and --cutmix must not be negative.'),
            (not self.mixup_active or self.mixup_mode != 'batch' or self.batch_size % 2 == 0,
             f'Mixup / CutMix need an even --batch-size, got {self.batch_size}.'),
            (self.clip_grad is None or self.clip_grad > 0., f'--clip-grad must be positive, got {self.clip_grad}.'),
            (self.aug_repeats >= 0, f'--aug-repeats must not be negative, got {self.aug_repeats}.'),
            (self.drop_path is None or 0. <= self.drop_path < 1.,
             f'--drop-path must be in [0, 1), got {self.drop_path}.'),
            (self.drop_path_rule in DROP_PATH_RULES,
             f'--drop-path-rule must be one of {", ".join(DROP_PATH_RULES)}, got {self.drop_path_rule!r}.'),
            (self.drop_path is not None or self.drop_path_rule == 'linear', '--drop-path-rule needs a --drop-path.'),
            (self.amp_dtype in AMP_DTYPES,
             f'--amp-dtype must be one of {", ".join(AMP_DTYPES)}, got {self.amp_dtype!r}.'),
            (self.checkpoint_every >= 0, f'--checkpoint-every must not be negative, got {self.checkpoint_every}.'),
            (self.log_interval >= 1, f'--log-interval must be at least 1, got {self.log_interval}.'),
            (self.workers >= 0, f'--workers must not be negative, got {self.workers}.'),
            (self.train_samples is None or self.train_samples > 0, '--train-samples must be positive.'),
            (self.val_samples is None or self.val_samples > 0, '--val-samples must be positive.'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0. or self.cutmix > 0.

    @property
    def num_epochs(self) -> int:
        """Epochs trained: the schedule's, then the cool-down."""
        return self.epochs + self.cooldown_epochs


_FIELD_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


@dataclass
class TrainResult:
    model: nn.Module  # the trained model; the lambda architecture when layers were diluted
    metrics: List[Dict[str, Any]]
    output: Path
    model_ema: Optional[nn.Module] = None


class NonFiniteLossError(RuntimeError):
    pass


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft-target distillation: KL(teacher || student) of the temperature-softened outputs, times T^2."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
        reduction='batchmean', log_target=True) * (t * t)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
    }


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(state['python'])
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'], device)


def set_drop_path(model: nn.Module, rate: float, rule: str = 'linear') -> List[float]:
    """Set the stochastic depth of every block of a timm ViT (lambda ViTs too); returns the per-block rates.

    `rule`: `linear`, timm's ramp from 0 in the first block to `rate` in the last (what `drop_path_rate`
    gives at creation); `uniform`, `rate` in every block; `paper`, the authors' rule: uniform for
    DeiT-Base's width (embed_dim 768) and wider, linear below (Small, Tiny).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f'--drop-path sets the rates of the blocks of a timm VisionTransformer, not of a '
                        f'{type(model).__name__}: give it drop_path_rate through --model-kwargs instead.')
    if rule not in DROP_PATH_RULES:
        raise ValueError(f'Unknown drop path rule {rule!r}; choose from {", ".join(DROP_PATH_RULES)}.')
    if rule == 'paper':
        rule = 'uniform' if model.embed_dim >= PAPER_UNIFORM_WIDTH else 'linear'
    depth = len(model.blocks)
    rates = calculate_drop_path_rates(rate, depth) if rule == 'linear' else [float(rate)] * depth
    for block, block_rate in zip(model.blocks, rates):
        for name in ('drop_path1', 'drop_path2'):
            if hasattr(block, name):  # MLP-only blocks have the second only
                setattr(block, name, DropPath(block_rate) if block_rate > 0. else nn.Identity())
    return rates


class Trainer:
    """Optimizer, schedules, losses, EMA and checkpoints around one model (DDP-wrapped when distributed).

    Args:
        model: A timm model; the blocks in `config.layers` are diluted in place.
        config: The training settings.
        steps_per_epoch: Optimizer steps per epoch (per process).
        teacher: A frozen model to distill from (used when `config.kd`).
        device: Where to train.
        rank, world_size: This process in the process group (1 process: 0, 1).
    """

    def __init__(
            self,
            model: nn.Module,
            config: TrainConfig,
            steps_per_epoch: int,
            teacher: Optional[nn.Module] = None,
            device: torch.device = torch.device('cpu'),
            rank: int = 0,
            world_size: int = 1,
    ) -> None:
        self.config = config
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = steps_per_epoch
        self.model = model.to(device)
        if config.drop_path is not None:
            set_drop_path(model, config.drop_path, config.drop_path_rule)
        self.lam = None
        if config.layers:
            dilute_model(model, config.layers, config.target)
            self.lam = LamSchedule(
                config.epochs * (steps_per_epoch if config.lam_on_updates else 1), config.dilution_frac,
                config.lam_schedule, t_in_epochs=not config.lam_on_updates)
        self._diluted = diluted_blocks(model)
        self.module = model
        if world_size > 1:
            # attention of blocks at lam = 0 is skipped, so its parameters go unused
            self.module = DistributedDataParallel(
                model, device_ids=[device] if device.type == 'cuda' else None,
                find_unused_parameters=bool(config.layers))
        self.teacher = teacher if config.kd else None
        lr = config.lr or config.lr_base * config.batch_size * world_size / config.lr_base_size
        self.optimizer = create_optimizer_v2(
            model, opt=config.opt, lr=lr, weight_decay=config.weight_decay, momentum=config.momentum)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
            warmup_lr=config.warmup_lr, min_lr=config.min_lr, cooldown_epochs=config.cooldown_epochs,
            step_on_epochs=not config.sched_on_updates, updates_per_epoch=steps_per_epoch)
        self.amp_dtype = getattr(torch, config.amp_dtype)
        # fp16 needs its gradients scaled (timm's NativeScaler around torch.amp.GradScaler); bf16 does not
        self.loss_scaler = NativeScaler(device.type) if config.amp and config.amp_dtype == 'float16' else None
        self.ema = ModelEmaV3(model, decay=config.model_ema_decay) if config.model_ema else None
        self.mixup = None
        if config.mixup_active:
            self.mixup = Mixup(
                mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                label_smoothing=config.smoothing, num_classes=model.num_classes)
            self.loss_fn = SoftTargetCrossEntropy()
        elif config.smoothing:
            self.loss_fn = LabelSmoothingCrossEntropy(config.smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()
        self.global_step = 0
        self.epoch = 0  # the epoch to run next
        self.batch = 0  # the batch of that epoch to start from
        self.metrics: List[Dict[str, Any]] = []
        self.epoch_time = 0.  # seconds spent in the current epoch before a resume
        self._loss_stats = torch.zeros(2, dtype=torch.float64, device=device)  # this epoch's loss sum, steps

    @property
    def current_lam(self) -> Optional[float]:
        return self._diluted[0].lam if self._diluted else None

    def _set_lam(self, lam: float) -> None:
        for block in self._diluted:
            block.lam = lam

    def start_epoch(self) -> None:
        """Set what is constant within the current epoch: the lr (per-epoch schedule) and lam (per epoch)."""
        self.scheduler.step(self.epoch)  # a no-op for a per-update schedule
        if self.lam is not None and self.lam.t_in_epochs:
            self._set_lam(self.lam(self.epoch))

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the (detached) loss without synchronizing."""
        cfg = self.config
        if self.lam is not None and not self.lam.t_in_epochs:
            self._set_lam(self.lam(self.global_step + 1))
        self.scheduler.step_update(self.global_step)  # a no-op for a per-epoch schedule
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with autocast(self.device, cfg.amp, self.amp_dtype):
            output = self.module(images)
            loss = self.loss_fn(output, targets)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_output = self.teacher(images)
                loss = (1. - cfg.kd_weight) * loss + cfg.kd_weight * kd_loss(output, teacher_output, cfg.kd_temperature)
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_scaler is not None:
            self.loss_scaler(
                loss, self.optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                parameters=self.model.parameters())
        else:
            loss.backward()
            if cfg.clip_grad is not None:
                dispatch_clip_grad(self.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            self.optimizer.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        loss = loss.detach()
        self._loss_stats[0] += loss
        self._loss_stats[1] += 1
        return loss

    def _reduced_loss_stats(self) -> torch.Tensor:
        stats = self._loss_stats.clone()
        if self.world_size > 1:
            dist.all_reduce(stats)
        return stats

    def check_loss(self) -> float:
        """The epoch's mean loss so far over all ranks; raises NonFiniteLossError if any loss was not finite."""
        total, count = self._reduced_loss_stats().tolist()
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f'Non-finite loss in epoch {self.epoch + 1} by step {self.global_step}: stopping. '
                f'Nothing was saved since the last good checkpoint ({CHECKPOINT_NAME} in {self.config.output}); '
                f'resume from it with a lower --lr, or --clip-grad.')
        return total / max(count, 1)

    def train_epoch(self, batches: Iterable, on_checkpoint: Optional[Callable[[], None]] = None) -> float:
        """Run the current epoch from `self.batch` over `batches`; returns its mean loss over all ranks."""
        cfg = self.config
        self.module.train()
        self.start_epoch()
        pbar = tqdm(
            total=self.steps_per_epoch, initial=self.batch, desc=f'epoch {self.epoch + 1}/{cfg.num_epochs}',
            disable=not (cfg.progress and self.rank == 0), leave=False, dynamic_ncols=True)
        for images, targets in batches:
            self.train_step(images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))
            self.batch += 1
            pbar.update()
            last = self.batch == self.steps_per_epoch
            checkpoint = on_checkpoint is not None and cfg.checkpoint_every and not last \
                and self.global_step % cfg.checkpoint_every == 0
            if checkpoint or self.batch % cfg.log_interval == 0:
                loss = self.check_loss()
                postfix = dict(loss=f'{loss:.4f}', lr=f'{self.optimizer.param_groups[0]["lr"]:.2e}')
                if self.lam is not None:
                    postfix['lam'] = f'{self.current_lam:.4f}'
                pbar.set_postfix(postfix, refresh=False)
            if checkpoint:
                on_checkpoint()
            if last:
                break
        pbar.close()
        return self.check_loss()

    def end_epoch(self, record: Dict[str, Any]) -> None:
        """Record the finished epoch and move to the next."""
        self.metrics.append(record)
        self.epoch += 1
        self.batch = 0
        self.epoch_time = 0.
        self._loss_stats.zero_()

    def state_dict(self, elapsed: float) -> Optional[Dict[str, Any]]:
        """The full training state on rank 0 (None elsewhere); collective: every rank must call it."""
        rng = _rng_state(self.device)
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        loss_stats = self._reduced_loss_stats().cpu()
        if self.rank != 0:
            return None
        state = {
            'config': asdict(self.config),
            'world_size': self.world_size,
            'steps_per_epoch': self.steps_per_epoch,
            'epoch': self.epoch,
            'batch': self.batch,
            'global_step': self.global_step,
            'lam': self.current_lam,
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            'rng': rng,
            'loss_stats': loss_stats,
            'metrics': self.metrics,
            'epoch_time': elapsed,
        }
        if self.ema is not None:
            state['model_ema'] = self.ema.module.state_dict()
            state['model_ema_rng'] = self.ema._sr_generator.get_state()
        return state

    def save_checkpoint(self, path: Path, elapsed: float) -> None:
        state = self.state_dict(elapsed)
        if state is not None:
            torch_save(state, path)

    def load_checkpoint(self, path: Path) -> None:
        """Continue exactly where the checkpoint left off (this process's RNG states included)."""
        state = load_torch_file(path)
        if not isinstance(state, dict) or 'global_step' not in state:
            raise ValueError(f'{path} is not a timm-lambda training checkpoint.')
        saved, now = state['config'], asdict(self.config)
        saved = {k: saved.get(k, _FIELD_DEFAULTS[k]) for k in _RESUME_KEYS}  # fields newer than the checkpoint
        diffs = [f'{k}: {saved[k]!r} -> {now[k]!r}' for k in _RESUME_KEYS if _plain(saved[k]) != _plain(now[k])]
        if state['world_size'] != self.world_size:
            diffs.append(f'processes: {state["world_size"]} -> {self.world_size}')
        if state['steps_per_epoch'] != self.steps_per_epoch:
            diffs.append(f'steps per epoch: {state["steps_per_epoch"]} -> {self.steps_per_epoch}')
        if diffs:
            raise ValueError(f'Cannot resume {path} exactly, the run differs ({"; ".join(diffs)}).')
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.loss_scaler is not None and state.get('scaler') is not None:
            self.loss_scaler.load_state_dict(state['scaler'])
        if self.ema is not None:
            self.ema.module.load_state_dict(state['model_ema'])
            self.ema._sr_generator.set_state(state['model_ema_rng'])
        self.global_step, self.epoch, self.batch = state['global_step'], state['epoch'], state['batch']
        self.metrics = list(state['metrics'])
        self.epoch_time = state['epoch_time']
        self._loss_stats.copy_(state['loss_stats'] if self.rank == 0 else torch.zeros(2))
        if self.lam is not None:  # the lam of the last step trained
            self._set_lam(state['lam'])
        _set_rng_state(state['rng'][self.rank], self.device)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _init_distributed(device: str) -> Tuple[torch.device, int, int, bool]:
    """(device, rank, world size, whether this call created the process group)."""
    if dist.is_available() and dist.is_initialized():
        if device.startswith('cuda'):
            device = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
        return torch.device(device), dist.get_rank(), dist.get_world_size(), False
    if is_distributed_env():
        info = init_distributed_device_so(device)
        return torch.device(info['device']), info['global_rank'], info['world_size'], True
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise RuntimeError(f'Device {device} was asked for but CUDA is not available.')
    return torch.device(device), 0, 1, False


def _num_classes(dataset: Dataset) -> Optional[int]:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, 'classes', None) or getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    return len(classes) if classes else None


def _resolve_checkpoint(resume: str) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} to resume from does not exist.')
    return path


def check_run_output(output: os.PathLike, resume: Optional[os.PathLike] = None, overwrite: bool = False) -> None:
    """Refuse to start a new run in a folder that holds another run's checkpoint (unless `overwrite`).

    Resuming that very checkpoint is fine; resuming another one would overwrite it, and so is refused too.
    """
    checkpoint = Path(output) / CHECKPOINT_NAME
    if overwrite or not checkpoint.is_file():
        return
    if resume is not None and _resolve_checkpoint(resume).resolve() == checkpoint.resolve():
        return
    raise FileExistsError(
        f'{output} holds another run\'s checkpoint ({checkpoint}): continue that run with --resume {output}, '
        f'start over with --overwrite (replaces its files), or choose a new --output.')


def _evaluate(model: nn.Module, loader: Iterable, device: torch.device, config: TrainConfig, world_size: int) -> float:
    """Top-1 (%) over the validation shards of all ranks."""
    top1 = evaluate_top1(
        model, loader, device, amp=config.amp, amp_dtype=getattr(torch, config.amp_dtype), progress=False)
    n = len(loader.dataset)
    counts = torch.tensor([top1 * n / 100., n], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    return round(100. * counts[0].item() / counts[1].item(), 4)


def train(
        model: nn.Module,
        train_dataset: Dataset,
        val_dataset: Optional[Dataset],
        config: TrainConfig,
        teacher: Optional[nn.Module] = None,
) -> TrainResult:
    """Train (and, with `config.layers`, dilute and fold) `model`; writes everything into `config.output`.

    Args:
        model: A timm model (for dilution, a timm VisionTransformer); trained in place.
        train_dataset: (PIL image, target) pairs, without a transform: augmentation is set here.
        val_dataset: The same for validation (None: no validation).
        config: The settings.
        teacher: The frozen model to distill from when `config.kd` (default: a copy of `model` as given).

    Returns:
        The trained (folded) model, its metrics per epoch and the output folder, which holds
        `model.safetensors` + `config.json` (loadable with `local-dir:`), `metrics.json` and `last.pth`.
        Under torchrun every rank returns; only rank 0 writes.
    """
    config.validate()
    if config.layers:
        if not isinstance(model, VisionTransformer):
            raise TypeError(f'Dilution needs a timm VisionTransformer, got {type(model).__name__}.')
        validate_layers(config.layers, len(model.blocks))
    num_classes = _num_classes(train_dataset)
    if num_classes and num_classes > model.num_classes:
        raise ValueError(f'The dataset has {num_classes} classes but the model only {model.num_classes}: '
                         f'give it a new classifier (--num-classes {num_classes}).')
    if config.kd:
        teacher = teacher if teacher is not None else copy.deepcopy(model)
        if getattr(teacher, 'num_classes', None) != model.num_classes:
            raise ValueError(f'The teacher predicts {getattr(teacher, "num_classes", "?")} classes, the model '
                             f'{model.num_classes}: distillation needs the same classes (or turn it off, --no-kd).')
    resume = _resolve_checkpoint(config.resume) if config.resume else None
    check_run_output(config.output, resume, config.overwrite)
    device, rank, world_size, created_group = _init_distributed(config.device)
    try:
        return _train(model, train_dataset, val_dataset, config, teacher, resume, device, rank, world_size)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(
        model: nn.Module,
        train_dataset: Dataset,
        val_dataset: Optional[Dataset],
        config: TrainConfig,
        teacher: Optional[nn.Module],
        resume: Optional[Path],
        device: torch.device,
        rank: int,
        world_size: int,
) -> TrainResult:
    output = Path(config.output)
    checkpoint_path = output / CHECKPOINT_NAME
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        for stale in output.glob(f'.{CHECKPOINT_NAME}.*.tmp'):  # left by a run killed while saving
            stale.unlink()
    random_seed(config.seed, rank)

    data_config = resolve_data_config(model, {'crop_pct': config.crop_pct} if config.crop_pct else None)
    aug = dict(
        no_aug=config.no_aug, scale=config.scale, hflip=config.hflip, color_jitter=config.color_jitter,
        auto_augment=config.aa, re_prob=config.reprob, re_mode=config.remode, re_count=config.recount)
    train_set = seeded_subset(train_dataset, config.train_samples, config.seed)
    loader = create_train_loader(
        train_set, train_transform(data_config, **aug), config.batch_size, seed=config.seed, rank=rank,
        world_size=world_size, workers=config.workers, pin_memory=device.type == 'cuda',
        repeats=max(config.aug_repeats, 1))
    val_loader = None
    if val_dataset is not None:
        val_set = seeded_subset(val_dataset, config.val_samples, config.seed)
        if len(val_set) < world_size:
            raise ValueError(f'{len(val_set)} validation samples cannot be shared by {world_size} processes.')
        shard = TransformDataset(Subset(val_set, range(rank, len(val_set), world_size)), eval_transform(data_config))
        val_loader = create_eval_loader(shard, batch_size=config.batch_size, workers=config.workers)

    if teacher is not None and config.kd:
        teacher = teacher.to(device).eval().requires_grad_(False)
        if world_size > 1:  # one teacher for all ranks
            for tensor in teacher.state_dict().values():
                dist.broadcast(tensor, 0)
    trainer = Trainer(
        model, config, loader.batch_sampler.num_batches, teacher=teacher, device=device, rank=rank,
        world_size=world_size)
    if resume is not None:
        trainer.load_checkpoint(resume)
        if rank == 0:
            _logger.info(f'Resumed {resume} at epoch {trainer.epoch + 1}, batch {trainer.batch} '
                         f'(step {trainer.global_step}).')

    while trainer.epoch < config.num_epochs:
        start = time.time() - trainer.epoch_time
        loader.batch_sampler.set_epoch(trainer.epoch, trainer.batch)
        train_loss = trainer.train_epoch(
            loader, on_checkpoint=lambda: trainer.save_checkpoint(checkpoint_path, time.time() - start))
        record = {'epoch': trainer.epoch + 1, 'lam': trainer.current_lam, 'train_loss': round(train_loss, 6)}
        record['val_top1'] = _evaluate(model, val_loader, device, config, world_size) if val_loader else None
        if trainer.ema is not None and val_loader is not None:
            set_lam(trainer.ema.module, trainer.current_lam or 0.)
            record['val_top1_ema'] = _evaluate(trainer.ema.module, val_loader, device, config, world_size)
        record['time_s'] = round(time.time() - start, 2)
        trainer.end_epoch(record)
        trainer.save_checkpoint(checkpoint_path, 0.)
        if rank == 0:
            write_json(output / 'metrics.json', {'config': asdict(config), 'epochs': trainer.metrics})
            _logger.info(_summary(record, config, trainer.optimizer.param_groups[0]['lr']))
            if record['epoch'] == config.warmup_epochs + 1 and not config.kd:  # the first epoch at full lr
                _warn_if_chance(record['train_loss'], model.num_classes, record['epoch'])

    final = fold_model(model) if config.layers else model
    final_ema = None
    if trainer.ema is not None:
        final_ema = trainer.ema.module
        if config.layers:
            set_lam(final_ema, 0.)
            final_ema = fold_model(final_ema)
    if rank == 0:
        save_model_dir(final, output)
        if final_ema is not None:
            save_model_dir(final_ema, output / 'ema')
        _logger.info(f'Saved {"the folded lambda model" if config.layers else "the model"} to {output}.')
    if world_size > 1:
        dist.barrier()
    return TrainResult(model=final, metrics=trainer.metrics, output=output, model_ema=final_ema)


def _warn_if_chance(train_loss: float, num_classes: int, epoch: int) -> None:
    """Warn when the loss of the first epoch after warm-up is still about that of guessing (ln num_classes)."""
    chance = math.log(num_classes) if num_classes > 1 else 0.
    if chance and train_loss > 0.9 * chance:
        _logger.warning(
            f'warning: the training loss of epoch {epoch}, {train_loss:.3f}, is still about chance (ln {num_classes} = '
            f'{chance:.3f}): the model is not learning. For a small dataset try `--recipe small`; else check --lr '
            f'and the augmentation (--aa, --mixup, --cutmix, --reprob).')


def _summary(record: Dict[str, Any], config: TrainConfig, lr: float) -> str:
    epochs = config.num_epochs
    parts = [f'epoch {record["epoch"]}/{epochs}']
    if record['lam'] is not None:
        done = record['lam'] == 0 and record['epoch'] < epochs
        parts.append(f'lam {record["lam"]:.4f}' + (
            f' (attention gone after {config.dilution_frac:.0%} of the schedule, --dilution-frac; the lambda model '
            f'trains on)' if done else ''))
    parts.append(f'train_loss {record["train_loss"]:.4f}')
    if record['val_top1'] is not None:
        parts.append(f'val_top1 {record["val_top1"]:.2f}')
    if 'val_top1_ema' in record:
        parts.append(f'val_top1_ema {record["val_top1_ema"]:.2f}')
    parts += [f'lr {lr:.2e}', f'{record["time_s"]:.1f} s']
    return '  '.join(parts)
