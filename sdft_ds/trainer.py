"""SDFTTrainer: rollout → teacher forward → student forward and divergence → backward/step → teacher sync → log.

    trainer = SDFTTrainer(model=student, ref_model=teacher, args=SDFTConfig(...), processing_class=tokenizer,
                          train_dataset=dataset)
    trainer.train(); trainer.save_model()

With SDFTConfig(method="sft") the same trainer is the SFT baseline: no teacher and no rollout; each micro-batch is
prompt + the dataset's reference completion, and the loss is its token cross-entropy.

Everything that can be checked without a model (config, tokenizer, every dataset row) is checked before an
engine is built.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PreTrainedModel

from sdft_ds import checkpoint, engines, lora, models
from sdft_ds.batch import MicroBatch, completion_mask, loss_tokens, micro_batch, right_pad, token_weights
from sdft_ds.config import SDFTConfig
from sdft_ds.data import (PromptSampler, left_pad, load_prompt_dataset, load_tokenizer, tokenize_completions,
                          tokenize_prompts, with_completions, with_teacher_prompts)
from sdft_ds.divergence import DivergenceOutput, linear_cross_entropy, linear_divergence, target_logprobs
from sdft_ds.rollout import build_rollout, sample, sampling_config
from sdft_ds.tracking import PhaseClock, StepStats, make_tracker, sample_rows, set_deepspeed_log_level


def _head_divergence(hidden, weight, teacher_hidden, teacher_weight, token_weights, **kwargs):
    """The student's output head: divergence against the teacher; a live teacher (teacher_weight None) shares the
    student's weight, gathered by the head."""
    teacher_weight = weight.detach() if teacher_weight is None else teacher_weight
    return linear_divergence(hidden, weight, teacher_hidden, teacher_weight, token_weights, **kwargs)


def _head_logprobs(hidden, weight, target_ids, **kwargs):
    """log S(target) without gradient."""
    return (target_logprobs(hidden, weight, target_ids, **kwargs),)


# Settings a resumed run must keep (with the data and models, see SDFTTrainer._fingerprint); the others, like
# max_steps or learning_rate, may change on resume.
RESUME_FIXED = ("method", "teacher_mode", "generate_from_teacher", "per_device_train_batch_size",
                "gradient_accumulation_steps", "num_generations", "steps_per_generation", "num_iterations", "seed")


PER_NODE_PATHS = ("output_dir", "resume_from_checkpoint")  # may differ per node (node-local disks)


def _lora_name(config) -> str | None:
    """What a resumed run's adapter must share with the checkpoint's."""
    if config is None:
        return None
    targets = config.target_modules
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
    return f"r={config.r}, alpha={config.lora_alpha}, targets={targets}, rslora={config.use_rslora}"


def _model_name(model) -> str:
    if model is None:
        return "(a copy of the student)"
    if isinstance(model, PreTrainedModel):
        return str(getattr(model, "name_or_path", None) or type(model).__name__)
    return str(model)


class SDFTTrainer:
    """Self-Distillation Fine-Tuning on DeepSpeed ZeRO-3 (API of TRL's `SDFTTrainer`)."""

    # Keyword-only after the model: TRL's SDFTTrainer takes args second, so SDFTTrainer(model, args) would otherwise
    # bind the config to ref_model. TRL's other arguments are refused by name (docs/migrating_from_trl.md).
    def __init__(self, model, *, ref_model=None, args: SDFTConfig | None = None, processing_class=None,
                 train_dataset=None, eval_dataset=None, callbacks=None, optimizers=(None, None), peft_config=None):
        for name, value, instead in (
                ("eval_dataset", eval_dataset, "pass it to heldout_divergence() before and after train() "
                 "(launch/train.py: eval_dataset_name)"),
                ("callbacks", callbacks, "read trainer.summary and the report_to logs after train()"),
                ("optimizers", None if optimizers == (None, None) else optimizers,
                 "set the optimizer and scheduler in the student DeepSpeed config and lr_scheduler_type")):
            if value is not None:
                raise ValueError(f"SDFTTrainer does not take TRL's {name}: {instead}.")
        self.args = args = args if args is not None else SDFTConfig()
        set_deepspeed_log_level(args.deepspeed_log_level)
        engines.check_accelerator(args)
        self.lora = lora.lora_config(args, peft_config)  # None: the whole student trains
        if train_dataset is None:
            raise ValueError("train_dataset is required: rows with 'prompt' and 'teacher_prompt'.")
        self.sft = args.method == "sft"
        if self.sft and ref_model is not None:
            raise ValueError("method='sft' trains on the dataset's reference completions and builds no teacher; drop "
                             "ref_model (ref_model_name_or_path), or choose method='sdft'.")
        if args.teacher_mode == "live" and ref_model is not None:
            raise ValueError("teacher_mode='live' makes the current student its own teacher; drop ref_model or "
                             "choose teacher_mode='frozen' or 'ema'.")
        self.tokenizer = processing_class if processing_class is not None else self._load_tokenizer(model)
        dataset = load_prompt_dataset(train_dataset)
        dataset = with_completions(dataset) if self.sft else with_teacher_prompts(dataset, args.teacher_prompt_template)
        self.prompts = tokenize_prompts(dataset, self.tokenizer, args.max_prompt_length,
                                        args.max_teacher_prompt_length, args.chat_template_kwargs)
        self.completions = (tokenize_completions(dataset, self.tokenizer, args.max_completion_length,
                                                 args.chat_template_kwargs) if self.sft else [])
        student_config = models.config_of(model, args.model_init_kwargs, role="student")
        teacher_config = (student_config if ref_model is None
                          else models.config_of(ref_model, args.model_init_kwargs, role="teacher"))
        models.check_pair(student_config, teacher_config, self.tokenizer, ref_model, args.teacher_mode)
        models.check_topk(student_config, args.distillation_mode, args.distillation_topk)
        # how each output layer makes logits (refusing what the fused head cannot reproduce); a live teacher is the
        # student
        self.heads = (models.logit_transform(student_config), models.logit_transform(teacher_config))
        if self.lora is not None:
            lora.check_targets(student_config, self.lora)

        self.rank, self.world_size = engines.init_distributed()
        self.fingerprint = self._fingerprint(model, ref_model)
        self._check_ranks_agree()
        self.earlier_checkpoints: list[Path] = []  # this run's own, found at start: train() must be asked to resume
        self.resume_from = self._open_checkpoint(args.resume_from_checkpoint)
        if self.resume_from is None:
            self._claim_output_dir()
        torch.manual_seed(args.seed)
        self.sampler = PromptSampler(len(self.prompts), args.prompts_per_generation, self.rank, self.world_size,
                                     args.seed)
        self.total_steps = args.max_steps if args.max_steps > 0 else max(
            1, math.ceil(args.num_train_epochs * self.sampler.rounds_per_epoch * args.steps_per_round))

        student_ds = engines.fill_ds_config(args.student_ds_config_path(), args, self.world_size,
                                            student_config.hidden_size, self.total_steps)
        student_lm = engines.load_causal_lm(model, student_ds, args.model_init_kwargs, args.attn_implementation)
        models.check_output_layer(student_lm)
        if args.disable_dropout:
            models.disable_dropout(student_lm)
        self.peft = None if self.lora is None else lora.attach(  # the adapter layers go into student_lm
            student_lm, self.lora, teacher_adapter=not self.sft and args.teacher_mode == "ema" and ref_model is None)
        self.student = engines.build_student_engine(student_lm, student_ds, args, self.total_steps)
        self.ema: engines.TeacherEMA | None = None
        self.teacher = self._build_teacher(ref_model, teacher_config, engines.zero_stage(student_ds))
        self.eos_ids = models.eos_ids(self.tokenizer, student_lm,
                                      *([] if self.teacher is None else [engines.language_model(self.teacher)]))
        self._check_weights_finite(model, ref_model)
        engines.register_hf_config(student_ds)  # the student's ZeRO stage for what transformers builds from now on

        generator = self.teacher if args.generate_from_teacher else self.student
        adapter = generator.active if isinstance(generator, lora.AdapterTeacher) else None
        generator = self.student if adapter else generator  # an adapter teacher generates on the student's engine
        self.rollout = None if self.sft else build_rollout(
            generator, args.rollout_path, self.tokenizer, self.eos_ids, self.tokenizer.pad_token_id, self.world_size,
            engines.hybrid_engine_enabled(generator), args.compile_generation, lora=self.lora is not None,
            adapter=adapter)
        self.sampling = sampling_config(args)
        torch.manual_seed(args.seed + self.rank)  # ranks sample different completions
        self.step = 0
        self.teacher_syncs = 0
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradients, and in a row:
        self.nonfinite_in_a_row = 0
        self.step_applied = True  # whether the last optimizer step moved the weights
        self.queue: list[MicroBatch] = []
        self.prompts_truncated = 0
        self.teacher_prompts_truncated = 0
        self.stop_signal = 0  # the signal that stopped train() early, after saving a checkpoint
        self.window = StepStats(engines.device(), args.max_completion_length)  # metrics since the last log
        self.samples: list[dict] = []  # rank 0's rows for the next sample table (tracking.sample_rows)
        self.tracking_state: dict = {}  # rank 0: the report_to run (W&B id) a checkpoint keeps for a resume
        self.summary: dict[str, float] = {}  # the last train() call's: steps, seconds, tokens/s
        self._teacher_head: torch.Tensor | None = None  # see _teacher_weight

    # ------------------------------------------------------------ construction helpers

    def _fingerprint(self, model, ref_model) -> dict:
        """What a resumed run must share with the checkpoint it continues: the data (as tokenized), the models and
        the batch geometry that the saved prompt position and rollouts were cut with."""
        digest = hashlib.sha256()
        for ids in (*self.prompts.prompt_ids, *self.prompts.teacher_prompt_ids, *self.completions):
            digest.update(array.array("q", ids).tobytes() + b"|")
        return {"dataset": f"{len(self.prompts)} rows, tokens sha256 {digest.hexdigest()[:16]}",
                "student": _model_name(model), "teacher": _model_name(ref_model), "lora": _lora_name(self.lora),
                **{name: getattr(self.args, name) for name in RESUME_FIXED}}

    def _together(self, problem: str | None, error=ValueError) -> None:
        """Raise `problem` on the ranks that have one and a pointer to it on the others, so that no rank goes on
        into a collective the others never reach."""
        if engines.any_rank(problem is not None):
            raise error(problem or "another rank stopped the run; its error says why.")

    def _check_ranks_agree(self) -> None:
        """Every rank must be given the same data and settings (sdft_ds shards the prompts itself): ranks that
        differ would count different steps and hang in a collective."""
        settings = {k: v for k, v in asdict(self.args).items() if k not in PER_NODE_PATHS}
        mine = hashlib.sha256(json.dumps([self.fingerprint, settings], sort_keys=True, default=str).encode())
        code = float(int(mine.hexdigest()[:12], 16))  # exact in float64
        codes, rows = engines.range_over_ranks(code), engines.range_over_ranks(len(self.prompts))
        if codes[0] != codes[1]:
            raise ValueError(
                "The ranks were given different data or settings (prompt rows per rank: "
                f"{rows[0]:.0f} to {rows[1]:.0f}): "
                "give every rank the same, whole dataset and the same arguments; sdft_ds gives each rank its own "
                "prompts. A dataset pre-sharded per rank must be passed whole instead.")

    def _open_checkpoint(self, spec: str | None) -> tuple[Path, str, dict] | None:
        """The checkpoint to resume, checked on every rank's own disk and agreed by all, with the settings it was
        saved with compared to this run's; before any engine is built."""
        if spec is None:
            return None
        found, problem = None, None
        try:
            found = checkpoint.open_checkpoint(spec, self.args.output_dir, self.rank, self.world_size)
        except checkpoint.CheckpointError as error:
            problem = str(error)
        self._together(problem, checkpoint.CheckpointError)
        folder, tag, record = found
        steps = engines.range_over_ranks(float(record["state"]["step"]))
        if steps[0] != steps[1]:
            raise checkpoint.CheckpointError(f"the ranks found different checkpoints for {spec!r} (each reads its own "
                                             "disk's `latest`): pass the step-N folder to resume_from_checkpoint.")
        changed = checkpoint.changed_settings(record.get("fingerprint", {}), self.fingerprint)
        if changed:
            raise checkpoint.CheckpointError(
                f"{folder / tag} was saved by a run with other data, models or batch geometry ({'; '.join(changed)}): "
                "its prompt position and saved rollouts mean nothing to this run. Resume with the settings it was "
                "saved with, or start afresh in another output_dir.")
        return folder, tag, record

    def _claim_output_dir(self) -> None:
        """A fresh run must be able to write its output_dir and must not mix with an earlier run's checkpoints
        there: a later `--resume_from_checkpoint latest` would continue that run and export its model. Checkpoints
        of another fingerprint are refused now (this run could not resume them either); this run's own, as when a
        job is resubmitted, wait for train(), which may be asked to resume them (Hugging Face's idiom)."""
        output = Path(self.args.output_dir)
        previous = sorted((output / "checkpoints").glob(f"step-*/{checkpoint.COMPLETE}"),
                          key=lambda p: checkpoint.step_number(p.parent.name) or 0)
        problem = None
        if previous and not self.args.overwrite_output_dir:
            saved = json.loads(previous[-1].read_text()).get("fingerprint", {})
            if checkpoint.changed_settings(saved, self.fingerprint):
                problem = self._earlier_run_message(previous)
            self.earlier_checkpoints = previous
        elif self._writes_checkpoints():
            try:
                if previous:
                    shutil.rmtree(output / "checkpoints")
                output.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=output):
                    pass
            except OSError as error:
                problem = f"output_dir {output} cannot be written ({error.strerror}): choose another output_dir."
        self._together(problem)

    def _earlier_run_message(self, previous: list[Path]) -> str:
        return (f"output_dir {self.args.output_dir} holds checkpoints of an earlier run "
                f"({', '.join(p.parent.name for p in previous)}). Continue it with --resume_from_checkpoint latest "
                "(train(resume_from_checkpoint='latest')), choose another output_dir, or pass --overwrite_output_dir "
                "true to start afresh (its checkpoints are then deleted).")

    def _writes_checkpoints(self) -> bool:
        """Rank 0 writes the shared files; with save_on_each_node, each node's first rank writes its own disk's."""
        return self.rank == 0 or (self.args.save_on_each_node and engines.local_rank() == 0)

    def _check_weights_finite(self, model, ref_model) -> None:
        """NaN or inf in a model's weights would give a NaN loss at every step (or a sampling error that does not
        name the weights): refuse the model by name."""
        for role, engine, name in (("student", self.student, model), ("teacher", self.teacher, ref_model)):
            bad = None if engine is None else engines.nonfinite_parameter(engine)
            self._together(None if bad is None else f"The {role} model {_model_name(name)} holds NaN or inf in "
                           f"{bad}: it cannot be trained or taught from. Check the checkpoint (a failed conversion or "
                           "an fp16 overflow when it was saved).")

    @staticmethod
    def _load_tokenizer(model):
        if isinstance(model, PreTrainedModel):
            raise ValueError("processing_class (the tokenizer) is required when model is a model object.")
        return load_tokenizer(model, role="student")

    def _build_teacher(self, ref_model, teacher_config, student_stage: int):
        """Frozen/EMA: a separate inference engine. Without ref_model it starts as a copy of the student. SFT: none,
        and live: the student itself. LoRA without ref_model: the student's engine with its adapter disabled
        (frozen) or with the teacher adapter (ema); with an EMA ref_model, that model gets an adapter of its own."""
        args = self.args
        if self.sft:
            return None
        if args.teacher_mode == "live":
            return self.student
        if self.peft is not None and ref_model is None:
            ema = args.teacher_mode == "ema"
            if ema:
                self.ema = engines.TeacherEMA(lora.adapter_pairs(engines.language_model(self.student)))
            return lora.AdapterTeacher(self.student, self.peft, lora.TEACHER_ADAPTER if ema else None)
        teacher_ds = engines.fill_ds_config(args.teacher_ds_config_path(student_stage), args, self.world_size,
                                            teacher_config.hidden_size, self.total_steps)
        if ref_model is not None:
            lm = engines.load_causal_lm(ref_model, teacher_ds, args.model_init_kwargs, args.attn_implementation)
        else:
            lm = engines.causal_lm_from_config(teacher_config, teacher_ds, args.attn_implementation)
        models.check_output_layer(lm)
        if args.disable_dropout:
            models.disable_dropout(lm)
        lora_ema = self.peft is not None and args.teacher_mode == "ema"
        if lora_ema:
            lora.attach(lm, self.lora)
        teacher = engines.build_teacher_engine(lm, teacher_ds)
        if ref_model is None:
            engines.copy_weights(teacher, self.student)
        if args.teacher_mode == "ema":
            if engines.architecture(teacher) != engines.architecture(self.student):
                raise ValueError("teacher_mode='ema' needs the teacher's parameters to match the student's one to one.")
            if lora_ema:  # the ref_model's adapter starts as the student's and follows it
                pairs = lora.adapter_pairs(engines.language_model(self.student), engines.language_model(teacher))
                engines.TeacherEMA(pairs, fp32_shadow=False).update(1.0)
            else:
                pairs = engines.parameter_pairs(teacher, self.student)
            self.ema = engines.TeacherEMA(pairs)
        return teacher

    # ------------------------------------------------------------ the loop

    def train(self, resume_from_checkpoint: str | None = None) -> dict[str, float]:
        """Run to `total_steps`, or until SIGTERM/SIGUSR1: then save a checkpoint, set `stop_signal` and return."""
        args = self.args
        if resume_from_checkpoint is not None:
            self.resume_from = self._open_checkpoint(resume_from_checkpoint)
        self._together(self._earlier_run_message(self.earlier_checkpoints)
                       if self.earlier_checkpoints and self.resume_from is None and self.step == 0 else None)
        if self.resume_from is not None:
            self._resume(*self.resume_from)
            self.resume_from = None
        tracker, problem = None, None
        try:  # rank 0 reports; its failure (no W&B login, ...) must stop every rank, not leave them in a collective
            tracker = make_tracker(args, self.rank, self.total_steps, {
                **asdict(args), "run": {**self.fingerprint, "world_size": self.world_size},
                "deepspeed_resolved": self.student.config},  # the config with every "auto" filled
                resume=self.tracking_state, start_step=self.step)  # a resumed run continues its W&B run
        except Exception as error:
            problem = f"report_to={args.report_to!r} could not start ({type(error).__name__}: {error})."
        self._together(problem, RuntimeError)
        self.tracking_state = tracker.state()
        local, total = engines.numel(self.student)
        trained = ("" if self.peft is None
                   else f" (LoRA r={self.lora.r}: {lora.trained_parameters(self.student):,} trained)")
        tracker.info(f"{args.method}; student: {total:,} parameters{trained}, {local:,} on rank 0; {self.world_size} "
                     "rank(s); "
                     f"generation: {self.rollout.name if self.rollout else 'none'}; optimizer steps {self.step} -> "
                     f"{self.total_steps}")
        first_step, started = self.step, time.perf_counter()
        with checkpoint.StopSignals() as stop:
            metrics, tokens = self._loop(tracker, stop)
        seconds = time.perf_counter() - started
        tokens = float(engines.all_reduce_sum(torch.tensor(tokens, dtype=torch.float64, device=engines.device())))
        self.summary = {"steps": self.step, "steps_run": self.step - first_step, "seconds": seconds,
                        "tokens_per_second": tokens / max(seconds, 1e-9), "teacher_syncs": self.teacher_syncs,
                        "nonfinite_steps": self.nonfinite_steps}
        tracker.close(self.summary)
        return metrics

    def _loop(self, tracker, stop: checkpoint.StopSignals) -> tuple[dict[str, float], float]:
        """(the last logged metrics, tokens this rank trained on)."""
        args = self.args
        metrics: dict[str, float] = {}
        tokens = 0.0
        while self.step < self.total_steps:
            learning_rate = engines.learning_rate(self.student)  # the rate this step uses
            seconds = self.train_step()
            tokens += seconds["tokens"]
            self.window.add_step(seconds)
            tracker.advance(self.step)
            if self.step % args.logging_steps == 0 or self.step == self.total_steps:
                metrics = self.window.reduce(self.world_size, counts={
                    "prompts_truncated": self.prompts_truncated,
                    "teacher_prompts_truncated": self.teacher_prompts_truncated})
                metrics.update(learning_rate=learning_rate, teacher_syncs=self.teacher_syncs,
                               nonfinite_steps=self.nonfinite_steps)
                tracker.log(metrics, self.step, self.window.length_histogram)
                self.window = StepStats(engines.device(), args.max_completion_length)
            if self.samples:
                tracker.log_samples(self.samples, self.step)
                self.samples = []
            self.stop_signal = int(engines.max_over_ranks(stop.signum))  # every rank stops at the same step
            if self.stop_signal or (args.save_steps and self.step % args.save_steps == 0):
                with PhaseClock(engines.synchronize) as clock, clock("checkpoint"):
                    path = self.save_checkpoint()
                self.window.add_step(clock.seconds, steps=0)  # charged to the next logged window
                tracker.info(f"checkpoint saved to {path}")
            if self.stop_signal:
                tracker.info(f"stopped by signal {self.stop_signal} after optimizer step {self.step}; continue with "
                             f"--resume_from_checkpoint {Path(path).parent}")
                break
        return metrics, tokens

    def train_step(self) -> dict[str, float]:
        """One optimizer step, the recipe of SDFT: rollout (when no generated batch is left) → per micro-batch
        teacher forward → student forward with the fused divergence → backward → optimizer step; then the teacher
        sync. SFT: the next rows' reference completions instead of the rollout, and the student forward with their
        cross-entropy instead of the teacher forward and the divergence. Returns this rank's seconds per phase
        (`PHASES`), `step` (their wall-clock total), `tokens` (prompt + completion tokens trained, padding excluded),
        `completion_tokens` and `completions`; the loss metrics go to `self.window`."""
        args = self.args
        tokens = completion_tokens = completions = 0.0
        nonfinite_loss = torch.zeros((), dtype=torch.bool, device=engines.device())
        with PhaseClock(engines.synchronize) as clock:
            if not self.queue and self.sft:
                self.queue = self.reference_round()
            elif not self.queue:
                with clock("generation"):
                    self.queue = self.generate_round()
            micro_batches = [self.queue.pop(0) for _ in range(args.gradient_accumulation_steps)]
            step_loss_tokens = self._step_loss_tokens(micro_batches)
            for batch in micro_batches:
                weights = self._token_weights(batch, step_loss_tokens)
                if self.sft:
                    with clock("student_forward"):
                        out = self._cross_entropy(batch, weights)
                else:
                    with clock("teacher_forward"):
                        teacher_hidden = self._teacher_hidden(batch)
                    with clock("student_forward"):
                        out = self._divergence(batch, teacher_hidden, weights, stale=self.step > batch.rollout_step)
                if batch is micro_batches[0] and self._samples_due():  # rank 0, host work only
                    self.samples = sample_rows(batch, out.per_token, self.tokenizer, args.sample_table_rows)
                with clock("backward"):
                    self.student.backward(out.loss)
                with clock("optimizer_step"):  # DeepSpeed steps the optimizer at the accumulation boundary only
                    self.step_applied = engines.optimizer_step(self.student)
                nonfinite_loss |= ~torch.isfinite(out.loss.detach())
                self.window.add(batch, out, args.distillation_is_clip)
                tokens += float(batch.attention_mask.sum())
                completion_tokens += float(batch.completion_mask.sum())
                completions += batch.completion_ids.shape[0]
            self.step += 1
            self._count_nonfinite(bool(nonfinite_loss))
            with clock("teacher_sync"):
                self._sync_teacher()
        return {**clock.seconds, "tokens": tokens, "completion_tokens": completion_tokens, "completions": completions}

    def _samples_due(self) -> bool:
        """Whether the step under way (self.step + 1) logs a sample table: every sample_table_steps, on rank 0
        (the others' tracker reports nothing), when something reports it."""
        every = self.args.sample_table_steps
        return (self.rank == 0 and every > 0 and self.args.report_to != "none" and self.args.sample_table_rows > 0
                and (self.step + 1) % every == 0)

    def _count_nonfinite(self, nonfinite_loss: bool) -> None:
        """A step with a non-finite loss on any rank, or whose non-finite gradients the optimizer skipped (fp16's
        loss scaler aside: skipping is how it finds its scale), moved no weight on any rank; after
        max_consecutive_nonfinite of them in a row the run stops instead of spending its budget on nothing."""
        skipped = not self.step_applied and not self.args.fp16
        if not engines.any_rank(nonfinite_loss or skipped):
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.args.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row (up to step {self.step}) had a non-finite loss "
                "or gradients; each was skipped, so the weights are those of step "
                f"{self.step - self.nonfinite_in_a_row}, and nothing was saved since. Usual causes: a learning rate "
                "too high, fp16 overflow (use bf16), NaN/inf in the teacher. Resume from the last checkpoint with a "
                "lower learning_rate, or raise max_consecutive_nonfinite.")

    def generate_round(self) -> list[MicroBatch]:
        """Sample completions for this rank's next round of prompts and cut them into micro-batches (the list
        repeated num_iterations times); `train_step` calls it when its queue is empty."""
        args = self.args
        rows = self.sampler.next_round()
        prompts = [self.prompts.prompt_ids[i] for i in rows]
        teacher_prompts = [self.prompts.teacher_prompt_ids[i] for i in rows]
        self.prompts_truncated += len(self.prompts.truncated_rows.intersection(rows))
        self.teacher_prompts_truncated += len(self.prompts.truncated_teacher_rows.intersection(rows))
        ids, mask = left_pad(teacher_prompts if args.generate_from_teacher else prompts, self.tokenizer.pad_token_id)
        completions = sample(self.rollout, ids.to(engines.device()), mask.to(engines.device()), self.sampling,
                             self.eos_ids, self.tokenizer.pad_token_id)
        repeat, size = args.num_generations, args.per_device_train_batch_size  # generate puts a prompt's samples in a row
        prompts = [p for p in prompts for _ in range(repeat)]
        teacher_prompts = [p for p in teacher_prompts for _ in range(repeat)]
        batches = [self.micro_batch(prompts[i:i + size], teacher_prompts[i:i + size], completions.ids[i:i + size],
                                    completions.mask[i:i + size], completions.truncated[i:i + size])
                   for i in range(0, len(prompts), size)]
        if args.reuses_rollouts:
            for batch in batches:
                batch.rollout_logprobs = self._rollout_logprobs(batch)
        return batches * args.num_iterations

    def reference_round(self) -> list[MicroBatch]:
        """SFT: this rank's rows of the next optimizer step, prompt + reference completion, cut into micro-batches
        (the teacher prompt is the prompt, unused)."""
        rows = self.sampler.next_round()
        self.prompts_truncated += len(self.prompts.truncated_rows.intersection(rows))
        size = self.args.per_device_train_batch_size
        batches = []
        for part in (rows[i:i + size] for i in range(0, len(rows), size)):
            prompts = [self.prompts.prompt_ids[i] for i in part]
            ids, _ = right_pad([self.completions[i] for i in part], self.tokenizer.pad_token_id)
            mask, truncated = completion_mask(ids, self.eos_ids)  # up to the first EOS, as for sampled completions
            batches.append(self.micro_batch(prompts, prompts, ids, mask, truncated))
        return batches

    def micro_batch(self, prompts, teacher_prompts, completion_ids, completion_mask, truncated) -> MicroBatch:
        """Completions (right-padded, with their masks) after both prompts, under this run's settings. SFT trains on
        every completion token: skipping the first ones is SDFT's (the paper's) choice, not standard SFT's."""
        return micro_batch(prompts, teacher_prompts, completion_ids, completion_mask, truncated,
                           pad_id=self.tokenizer.pad_token_id,
                           num_loss_tokens_to_skip=0 if self.sft else self.args.num_loss_tokens_to_skip,
                           rollout_step=self.step, device=engines.device())

    def _step_loss_tokens(self, micro_batches: list[MicroBatch]) -> float:
        """Loss tokens of the whole optimizer step on all ranks (token normalisation only; one all-reduce)."""
        if self.args.loss_normalization != "token":
            return 0.0
        return float(engines.all_reduce_sum(torch.tensor(loss_tokens(micro_batches), device=engines.device())))

    def _token_weights(self, batch: MicroBatch, step_loss_tokens: float) -> torch.Tensor:
        return token_weights(batch, self.args.loss_normalization, self.world_size,
                             self.args.gradient_accumulation_steps, step_loss_tokens)

    def _teacher_hidden(self, batch: MicroBatch) -> torch.Tensor:
        """Teacher hidden states at the completion tokens (no autograd): [N, H_T]."""
        with torch.no_grad():
            hidden = self.teacher(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_start,
                                  batch.completion_ids.shape[1])
        return hidden[batch.selected]

    def _teacher_weight(self) -> torch.Tensor | None:
        """The teacher's output weight, gathered once and kept until the teacher changes (an EMA sync), instead of
        once per micro-batch; None for a live teacher, which shares the student's (gathered by the head)."""
        if engines.output_weight(self.teacher) is engines.output_weight(self.student):  # live, LoRA without ref_model
            return None
        if self._teacher_head is None:
            self._teacher_head = engines.full_copy(engines.output_weight(self.teacher))
        return self._teacher_head

    def _student_head(self, batch: MicroBatch, head_fn, **head_kwargs) -> tuple:
        """The student's forward on a micro-batch with `head_fn(hidden, output weight, **head_kwargs)` as its output
        layer, on the selected completion tokens. The head runs inside the engine's forward because ZeRO-3 gathers
        the output weight for a module's forward and backward only (see engines.OutputHead); logits never exist."""
        return self.student(batch.input_ids, batch.attention_mask, batch.start, batch.completion_ids.shape[1],
                            token_mask=batch.selected, head_fn=head_fn, head_kwargs=head_kwargs)

    def _divergence(self, batch: MicroBatch, teacher_hidden: torch.Tensor, weights: torch.Tensor,
                    stale: bool = False) -> DivergenceOutput:
        """The training divergence of a micro-batch (with gradient unless under no_grad); the importance ratio
        applies when the completions were sampled by an earlier policy."""
        args = self.args
        return DivergenceOutput(*self._student_head(
            batch, _head_divergence, teacher_hidden=teacher_hidden, teacher_weight=self._teacher_weight(),
            token_weights=weights, target_ids=batch.completion_ids[batch.selected],
            rollout_logprobs=batch.rollout_logprobs[batch.selected] if stale and batch.rollout_logprobs is not None
            else None, is_clip=args.distillation_is_clip, alpha=args.distillation_alpha, temperature=args.temperature,
            mode=args.distillation_mode, top_k=args.distillation_topk, add_tail=args.distillation_add_tail,
            chunked=args.divergence_impl == "chunked", token_chunk=args.divergence_token_chunk,
            vocab_chunk=args.divergence_vocab_chunk, student_head=self.heads[0], teacher_head=self.heads[1]))

    def _cross_entropy(self, batch: MicroBatch, weights: torch.Tensor) -> DivergenceOutput:
        """SFT's loss of a micro-batch: Σ weight·(−log S(reference token)), fused into the student's output layer
        as the divergence is (temperature 1: standard SFT); its per_token is the cross-entropy."""
        args = self.args
        return DivergenceOutput(*self._student_head(
            batch, linear_cross_entropy, target_ids=batch.completion_ids[batch.selected], token_weights=weights,
            head=self.heads[0], chunked=args.divergence_impl == "chunked", token_chunk=args.divergence_token_chunk,
            vocab_chunk=args.divergence_vocab_chunk))

    def _rollout_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        """log S(completion token) under the policy that sampled it, for the importance ratio on reuse."""
        with torch.no_grad():
            (logprobs,) = self._student_head(batch, _head_logprobs, target_ids=batch.completion_ids[batch.selected],
                                             temperature=self.args.temperature, head=self.heads[0],
                                             token_chunk=self.args.divergence_token_chunk,
                                             vocab_chunk=self.args.divergence_vocab_chunk)
        full = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=logprobs.device)
        full[batch.selected] = logprobs
        return full

    def _sync_teacher(self) -> None:
        """EMA every teacher_sync_steps optimizer steps; a step fp16 skipped on overflow moved no weight, so the
        teacher is not moved towards it either."""
        if self.ema is not None and self.step % self.args.teacher_sync_steps == 0 and self.step_applied:
            self.ema.update(self.args.teacher_update_rate)
            self.teacher_syncs += 1
            self._teacher_head = None

    # ------------------------------------------------------------ evaluation

    def heldout_divergence(self, dataset, completion_column: str = "answer") -> float:
        """Mean per-token divergence (the training one) on fixed completions: prompt/teacher_prompt + the
        dataset's reference completion, teacher-forced. Deterministic, so comparable across steps."""
        if self.sft:
            raise ValueError("heldout_divergence needs a teacher, and method='sft' has none; compare SFT and SDFT "
                             "models with sdft-eval (python -m sdft_ds.evaluate) instead.")
        dataset = with_teacher_prompts(load_prompt_dataset(dataset), self.args.teacher_prompt_template)
        prompts = tokenize_prompts(dataset, self.tokenizer, self.args.max_prompt_length,
                                   self.args.max_teacher_prompt_length, self.args.chat_template_kwargs)
        eos = self.tokenizer.eos_token_id
        answers = [self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.args.max_completion_length - 1]
                   + [eos] for text in dataset[completion_column]]
        ids, mask = right_pad(answers, self.tokenizer.pad_token_id)
        batch = self.micro_batch(prompts.prompt_ids, prompts.teacher_prompt_ids, ids, mask,
                                 torch.zeros(len(answers), dtype=torch.bool))
        weights = batch.loss_mask.float()[batch.selected]
        with torch.no_grad():
            out = self._divergence(batch, self._teacher_hidden(batch), weights)
        return float(out.loss) / max(float(weights.sum()), 1.0)

    # ------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None) -> str:
        """A Hugging Face checkpoint (consolidated 16-bit weights, config, tokenizer); all ranks must call it.
        LoRA: the adapter in PEFT's format (PeftModel.from_pretrained(base, output_dir)), and with
        save_merged_model the base with the adapter merged in, in <output_dir>/merged."""
        output_dir = output_dir or self.args.output_dir
        self._check_student_finite("exported")
        lm = engines.language_model(self.student)
        if self.peft is None:
            state = engines.consolidated_state_dict(self.student)
            if self.rank == 0:
                checkpoint.write_pretrained(lm, state, self.tokenizer, output_dir)
        else:
            adapter = lora.adapter_state_dict(self.peft, self.rank)
            if self.rank == 0:
                checkpoint.write_adapter(self.peft, lora.STUDENT_ADAPTER, adapter, self.tokenizer, output_dir)
            if self.args.save_merged_model:
                merged = lora.merged_state_dict(self.student, self.rank)
                if self.rank == 0:
                    checkpoint.write_pretrained(lm, merged, self.tokenizer, str(Path(output_dir) / "merged"))
        engines.barrier()
        return output_dir

    def save_checkpoint(self) -> str:
        """A resumable checkpoint; all ranks must call it. DeepSpeed saves the student engine (weights, optimizer,
        scheduler); each rank saves what DeepSpeed does not know: step, prompt position, rollouts not yet trained
        on, RNG states and the EMA teacher's partitions. Once every rank's files are on disk, the checkpoint is
        marked complete (`checkpoint.COMPLETE`, with the run's fingerprint); resume accepts nothing else."""
        self._check_student_finite("saved")
        directory = Path(self.args.output_dir) / "checkpoints"
        tag = f"step-{self.step}"
        state = {"step": self.step, "teacher_syncs": self.teacher_syncs, "sampler": self.sampler.state_dict(),
                 "prompts_truncated": (self.prompts_truncated, self.teacher_prompts_truncated),
                 "queue": [batch.state_dict() for batch in self.queue], "rng": checkpoint.rng_state(),
                 "ema": None if self.ema is None else self.ema.state_dict(),
                 "tracking": self.tracking_state}  # rank 0's: the W&B run a resumed run continues
        try:
            checkpoint.save_state(state, directory / tag / checkpoint.STATE_FILE.format(rank=self.rank))
            problem = None
        except (OSError, RuntimeError) as error:  # the ranks agree before DeepSpeed's save and its collectives
            problem = checkpoint.write_failure(directory / tag, error)
        self._together(problem, OSError)
        try:
            engines.save_checkpoint(self.student, str(directory), tag, trained_only=self.peft is not None)
        except (OSError, RuntimeError) as error:  # e.g. a full disk: torch.save says only "unexpected pos ..."
            raise OSError(checkpoint.write_failure(directory / tag, error)) from error
        engines.barrier()  # every rank's files are written
        if self._writes_checkpoints():
            checkpoint.mark_complete(directory / tag, {"step": self.step, "world_size": self.world_size,
                                                       "fingerprint": self.fingerprint})
            if self.args.save_total_limit:  # each node prunes its own disk
                checkpoint.prune(directory, self.args.save_total_limit, saved=tag)
        engines.barrier()  # no rank leaves (or exits on a stop signal) before the checkpoint is complete
        return str(directory / tag)

    def _check_student_finite(self, what: str) -> None:
        bad = engines.nonfinite_parameter(self.student)
        self._together(None if bad is None else f"The student's weights hold NaN or inf ({bad}) after step "
                       f"{self.step}; they are not {what}. The last checkpoint is intact: resume from it with a lower "
                       "learning_rate.", FloatingPointError)

    def _resume(self, directory: Path, tag: str, record: dict) -> None:
        engines.load_checkpoint(self.student, str(directory), tag, trained_only=self.peft is not None)
        state = record["state"]
        self.step, self.teacher_syncs = state["step"], state["teacher_syncs"]
        self.prompts_truncated, self.teacher_prompts_truncated = state["prompts_truncated"]
        self.sampler.load_state_dict(state["sampler"])
        self.tracking_state = state.get("tracking") or {}  # checkpoints before it was kept have none
        self.queue = [MicroBatch.from_state_dict(b, engines.device()) for b in state["queue"]]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self._teacher_head = None
        checkpoint.set_rng_state(state["rng"])

    def push_to_hub(self, repo_id: str | None = None) -> str:
        """Save the model, then upload it from rank 0."""
        output_dir = self.save_model()
        repo_id = repo_id or self.args.hub_model_id
        if repo_id is None:
            raise ValueError("push_to_hub needs a repository: set hub_model_id or pass repo_id.")
        if self.rank == 0:
            checkpoint.upload(output_dir, repo_id, private=self.args.hub_private_repo)
        engines.barrier()
        return repo_id
