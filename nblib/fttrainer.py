"""The Hugging Face ``Trainer`` of a fine-tune (``nblib.finetune.train`` runs it): its arguments, a
training loss whose output layer runs on the assistant's tokens only (``nblib.ftscore.label_nll``), an
``eval_loss`` that is the run's one eval loss, and callbacks for progress, the time budget
(``nblib.lifecycle.Budget``) and W&B sample answers. A loss or gradient norm that blows up
(``nblib.lifecycle.blown_up``) stops training before the optimizer applies it (:func:`diverged`)."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from nblib import config, ftscore, lifecycle, machine
from nblib.progress import Progress

if TYPE_CHECKING:
    from nblib.finetune import Setup


AFRESH = "resume=False (python -m nblib.finetune: -p resume=false)"


def diverged(s: Setup, what: str, value: float, step: int) -> lifecycle.Diverged:
    """The error that stops a fine-tune whose ``what`` blew up at ``step``, naming its last good checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = s.run_dir / "checkpoints"
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return lifecycle.diverged(f"{s.name} seed {s.seed}", what, value, step, s.learning_rate,
                              config.relative(last) if last else "none written yet", " or more warmup_steps", AFRESH)


def grad_norm(model: Any) -> float:
    """The norm of every gradient of ``model`` together (0 when none)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def callbacks(s: Setup) -> list[Any]:
    """Progress (bar + pipeline status), the session's time budget, a stop at a blown-up gradient norm, and W&B
    sample answers."""
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Progress | None = None
            self.budget = lifecycle.Budget(s.cfg["time_budget_minutes"])
            self.last = self.budget.started
            self.out_of_time = False

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (the Trainer's signature)
            self.bar = Progress(f"{s.name} seed {s.seed}", state.max_steps, initial=state.global_step,
                                disable=not state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            now = time.perf_counter()
            self.budget.step(now - self.last)  # the step and any evaluation or save after it
            self.last = now
            self.bar.update(1)
            if self.budget.minutes is not None and state.global_step < state.max_steps:
                short = torch.tensor([float(self.budget.short(3 * self.budget.step_seconds + 5))], device=args.device)
                if torch.distributed.is_initialized():  # under torchrun every process stops at the same step
                    torch.distributed.all_reduce(short, op=torch.distributed.ReduceOp.MAX)
                if short.item():  # no room for one more step and a save
                    self.out_of_time = control.should_save = control.should_training_stop = True

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            norm = grad_norm(model)  # as clipped: a non-finite norm before clipping leaves non-finite gradients
            if not math.isfinite(norm) and not args.fp16:  # fp16's grad scaler skips such steps itself
                raise diverged(s, "the gradient norm", norm, state.global_step + 1)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if self.bar is not None and logs:
                self.bar.update(0, **{k: v for k, v in logs.items() if k in ("loss", "eval_loss")})

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.close()

    class SampleAnswers(TrainerCallback):
        """At each evaluation, answer the fixed questions and log them as a W&B table."""

        def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001
            import wandb

            table = wandb.Table(columns=["step", "question", "answer", "stopped"])
            for r in ftscore.answer(s.model, s.tokenizer, s.cfg["questions"], s.cfg["max_new_tokens"]):
                table.add_data(state.global_step, r["question"], r["answer"], r["stopped"])
            wandb.log({"samples": table, "train/global_step": state.global_step})

    return [Watch(), *([SampleAnswers()] if s.cfg["wandb"] else [])]


def trainer_class() -> type:
    from transformers import Trainer

    class AssistantLossTrainer(Trainer):
        """A Trainer whose training loss runs the output layer on the labelled rows only, and whose
        ``eval_loss`` is :func:`nblib.ftscore.assistant_loss` (token-weighted over every eval dialogue)
        rather than the mean of per-batch means, so the best checkpoint is chosen by the number the
        summary reports."""

        def __init__(self, *args: Any, setup: Setup, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.setup = setup

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            """The model's own causal-LM loss, with Trainer's scaling kept (transformers 5.0 to 5.23): summed
            over the labelled tokens and divided by ``num_items_in_batch`` (the accumulated batch's, all
            processes') where the model takes loss kwargs, else the micro-batch's mean. ``n_gpu > 1``
            (DataParallel: several GPUs without torchrun) keeps the Trainer's own loss."""
            if return_outputs or self.args.n_gpu > 1:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            nll, _ = ftscore.label_nll(model, inputs)
            mean = nll.detach().mean().item()  # no extra wait: the Trainer reads each micro-batch's loss anyway
            if lifecycle.blown_up(mean):
                raise diverged(self.setup, "the loss", mean, self.state.global_step + 1)
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = nll.sum() / num_items_in_batch
                if self.args.average_tokens_across_devices:  # DDP averages gradients over processes
                    loss = loss * self.accelerator.num_processes
                return loss
            return nll.mean()

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:  # noqa: ANN001
            loss, bpb = self.setup.evaluate_loss(self.model)
            if lifecycle.blown_up(loss):  # before the Trainer saves these weights as a checkpoint
                raise diverged(self.setup, "the eval loss", loss, self.state.global_step)
            metrics = {f"{metric_key_prefix}_loss": loss}
            if bpb is not None:
                metrics[f"{metric_key_prefix}_bpb"] = bpb
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return AssistantLossTrainer


def training_arguments(s: Setup) -> Any:
    """The Trainer's arguments: eval and save every ``eval_steps``, best model kept, mixed precision on GPUs."""
    from transformers import TrainingArguments

    cfg, cuda = s.cfg, s.device.type == "cuda"
    half = machine.auto_dtype(s.device)
    # transformers 5.0 (Kaggle's image) calls it gradient_checkpointing; later 5.x renamed it
    # activation_checkpointing and warn on the old name.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(s.run_dir / "checkpoints"), max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["eval_batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"], learning_rate=s.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=cfg["warmup_steps"], weight_decay=cfg["weight_decay"],
        eval_strategy="steps", eval_steps=cfg["eval_steps"], save_strategy="steps", save_steps=cfg["eval_steps"],
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=cfg["logging_steps"], report_to="wandb" if cfg["wandb"] else "none",
        run_name=f"{s.name}-seed-{s.seed}", disable_tqdm=True,
        **{ckpt: cfg["activation_checkpointing"], f"{ckpt}_kwargs": {"use_reentrant": False}},
        bf16=cuda and half == torch.bfloat16, fp16=cuda and half == torch.float16, use_cpu=not cuda,
        seed=s.seed, data_seed=s.seed, remove_unused_columns=False, dataloader_num_workers=0,
    )
