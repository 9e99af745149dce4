"""The training loop as a :class:`Trainer`: ``setup`` (the student in torch, the teacher, the loss, the optimizer,
a resumed checkpoint), ``step`` (one optimizer step), ``validate`` (held-out fidelity and loss), ``finish`` (the
best weights written back into the ONNX student, and the report).

AdamW with a warm-up + cosine schedule and gradient clipping; validation fidelity after every epoch (or every
``eval_every`` steps); the best weights are kept; early stop after ``patience`` evaluations without progress.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import ModelProto

from inhercc.data import LABELS_KEY, Feed, Samples, cast_feeds
from inhercc.distill.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_error,
    checkpoint_folder,
    load_checkpoint,
    resume_config,
    save_checkpoint,
)
from inhercc.distill.config import DEFAULT_EPOCHS, DistillConfig, DistillResult
from inhercc.distill.features import feature_tensors, rebalance_factors, select_trainable
from inhercc.distill.ie import IEKD, resolve_ie_feature
from inhercc.distill.processes import Processes, sum_over_processes
from inhercc.distill.teacher import Teacher, onnx_fidelity, with_teacher
from inhercc.errors import InherccError
from inhercc.files import CHECKPOINT_FILE
from inhercc.losses import DistillLoss
from inhercc.model import one_line
from inhercc.progress import Progress
from inhercc.verify import Scores, mean_cosine


def _as_float32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reduced-precision floating outputs of an autocast forward back to float32 (losses run in float32)."""
    return [t.float() if t.is_floating_point() and t.dtype != torch.float32 else t for t in tensors]


def _as_torch(feeds: Feed, model: ModelProto, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's feeds as torch tensors on ``device``, cast to the model's input types."""
    from inhercc.torchrt.dtypes import from_numpy

    return {k: from_numpy(v).to(device) for k, v in cast_feeds(feeds, model).items()}


def lr_schedule(total: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup·total`` steps, then cosine decay to zero."""
    w = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / (w + 1)
        progress = (step - w) / max(1, total - w)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _Progress:
    """The progress bar (:class:`inhercc.progress.Progress`) on an interactive stderr, its label carrying loss and
    validation fidelity; per-epoch summary lines otherwise."""

    def __init__(self, total: int, enabled: bool, say: Callable[[str], None]) -> None:
        self.bar = Progress(total, "distilling", enabled and sys.stderr.isatty())
        self.say = say if enabled else (lambda _m: None)
        self.loss: float | None = None
        self.val: float | None = None
        self.epoch = ""

    def step(self, loss: float, epoch: str) -> None:
        """One step done: the bar moves, its label shows the smoothed loss."""
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        self.epoch = epoch
        val = f" val {self.val:.4f}" if self.val is not None else ""
        self.bar.label = f"distilling epoch {epoch} loss {self.loss:.4g}{val}"
        self.bar.step()

    def line(self, text: str) -> None:
        """A summary line, clear of the bar."""
        if self.bar.enabled:
            sys.stderr.write("\r\033[K")
        self.say(text)


def _too_few(n: int, world: int, fixed: int | None) -> str:
    """Why ``n`` training samples make no batch."""
    if fixed:
        return f"{n} training sample(s) are too few for the model's fixed batch of {fixed} (× {world} process(es))"
    return f"{n} training sample(s) are too few for {world} process(es)"


@dataclass
class TrainState:
    """Where training stands, saved in checkpoints as a plain dict: position, best validation, history."""

    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` trained on already
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    bad: int = 0  # evaluations since the best one
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # step losses since the last evaluation


class Trainer:
    """Fine-tune a student on its teacher's outputs: :meth:`setup`, then :meth:`fit` (:meth:`step` per batch,
    :meth:`validate` per evaluation), then :meth:`finish`. The data split, the processes and the device are
    settled by the caller (:func:`inhercc.distill.distill`)."""

    def __init__(
        self,
        student_model: ModelProto,
        teacher_model: ModelProto,
        samples: Samples,
        split: tuple[np.ndarray, np.ndarray],
        cfg: DistillConfig,
        procs: Processes,
        device: torch.device,
        log: Callable[[str], None] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        t0: float | None = None,
    ) -> None:
        self.student_model, self.teacher_model, self.samples = student_model, teacher_model, samples
        self.train_idx, self.val_idx = split
        self.cfg, self.procs, self.device = cfg, procs, device
        self.log, self.callback = log, callback
        self.t0 = time.perf_counter() if t0 is None else t0
        self.state = TrainState()
        self.best_params: dict[str, torch.Tensor] | None = None
        self.ie: IEKD | None = None
        self.fake_quant_activations: dict[str, Any] = {}  # static quantization-aware distillation: tensor -> range
        self.fake_quant_weights: dict[str, Any] = {}  # … and initializer -> how ORT's QDQ model stores it
        self.resumed_from: int | None = None
        self.report: dict[str, Any] = {}

    def run(self) -> DistillResult:
        """Set up, train, finish."""
        self.setup()
        self.fit()
        return self.finish()

    def say(self, msg: str) -> None:
        """A log line from rank 0 (stderr unless a ``log`` was given), none when quiet."""
        if self.procs.main and not self.cfg.quiet:
            (self.log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build everything, in the order the random draws and the checks before any work depend on."""
        self._build_student()
        self._build_teacher()
        self._build_loss()
        self._build_ie()
        self._build_optimizer()
        self._fidelity_before()
        self._open_checkpoint()
        self.progress = _Progress(self.total, self.procs.main and not self.cfg.quiet, self.say)
        self.progress.bar.done = self.state.step

    def _build_student(self) -> None:
        """The student as a torch module, its trained tensors chosen (and rebalanced), the feature tensors."""
        from inhercc.specs import mask_input
        from inhercc.torchrt import OnnxModule

        cfg = self.cfg
        self.features = (
            feature_tensors(self.student_model, self.teacher_model, cfg.features) if cfg.feature_loss > 0 else []
        )
        # IE-KD's feature: exposed after the feature-loss tensors (once, if it is one of them)
        self.ie_feature = resolve_ie_feature(self.student_model, self.teacher_model, cfg.ie_feature) if cfg.ie else None
        self.exposed = self.features + [f for f in [self.ie_feature] if f is not None and f not in self.features]
        self.mask_name = mask_input(self.student_model)  # padding: out of the feature and token-level output losses
        names = select_trainable(self.student_model, cfg.train)
        # static fake quantization calibrates activation ranges on the ONNX student: rebalanced there first
        early = cfg.rebalance and cfg.fake_quant == "int8-static"
        self.rebalanced = self._rebalance_student(names) if early else 0
        torch.manual_seed(cfg.seed)
        self.module = OnnxModule(self._training_graph(), extra_outputs=self.exposed).to(self.device)
        self.module.set_trainable(names)
        params = self.module.onnx_parameters()
        self.trainable = {n: params[n] for n in names if n in params}
        if len(self.trainable) != len(names):
            missing = sorted(set(names) - set(self.trainable))
            raise InherccError(f"the torch module holds no parameter for {', '.join(missing[:5])}")
        if cfg.rebalance and not early:
            self.rebalanced = rebalance_factors(params, self.trainable)
        self.fake_quantized = self._fake_quantize() if cfg.fake_quant else []

    def _rebalance_student(self, names: list[str]) -> int:
        """:func:`rebalance_factors` on the ONNX student's initializers (a copy; the function unchanged)."""
        from onnx import numpy_helper

        inits = {t.name: t for t in self.student_model.graph.initializer if t.name in set(names)}
        tensors = {n: torch.nn.Parameter(torch.from_numpy(numpy_helper.to_array(t).copy())) for n, t in inits.items()}
        done = rebalance_factors(tensors, tensors)
        model = ModelProto()
        model.CopyFrom(self.student_model)
        for t in model.graph.initializer:
            if t.name in tensors:
                t.CopyFrom(numpy_helper.from_array(tensors[t.name].detach().numpy(), t.name))
        self.student_model = model
        return done

    def _training_graph(self) -> ModelProto:
        """The graph the torch module runs: the student's, and for quantization-aware distillation with the
        activations ONNX Runtime quantizes read through their fake quantization: at each batch's range (dynamic),
        or at the ranges ORT calibrates on (up to 256 of) the training samples (static)."""
        from inhercc.quantize import activation_ranges, dynamic_activations, qdq_weights, quantize_model
        from inhercc.torchrt.fakequant import with_activation_fake_quant

        cfg = self.cfg
        if cfg.fake_quant == "int8":  # activations at each batch's range, like DynamicQuantizeLinear
            dynamic = dynamic_activations(self.student_model, cfg.fake_quant_per_channel)
            self.fake_quant_activations = dict.fromkeys(dynamic)
            return with_activation_fake_quant(self.student_model, self.fake_quant_activations)
        if cfg.fake_quant != "int8-static":
            return self.student_model
        parts = [feeds for _, feeds in self.samples.batches(self.train_idx[:256], 256)]
        qdq = quantize_model(
            self.student_model, "int8-static", per_channel=cfg.fake_quant_per_channel, calibration=parts
        )
        self.fake_quant_activations = activation_ranges(qdq)
        self.fake_quant_weights = qdq_weights(qdq)  # exactly what ORT stores, biases of Add included
        return with_activation_fake_quant(self.student_model, self.fake_quant_activations)

    def _fake_quantize(self) -> list[str]:
        """Quantization-aware distillation: the weights ONNX Runtime will quantize read through their int8 round
        trip in every forward (training and validation), so the kept weights are those best once quantized."""
        from inhercc.quantize import quantized_weights
        from inhercc.torchrt.fakequant import fake_quantize_weights

        cfg = self.cfg
        assert cfg.fake_quant is not None
        weights = self.fake_quant_weights or quantized_weights(
            self.student_model, cfg.fake_quant, cfg.fake_quant_per_channel
        )
        return fake_quantize_weights(self.module, weights)

    def _build_teacher(self) -> None:
        """The teacher (on the student's device when ONNX Runtime can use it) and the step counts."""
        from inhercc.runtime import cuda_available

        cfg, device, procs = self.cfg, self.device, self.procs
        provider = "cuda" if device.type == "cuda" and cuda_available() else "cpu"
        prefetch = cfg.prefetch
        if prefetch is None:
            prefetch = device.type == "cuda" or bool(cfg.threads and 2 * cfg.threads <= (os.cpu_count() or 1))
        self.prefetch = prefetch
        self.teacher = Teacher(
            self.teacher_model,
            self.exposed,
            provider,
            device.index or 0,
            cfg.cache_teacher,
            len(self.train_idx),
            cfg.threads,
            spin=not (prefetch and provider == "cpu"),  # spinning ORT workers would slow torch's beside them
            output_kinds=cfg.output_kinds,
        )
        self.global_batch = cfg.batch_size * procs.world
        # a fixed batch dim takes whole batches only
        self.min_rows = self.global_batch if self.teacher.fixed else procs.world
        self.per_epoch = self.samples.count_batches(self.train_idx, self.global_batch, min_rows=self.min_rows)
        if self.per_epoch == 0:
            raise InherccError(_too_few(len(self.train_idx), procs.world, self.teacher.fixed))
        self.total = cfg.steps or self.per_epoch * (cfg.epochs or DEFAULT_EPOCHS)
        self.epochs = math.ceil(self.total / self.per_epoch)

    def _build_loss(self) -> None:
        """The loss: kinds chosen from the graph (and the user's overrides), checked on the teacher's outputs."""
        teacher, cfg = self.teacher, self.cfg
        n_out = len(teacher.outputs)
        probe = next(teacher.batches(self.samples, self.train_idx, teacher.fixed or 1))[1]
        probe_out = teacher.run(probe, features=bool(self.exposed))
        not_float = [f for f, v in zip(self.features, probe_out[n_out:]) if not np.issubdtype(v.dtype, np.floating)]
        if not_float:
            raise InherccError(
                f"`distill.features`: {', '.join(not_float[:3])} not float; the feature loss compares floats"
            )
        self.loss_fn = DistillLoss.for_outputs(
            dict(zip(teacher.outputs, probe_out[:n_out])),
            cfg.losses,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            labels=self.samples.labels,
            feature_weight=cfg.feature_loss,
            kinds=teacher.kinds,
        )

    def _build_ie(self) -> None:
        """IE-KD (``ie``): both graphs' feature probed on a batch, the teacher's factor auto-encoder trained on the
        teacher's feature and frozen (a resumed run takes it from the checkpoint), the student's encoders made."""
        cfg, teacher = self.cfg, self.teacher
        if self.ie_feature is None:
            return
        at = self.exposed.index(self.ie_feature)
        _idx, feeds = next(teacher.batches(self.samples, self.train_idx, teacher.fixed or 2))
        t_feat = teacher.run(feeds, features=True)[len(teacher.outputs) + at]
        if not np.issubdtype(t_feat.dtype, np.floating):
            raise InherccError(f"`distill.ie_feature` {self.ie_feature!r} is {t_feat.dtype}; IE-KD compares floats")
        with torch.no_grad():
            s_feat = self.module(**_as_torch(feeds, self.student_model, self.device))[len(teacher.outputs) + at]
        self.ie = IEKD(self.ie_feature, tuple(t_feat.shape), tuple(s_feat.shape), cfg).to(self.device)
        resuming = cfg.resume and cfg.checkpoint and (Path(cfg.checkpoint) / CHECKPOINT_FILE).exists()
        if resuming:
            self.ie.freeze()
            return
        self.say(f"IE-KD: training the teacher's factor auto-encoder on {self.ie_feature} ({cfg.ie_ae_steps} steps)")
        self.ie.train_teacher_ae(self._teacher_features(at), cfg.ie_ae_steps)

    def _teacher_features(self, at: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Shuffled batches of the teacher's IE feature (and the attention mask), epoch after epoch."""
        cfg, teacher = self.cfg, self.teacher
        for epoch in itertools.count():
            rng = np.random.default_rng([cfg.seed, epoch, 1])
            any_batch = False
            for idx, feeds in self.samples.batches(self.train_idx, cfg.batch_size, rng, min_rows=teacher.fixed or 1):
                _, t_feat = teacher(idx, feeds, features=True)
                mask = torch.as_tensor(np.asarray(feeds[self.mask_name])).to(self.device) if self.mask_name else None
                any_batch = True
                yield torch.from_numpy(np.ascontiguousarray(t_feat[at])).to(self.device), mask
            if not any_batch:
                return

    def _build_optimizer(self) -> None:
        """DDP around the module when there are several processes; AdamW and the warm-up + cosine schedule."""
        cfg, device = self.cfg, self.device
        self.model: torch.nn.Module = self.module
        if self.procs.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        groups: list[Any] = list(self.trainable.values())
        if self.ie is not None:  # the IE encoders train alongside, without decay
            groups = [{"params": groups}, {"params": list(self.ie.encoders.parameters()), "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(self.total, cfg.warmup))

    def _fidelity_before(self) -> None:
        """Fidelity before training, in ONNX Runtime on the held-out samples (rank 0; the training ones without)."""
        has_val = bool(len(self.val_idx))
        self.eval_idx = self.val_idx if has_val else self.train_idx
        eval_inputs = "validation split" if has_val else "training samples"
        if self.samples.synthetic:
            eval_inputs = f"synthetic {eval_inputs}"
        if self.procs.main:
            self.say(f"fidelity before training, on the {eval_inputs} ({len(self.eval_idx)} samples)")
            before = self._onnx_fidelity(self.student_model)
            self.report["fidelity_before"] = before.fidelity()
        self.report["fidelity_inputs"] = f"{eval_inputs} ({len(self.eval_idx)} samples)"

    def _onnx_fidelity(self, student: ModelProto) -> Scores:
        """The teacher against an ONNX student on the evaluation samples."""
        return onnx_fidelity(self.teacher, student, self.samples, self.eval_idx, self.cfg.batch_size, self.cfg.threads)

    def _open_checkpoint(self) -> None:
        """The checkpoint folder made before training (rank 0); with ``resume``, the run continued from it."""
        cfg = self.cfg
        self.ckpt_path = Path(cfg.checkpoint) / CHECKPOINT_FILE if cfg.checkpoint else None
        if self.ckpt_path is not None and self.procs.main:
            checkpoint_folder(self.ckpt_path.parent)
        if self.ckpt_path is None or not cfg.resume:
            return
        if not self.ckpt_path.exists():
            self.say(f"no checkpoint in {cfg.checkpoint}; starting from the beginning")
            return
        ckpt = load_checkpoint(self.ckpt_path, cfg, self.trainable)
        try:
            with torch.no_grad():
                for name, p in self.trainable.items():
                    p.copy_(ckpt["params"][name].to(p.device, p.dtype))
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.state = TrainState(**ckpt["state"])
            self.best_params = ckpt["best_params"]
            if self.ie is not None:
                self._resume_ie(ckpt)
            self.resumed_from = self.state.step
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise checkpoint_error(self.ckpt_path, f"its contents do not fit this run: {one_line(e)}") from e
        self.say(f"resuming from {self.ckpt_path} at step {self.state.step} (epoch {self.state.epoch + 1})")

    def _ie_checkpoint(self) -> dict[str, Any]:
        """What a checkpoint keeps of IE-KD: its settings, its modules' state, the recorded terms."""
        assert self.ie is not None
        return {
            "config": self._ie_settings(),
            "state": self.ie.state_dict(),
            "ae_l1": self.ie.ae_l1,
            "terms": self.ie.terms,
        }

    def _ie_settings(self) -> dict[str, Any]:
        """The IE-KD settings a resumed run must share."""
        cfg = self.cfg
        names = ("ie_split", "ie_explore", "ie_inherit_weight", "ie_explore_weight", "ie_ae_steps")
        return {"ie_feature": self.ie_feature} | {k: getattr(cfg, k) for k in names}

    def _resume_ie(self, ckpt: dict[str, Any]) -> None:
        """IE-KD's modules and terms from a checkpoint written by a run with the same IE-KD settings."""
        assert self.ie is not None and self.ckpt_path is not None
        saved = ckpt.get("ie")
        if not isinstance(saved, dict):
            raise checkpoint_error(self.ckpt_path, "it was written without `distill.ie`")
        ours, theirs = self._ie_settings(), saved.get("config", {})
        diff = [k for k in ours if theirs.get(k) != ours[k]]
        if diff:
            detail = ", ".join(f"{k} {theirs.get(k)!r} → {ours[k]!r}" for k in diff)
            raise InherccError(f"cannot resume from {self.ckpt_path}: settings differ ({detail})")
        self.ie.load_state_dict(saved["state"])
        self.ie.ae_l1 = list(saved["ae_l1"])
        self.ie.terms = {k: list(v) for k, v in saved["terms"].items()}

    # -- training ------------------------------------------------------------------------------------------

    def forward(self, feeds: Feed) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The student's graph outputs and feature tensors for a batch."""
        outs = self.model(**_as_torch(feeds, self.student_model, self.device))
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        n_out = len(self.teacher.outputs)
        return outs[:n_out], outs[n_out:]

    def labels_of(self, feeds: Feed) -> torch.Tensor | None:
        """The batch's labels on the device, None when the data has none."""
        return torch.as_tensor(np.asarray(feeds[LABELS_KEY])).to(self.device) if self.samples.labels else None

    def _on_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Teacher arrays as tensors on the training device."""
        return [torch.from_numpy(t).to(self.device) for t in arrays]

    def fit(self) -> None:
        """Train epoch after epoch until the planned steps are done or patience runs out."""
        state = self.state
        if not state.history:  # the initialization is the first candidate: training never returns worse
            self.evaluate(f"0/{self.epochs}")
        self.model.train()
        stop = state.stopped_early or state.step >= self.total
        while not stop and state.epoch < self.epochs:
            stop = self._epoch()
            if state.step >= self.total:
                break
        self.progress.bar.close()

    def _epoch(self) -> bool:
        """One epoch from the batch a resumed run stopped at; a checkpoint after it. True when stopped early."""
        state, cfg = self.state, self.cfg
        epoch = state.epoch
        label = f"{epoch + 1}/{self.epochs}"
        rng = np.random.default_rng([cfg.seed, epoch])
        batches = self.samples.batches(self.train_idx, self.global_batch, rng, min_rows=self.min_rows)
        stop = False
        # resumed inside this epoch: the batches before state.batch were trained on already
        for b, feeds, t_out, t_feat in with_teacher(
            self.teacher, batches, bool(self.exposed), self.procs, state.batch, self.prefetch
        ):
            loss = self.step(feeds, t_out, t_feat)
            state.batch = b + 1
            self.progress.step(loss, label)
            if self.callback is not None:
                self.callback({"epoch": epoch, "step": state.step, "loss": loss})
            done = state.step >= self.total
            if cfg.eval_every and state.step % cfg.eval_every == 0 and not done:
                if self.evaluate(f"{label} @ step {state.step}"):
                    state.stopped_early = stop = True
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                self.checkpoint()
            if done or stop:
                break
        if not stop:
            state.epoch, state.batch = epoch + 1, 0
            if self.evaluate(label):
                state.stopped_early = stop = True
        self.checkpoint()
        return stop

    def step(self, feeds: Feed, t_out: list[np.ndarray], t_feat: list[np.ndarray]) -> float:
        """One optimizer step on a batch and the teacher's outputs for it; returns the loss."""
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            s_out, s_feat = self.forward(feeds)
        if cfg.precision != "fp32":
            s_out, s_feat = _as_float32(s_out), _as_float32(s_feat)
        mask = torch.as_tensor(np.asarray(feeds[self.mask_name])).to(self.device) if self.mask_name else None
        t_feat_dev, n_feat = self._on_device(t_feat), len(self.features)
        loss, _parts = self.loss_fn(
            s_out, self._on_device(t_out), self.labels_of(feeds), s_feat[:n_feat], t_feat_dev[:n_feat], mask
        )
        if self.ie is not None:
            at = self.exposed.index(self.ie_feature)  # type: ignore[arg-type]
            loss = loss + self.ie(s_feat[at], t_feat_dev[at], mask)[0]
        if not torch.isfinite(loss):
            raise InherccError(f"the loss became {float(loss)} at step {self.state.step + 1}; lower `distill.lr`")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), cfg.clip)
        if self.ie is not None:
            self._ie_gradients()
        self.optimizer.step()
        self.scheduler.step()
        value = float(loss.detach())
        self.state.step += 1
        self.state.losses.append(value)
        return value

    def _ie_gradients(self) -> None:
        """The IE encoders' gradients averaged over the processes (DDP covers only the student) and clipped."""
        assert self.ie is not None
        params = [p for p in self.ie.encoders.parameters() if p.grad is not None]
        if self.procs.world > 1:
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.procs.world)
        if self.cfg.clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)

    def validate(self) -> dict[str, Any] | None:
        """Fidelity per output pooled over this rank's share of the held-out samples, summed over ranks; the mean
        cosine as the score; plus the validation loss. None without held-out samples."""
        if not len(self.val_idx):
            return None
        teacher, procs = self.teacher, self.procs
        scores, loss_sum, count = teacher.scores(), 0.0, 0
        with torch.no_grad():
            for idx, feeds in teacher.batches(
                self.samples, self.val_idx[procs.rank :: procs.world], self.cfg.batch_size
            ):
                t_out, _ = teacher(idx, feeds, features=False, train=False)
                s_out, _ = self.forward(feeds)
                loss, _ = self.loss_fn(s_out, self._on_device(t_out), self.labels_of(feeds))
                loss_sum, count = loss_sum + float(loss) * len(idx), count + len(idx)
                scores.add(t_out, [s.detach().cpu().numpy() for s in s_out], teacher.mask(feeds))
        vec = sum_over_processes(scores.vector() + [loss_sum, count], procs, self.device)
        scores.load(vec[:-2])
        fid = scores.fidelity()
        return {"fidelity": fid, "score": mean_cosine(fid), "loss": vec[-2] / max(vec[-1], 1.0)}

    def evaluate(self, epoch_label: str) -> bool:
        """Validate, keep the best weights, say so; True when patience has run out."""
        state = self.state
        val = self.validate()
        entry: dict[str, Any] = {
            "epoch": state.epoch,
            "step": state.step,
            "loss": float(np.mean(state.losses)) if state.losses else None,
        }
        state.losses = []
        stop = False
        if val is not None:
            entry.update({"val_cosine": val["score"], "val_loss": val["loss"]})
            self.progress.val = val["score"]
            if state.best is None or val["score"] > state.best + 1e-7:
                state.best, state.best_step, state.best_epoch, state.bad = val["score"], state.step, state.epoch, 0
                self.best_params = {k: v.detach().cpu().clone() for k, v in self.trainable.items()}
            else:
                state.bad += 1
                stop = bool(self.cfg.patience) and state.bad >= self.cfg.patience
        state.history.append(entry)
        val_txt = f", val cosine {val['score']:.5f}, val loss {val['loss']:.4g}" if val else ""
        loss_txt = f"loss {entry['loss']:.4g}" if entry["loss"] is not None else "no step"
        self.progress.line(f"epoch {epoch_label}: step {state.step}/{self.total}, {loss_txt}{val_txt}")
        return stop

    def checkpoint(self) -> None:
        """Save weights, best weights, optimizer, schedule and position (rank 0, when a folder was given)."""
        if self.ckpt_path is None or not self.procs.main:
            return
        trainable = self.trainable
        save_checkpoint(
            self.ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": resume_config(self.cfg),
                "shapes": {k: list(v.shape) for k, v in trainable.items()},
                "params": {k: v.detach().cpu().clone() for k, v in trainable.items()},
                "best_params": self.best_params,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "state": asdict(self.state),
            }
            | ({"ie": self._ie_checkpoint()} if self.ie is not None else {}),
        )

    # -- finish --------------------------------------------------------------------------------------------

    def finish(self) -> DistillResult:
        """The best weights written back into the ONNX student, scored in ONNX Runtime (rank 0), and the report."""
        if self.best_params is not None:
            with torch.no_grad():
                for name, p in self.trainable.items():
                    p.copy_(self.best_params[name].to(p.device, p.dtype))
        if self.fake_quantized:
            from inhercc.torchrt.fakequant import remove_fake_quant

            remove_fake_quant(self.module)  # the float weights are written; ONNX Runtime quantizes them
        trained = self.module.write_back(self.student_model)
        if self.procs.main:
            self.report.update(self._onnx_fidelity(trained).report())
        self.report["training"] = self._training_report()
        return DistillResult(trained, self.report)

    def _training_report(self) -> dict[str, Any]:
        """The report's ``training`` entry: what ran, how far, on what, with which losses."""
        cfg, state, teacher, loss_fn = self.cfg, self.state, self.teacher, self.loss_fn
        return {
            "epochs": state.epoch,
            "steps": state.step,
            "steps_planned": self.total,
            "steps_per_epoch": self.per_epoch,
            "best_val_cosine": state.best,
            "best_epoch": state.best_epoch,
            "best_step": state.best_step,
            "stopped_early": state.stopped_early,
            "resumed_from_step": self.resumed_from,
            "train_samples": int(len(self.train_idx)),
            "val_samples": int(len(self.val_idx)),
            "batch_size": cfg.batch_size,
            "world_size": self.procs.world,
            "device": str(self.device),
            "precision": cfg.precision,
            "fake_quant": {
                "mode": cfg.fake_quant,
                "weights": len(self.fake_quantized),
                "activations": len(self.fake_quant_activations),
            }
            if cfg.fake_quant
            else None,
            "teacher_provider": teacher.provider,
            "teacher_cached": teacher.caching,
            "teacher_prefetched": self.prefetch,
            "trained": {
                "mode": cfg.train,
                "factor_pairs_rebalanced": self.rebalanced,
                "tensors": len(self.trainable),
                "params": int(sum(p.numel() for p in self.trainable.values())),
            },
            "losses": {o.name: o.kind for o in loss_fn.outputs}
            | ({"_labels": f"ce alpha={cfg.alpha}"} if loss_fn.labels_output else {})
            | (
                {"features": f"{len(self.features)} tensors ({cfg.features}) x {cfg.feature_loss}"}
                if self.features
                else {}
            )
            | ({"ie": f"IE-KD on {self.ie_feature} ({cfg.ie_explore})"} if self.ie is not None else {}),
            "lr": cfg.lr,
            **({"ie": self.ie.report()} if self.ie is not None else {}),
            "wall_s": round(time.perf_counter() - self.t0, 2),
            "history": state.history,
        }
