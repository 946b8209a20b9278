"""A small training loop: AdamW, warmup + cosine schedule, gradient clipping, mixed precision
where available (bf16 autocast on CUDA), a progress bar, a time budget and checkpoints."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["TrainConfig", "Trainer"]


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_steps: int = 1000
    max_seconds: Optional[float] = None     # stop early when the time budget is spent
    grad_clip: float = 1.0
    mixed_precision: bool = True            # bf16 autocast on CUDA; no-op on CPU
    log_every: int = 50
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0               # 0 = only at the end (when checkpoint_dir is set)
    progress: bool = True


@dataclass
class Trainer:
    """``loss_fn(model, batch) -> loss``; ``batches`` yields batches forever (or until it stops)."""
    model: nn.Module
    loss_fn: Callable[[nn.Module, Dict[str, Tensor]], Tensor]
    config: TrainConfig = field(default_factory=TrainConfig)
    history: List[Dict[str, float]] = field(default_factory=list)

    def __post_init__(self):
        cfg = self.config
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self._start: Optional[float] = None

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.max_seconds is not None and self._start is not None:
            # a time budget ends training first: decay over the seconds, not the steps
            frac = max(frac, (time.perf_counter() - self._start) / cfg.max_seconds)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def _autocast(self):
        device = next(self.model.parameters()).device
        if self.config.mixed_precision and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    def train(self, batches: Iterator[Dict[str, Tensor]]) -> List[Dict[str, float]]:
        cfg = self.config
        self.model.train()
        start = self._start = time.perf_counter()
        running, seen = 0.0, 0
        for batch in batches:
            if self.step >= cfg.max_steps:
                break
            if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
                break
            with self._autocast():
                loss = self.loss_fn(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            running += float(loss.detach())
            seen += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                rec = {"step": self.step, "loss": running / seen,
                       "lr": self.scheduler.get_last_lr()[0],
                       "seconds": time.perf_counter() - start}
                self.history.append(rec)
                running, seen = 0.0, 0
                if cfg.progress:
                    self._progress(rec)
            if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(cfg.checkpoint_dir)
        if cfg.checkpoint_dir:
            self.save_checkpoint(cfg.checkpoint_dir)
        return self.history

    def _progress(self, rec: Dict[str, float]) -> None:
        cfg = self.config
        width = 24
        done = int(width * rec["step"] / max(1, cfg.max_steps))
        bar = "#" * done + "." * (width - done)
        print(f"[{bar}] step {rec['step']:>5}/{cfg.max_steps} loss {rec['loss']:.4f} "
              f"lr {rec['lr']:.2e} {rec['seconds']:.0f}s", file=sys.stderr, flush=True)

    def save_checkpoint(self, directory: str) -> str:
        """Model (``save_pretrained`` when it has one, else a state dict) + optimizer state."""
        os.makedirs(directory, exist_ok=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(directory)
        else:
            torch.save(self.model.state_dict(), os.path.join(directory, "model.pt"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step}, os.path.join(directory, "trainer_state.pt"))
        return directory
