"""SDFTTrainer: rollout → teacher forward → student forward and divergence → backward/step → teacher sync → log.

    trainer = SDFTTrainer(model=student, ref_model=teacher, args=SDFTConfig(...), processing_class=tokenizer,
                          train_dataset=dataset)
    trainer.train(); trainer.save_model()

Everything that can be checked without a model (config, tokenizer, every dataset row) is checked before an
engine is built.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.integrations.deepspeed import set_hf_deepspeed_config

from sdft_ds import checkpoint, engines, models
from sdft_ds.config import SDFTConfig
from sdft_ds.data import PromptSampler, left_pad, load_prompt_dataset, tokenize_prompts, with_teacher_prompts
from sdft_ds.divergence import DivergenceOutput, linear_divergence, target_logprobs
from sdft_ds.rollout import build_rollout, loss_mask, split_completions
from sdft_ds.tracking import PHASES, PhaseClock, logger, make_tracker


@dataclass
class MicroBatch:
    """One micro-batch of completions with both prompts; `start` is the column of the first completion token."""

    input_ids: torch.Tensor  # (B, P + C) [left-padded prompt | completion]
    attention_mask: torch.Tensor
    start: int
    teacher_input_ids: torch.Tensor  # (B, P_T + C) [left-padded teacher prompt | completion]
    teacher_attention_mask: torch.Tensor
    teacher_start: int
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C) tokens up to and including the first EOS
    loss_mask: torch.Tensor  # (B, C) completion_mask less the skipped leading tokens
    truncated: torch.Tensor  # (B,) no EOS within max_completion_length
    rollout_step: int  # optimizer steps done when the completions were sampled
    rollout_logprobs: torch.Tensor | None = None  # (B, C) log S at rollout time, when rollouts are reused


def _head_divergence(hidden, weight, teacher_hidden, teacher_weight, token_weights, **kwargs):
    """The student's output head: divergence against the teacher; a live teacher shares the student's weight."""
    teacher_weight = weight.detach() if teacher_weight is None else teacher_weight
    return linear_divergence(hidden, weight, teacher_hidden, teacher_weight, token_weights, **kwargs)


def _head_logprobs(hidden, weight, target_ids, **kwargs):
    """log S(target) without gradient."""
    return (target_logprobs(hidden, weight, target_ids, **kwargs),)


def _ships_tokenizer(name_or_path: str) -> bool:
    """A local folder without tokenizer files would load as an empty tokenizer; hub names are checked."""
    path = Path(name_or_path)
    if not path.is_dir():
        return not path.exists()
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _architecture_key(config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    return {k: getattr(config, k, None) for k in keys}


class SDFTTrainer:
    """Self-Distillation Fine-Tuning on DeepSpeed ZeRO-3 (API of TRL's `SDFTTrainer`)."""

    def __init__(self, model, ref_model=None, args: SDFTConfig | None = None, processing_class=None,
                 train_dataset=None):
        self.args = args = args if args is not None else SDFTConfig()
        if train_dataset is None:
            raise ValueError("train_dataset is required: rows with 'prompt' and 'teacher_prompt'.")
        if args.teacher_mode == "live" and ref_model is not None:
            raise ValueError("teacher_mode='live' makes the current student its own teacher; drop ref_model or "
                             "choose teacher_mode='frozen' or 'ema'.")
        self.tokenizer = processing_class if processing_class is not None else self._load_tokenizer(model)
        dataset = with_teacher_prompts(load_prompt_dataset(train_dataset), args.teacher_prompt_template)
        self.prompts = tokenize_prompts(dataset, self.tokenizer, args.max_prompt_length,
                                        args.max_teacher_prompt_length, args.chat_template_kwargs)
        student_config = self._model_config(model)
        teacher_config = self._model_config(ref_model) if ref_model is not None else student_config
        self._check_pair(student_config, teacher_config, ref_model)
        # how each output layer makes logits (refusing what the fused head cannot reproduce); a live teacher is the
        # student
        self.heads = (models.logit_transform(student_config), models.logit_transform(teacher_config))

        self.resume_from = self._checkpoint_to_resume(args.resume_from_checkpoint)

        self.rank, self.world_size = engines.init_distributed()
        if self.resume_from is not None:
            self._check_resume_world_size(*self.resume_from)
        torch.manual_seed(args.seed)
        self.sampler = PromptSampler(len(self.prompts), args.prompts_per_generation, self.rank, self.world_size,
                                     args.seed)
        steps_per_round = args.steps_per_generation * args.num_iterations // args.gradient_accumulation_steps
        self.total_steps = args.max_steps if args.max_steps > 0 else max(
            1, math.ceil(args.num_train_epochs * self.sampler.rounds_per_epoch * steps_per_round))

        self._student_ds = student_ds = engines.fill_ds_config(args.student_ds_config_path(), args, self.world_size,
                                                               student_config.hidden_size, self.total_steps)
        student_lm = engines.load_causal_lm(model, student_ds, args.model_init_kwargs, args.attn_implementation)
        models.check_output_layer(student_lm)
        if args.disable_dropout:
            models.disable_dropout(student_lm)
        self.student = engines.build_student_engine(student_lm, student_ds, args, self.total_steps)
        self.ema: engines.TeacherEMA | None = None
        self.teacher = self._build_teacher(ref_model, model, teacher_config)
        self.eos_ids = models.eos_ids(self.tokenizer, student_lm, engines.language_model(self.teacher))
        set_hf_deepspeed_config(student_ds)  # transformers holds it by weak reference: self._student_ds keeps it

        generator = self.teacher if args.generate_from_teacher else self.student
        self.rollout = build_rollout(generator, args.rollout_path, self.tokenizer, self.eos_ids,
                                     self.tokenizer.pad_token_id, self.world_size,
                                     engines.hybrid_engine_enabled(generator), args.compile_generation)
        self.sampling = SamplingConfig(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                                       top_p=args.top_p, top_k=args.top_k,
                                       n_samples_per_prompt=args.num_generations)
        torch.manual_seed(args.seed + self.rank)  # ranks sample different completions
        self.step = 0
        self.teacher_syncs = 0
        self.queue: list[MicroBatch] = []
        self.prompts_truncated = 0
        self.teacher_prompts_truncated = 0
        self.stop_signal = 0  # the signal that stopped train() early, after saving a checkpoint
        self.window = StepStats()  # loss metrics of the steps since the last log
        self._teacher_head: torch.Tensor | None = None  # see _teacher_weight

    # ------------------------------------------------------------ construction helpers

    @staticmethod
    def _load_tokenizer(model):
        if isinstance(model, PreTrainedModel):
            raise ValueError("processing_class (the tokenizer) is required when model is a model object.")
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _model_config(self, model):
        if isinstance(model, PreTrainedModel):
            return model.config
        return AutoConfig.from_pretrained(str(model), **(self.args.model_init_kwargs or {}).get("config_kwargs", {}))

    def _check_pair(self, student_config, teacher_config, ref_model) -> None:
        if teacher_config.vocab_size != student_config.vocab_size:
            raise ValueError(f"Student and teacher vocabularies differ ({student_config.vocab_size} vs "
                             f"{teacher_config.vocab_size} rows): the divergence compares distributions over the "
                             "same tokens. Use a teacher that shares the student's tokenizer.")
        if len(self.tokenizer) > student_config.vocab_size:
            raise ValueError(f"The tokenizer has {len(self.tokenizer)} tokens but the model only "
                             f"{student_config.vocab_size} embedding rows; pass the model's own tokenizer.")
        if isinstance(ref_model, str) and _ships_tokenizer(ref_model):
            if AutoTokenizer.from_pretrained(ref_model).get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(f"The teacher {ref_model!r} ships a different tokenizer from the student's; SDFT "
                                 "needs one shared vocabulary.")
        if self.args.teacher_mode == "ema" and _architecture_key(teacher_config) != _architecture_key(student_config):
            raise ValueError(f"teacher_mode='ema' averages student weights into the teacher, so both need one "
                             f"architecture; student {_architecture_key(student_config)} vs teacher "
                             f"{_architecture_key(teacher_config)}. Use teacher_mode='frozen' or drop ref_model.")

    def _build_teacher(self, ref_model, model, teacher_config):
        """Frozen/EMA: a separate inference engine. Without ref_model it starts as a copy of the student."""
        args = self.args
        if args.teacher_mode == "live":
            return self.student
        teacher_ds = engines.fill_ds_config(args.teacher_ds_config_path(engines.zero_stage(self._student_ds)), args,
                                            self.world_size,
                                            teacher_config.hidden_size, self.total_steps)
        if ref_model is not None:
            lm = engines.load_causal_lm(ref_model, teacher_ds, args.model_init_kwargs, args.attn_implementation)
        else:
            set_hf_deepspeed_config(teacher_ds)
            lm = AutoModelForCausalLM.from_config(teacher_config, dtype=engines.model_dtype(teacher_ds),
                                                  attn_implementation=args.attn_implementation
                                                  or engines.default_attn_implementation())
        models.check_output_layer(lm)
        if args.disable_dropout:
            models.disable_dropout(lm)
        teacher = engines.build_teacher_engine(lm, teacher_ds)
        if ref_model is None:
            engines.copy_weights(teacher, self.student)
        if args.teacher_mode == "ema":
            if engines.architecture(teacher) != engines.architecture(self.student):
                raise ValueError("teacher_mode='ema' needs the teacher's parameters to match the student's one to one.")
            self.ema = engines.TeacherEMA(teacher, self.student)
        self._teacher_ds = teacher_ds
        return teacher

    # ------------------------------------------------------------ the loop

    def train(self, resume_from_checkpoint: str | None = None) -> dict[str, float]:
        """Run to `total_steps`, or until SIGTERM/SIGUSR1: then save a checkpoint, set `stop_signal` and return."""
        args = self.args
        if resume_from_checkpoint is not None:
            self.resume_from = self._checkpoint_to_resume(resume_from_checkpoint)
            self._check_resume_world_size(*self.resume_from)
        if self.resume_from is not None:
            self._resume(*self.resume_from)
            self.resume_from = None
        tracker = make_tracker(args, self.rank, self.total_steps, asdict(args))
        local, total = engines.numel(self.student)
        tracker.info(f"student: {total:,} parameters, {local:,} on rank 0; {self.world_size} rank(s); "
                     f"generation: {self.rollout.name}; optimizer steps {self.step} -> {self.total_steps}")
        with checkpoint.StopSignals() as stop:
            metrics = self._loop(tracker, stop)
        tracker.close()
        return metrics

    def _loop(self, tracker, stop: checkpoint.StopSignals) -> dict[str, float]:
        args = self.args
        metrics: dict[str, float] = {}
        while self.step < self.total_steps:
            learning_rate = engines.learning_rate(self.student)  # the rate this step uses
            self.window.add_step(self.train_step())
            tracker.advance(self.step)
            if self.step % args.logging_steps == 0 or self.step == self.total_steps:
                metrics = self.window.reduce(self.world_size)
                metrics.update(learning_rate=learning_rate, teacher_syncs=self.teacher_syncs,
                               prompts_truncated=self.prompts_truncated,
                               teacher_prompts_truncated=self.teacher_prompts_truncated)
                tracker.log(metrics, self.step)
                self.window = StepStats()
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
        return metrics

    def train_step(self) -> dict[str, float]:
        """One optimizer step, the recipe of SDFT: rollout (when no generated batch is left) → per micro-batch
        teacher forward → student forward with the fused divergence → backward → optimizer step; then the teacher
        sync. Returns this rank's seconds per phase (`PHASES`), `step` (their wall-clock total), `tokens` (prompt
        + completion tokens trained, padding excluded), `completion_tokens` and `completions`; the loss metrics go
        to `self.window`."""
        args = self.args
        tokens = completion_tokens = completions = 0.0
        with PhaseClock(engines.synchronize) as clock:
            if not self.queue:
                with clock("generation"):
                    self.queue = self._generate_round()
            micro_batches = [self.queue.pop(0) for _ in range(args.gradient_accumulation_steps)]
            token_count = self._global_loss_tokens(micro_batches)
            for batch in micro_batches:
                with clock("teacher_forward"):
                    teacher_hidden = self._teacher_hidden(batch)
                with clock("student_forward"):
                    out = self._student_divergence(batch, teacher_hidden, token_count)
                with clock("backward"):
                    self.student.backward(out.loss)
                with clock("optimizer_step"):
                    self.student.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
                self.window.add(batch, out, args.distillation_is_clip)
                tokens += float(batch.attention_mask.sum())
                completion_tokens += float(batch.completion_mask.sum())
                completions += batch.completion_ids.shape[0]
            self.step += 1
            with clock("teacher_sync"):
                self._sync_teacher()
        return {**clock.seconds, "tokens": tokens, "completion_tokens": completion_tokens, "completions": completions}

    def _generate_round(self) -> list[MicroBatch]:
        """Sample completions for one round of prompts and cut them into micro-batches (× num_iterations)."""
        args = self.args
        rows = self.sampler.next_round()
        prompts = [self.prompts.prompt_ids[i] for i in rows]
        teacher_prompts = [self.prompts.teacher_prompt_ids[i] for i in rows]
        self.prompts_truncated += len(self.prompts.truncated_rows.intersection(rows))
        self.teacher_prompts_truncated += len(self.prompts.truncated_teacher_rows.intersection(rows))
        conditioning = teacher_prompts if args.generate_from_teacher else prompts
        ids, mask = left_pad(conditioning, self.tokenizer.pad_token_id)
        device = engines.device()
        request = RolloutRequest(ids.to(device), mask.to(device))
        completions = split_completions(self.rollout.generate(request, self.sampling), self.eos_ids,
                                        self.tokenizer.pad_token_id)
        repeat = args.num_generations
        prompts = [p for p in prompts for _ in range(repeat)]
        teacher_prompts = [p for p in teacher_prompts for _ in range(repeat)]
        size = args.per_device_train_batch_size
        batches = [self._micro_batch(prompts[i:i + size], teacher_prompts[i:i + size],
                                     completions.ids[i:i + size], completions.mask[i:i + size],
                                     completions.truncated[i:i + size])
                   for i in range(0, len(prompts), size)]
        if args.reuses_rollouts:
            for batch in batches:
                batch.rollout_logprobs = self._rollout_logprobs(batch)
        return batches * args.num_iterations

    def _micro_batch(self, prompts, teacher_prompts, completion_ids, completion_mask, truncated) -> MicroBatch:
        width = int(completion_mask.sum(-1).max())
        completion_ids, completion_mask = completion_ids[:, :width], completion_mask[:, :width]
        device = engines.device()

        def join(rows):
            ids, mask = left_pad(rows, self.tokenizer.pad_token_id)
            return (torch.cat([ids.to(device), completion_ids.to(device)], 1),
                    torch.cat([mask.to(device), completion_mask.to(device)], 1), ids.shape[1])

        input_ids, attention_mask, start = join(prompts)
        teacher_input_ids, teacher_attention_mask, teacher_start = join(teacher_prompts)
        return MicroBatch(input_ids, attention_mask, start, teacher_input_ids, teacher_attention_mask,
                          teacher_start, completion_ids.to(device), completion_mask.to(device),
                          loss_mask(completion_mask, self.args.num_loss_tokens_to_skip).to(device), truncated,
                          self.step)

    def _global_loss_tokens(self, micro_batches: list[MicroBatch]) -> float:
        """Loss tokens of the whole optimizer step over all ranks (token normalisation); one all-reduce."""
        if self.args.loss_normalization != "token":
            return 0.0
        count = torch.tensor(float(sum(int(b.loss_mask.sum()) for b in micro_batches)), device=engines.device())
        return float(engines.all_reduce_sum(count))

    def _token_weights(self, batch: MicroBatch, token_count: float) -> torch.Tensor:
        """Per-token weights folding mask and reduction; DeepSpeed then divides by accumulation steps and
        averages over ranks."""
        mask = batch.loss_mask.float()
        if self.args.loss_normalization == "sequence":
            per_sequence = mask.sum(-1, keepdim=True).clamp(min=1)
            weights = mask / per_sequence / mask.shape[0]
        else:
            scale = self.world_size * self.args.gradient_accumulation_steps / max(token_count, 1.0)
            weights = mask * scale
        return weights[batch.completion_mask.bool()]

    def _divergence_kwargs(self) -> dict:
        args = self.args
        return dict(alpha=args.distillation_alpha, temperature=args.temperature, mode=args.distillation_mode,
                    top_k=args.distillation_topk, add_tail=args.distillation_add_tail, student_head=self.heads[0],
                    teacher_head=self.heads[1],
                    chunked=args.divergence_impl == "chunked", token_chunk=args.divergence_token_chunk,
                    vocab_chunk=args.divergence_vocab_chunk)

    def _teacher_hidden(self, batch: MicroBatch) -> torch.Tensor:
        """Teacher hidden states at the completion tokens (no autograd): [N, H_T]."""
        with torch.no_grad():
            hidden = self.teacher(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_start,
                                  batch.completion_ids.shape[1])
        return hidden[batch.completion_mask.bool()]

    def _teacher_weight(self) -> torch.Tensor | None:
        """The teacher's output weight, gathered once and kept until the teacher changes (an EMA sync), instead of
        once per micro-batch; None for a live teacher, which shares the student's (gathered by the head)."""
        if self.teacher is self.student:
            return None
        if self._teacher_head is None:
            self._teacher_head = engines.full_copy(engines.output_weight(self.teacher))
        return self._teacher_head

    def _student_divergence(self, batch: MicroBatch, teacher_hidden: torch.Tensor,
                            token_count: float) -> DivergenceOutput:
        """The student's forward with the divergence fused into its output head (logits never materialised)."""
        selected = batch.completion_mask.bool()
        stale = batch.rollout_logprobs is not None and self.step > batch.rollout_step
        head_kwargs = dict(
            teacher_hidden=teacher_hidden, teacher_weight=self._teacher_weight(),
            token_weights=self._token_weights(batch, token_count),
            target_ids=batch.completion_ids[selected],
            rollout_logprobs=batch.rollout_logprobs[selected] if stale else None,
            is_clip=self.args.distillation_is_clip, **self._divergence_kwargs())
        return DivergenceOutput(*self.student(batch.input_ids, batch.attention_mask, batch.start,
                                              batch.completion_ids.shape[1], token_mask=selected,
                                              head_fn=_head_divergence, head_kwargs=head_kwargs))

    def _rollout_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        """log S(completion token) under the policy that sampled it, for the importance ratio on reuse."""
        selected = batch.completion_mask.bool()
        kwargs = dict(target_ids=batch.completion_ids[selected], temperature=self.args.temperature,
                      head=self.heads[0], token_chunk=self.args.divergence_token_chunk,
                      vocab_chunk=self.args.divergence_vocab_chunk)
        with torch.no_grad():
            (logprobs,) = self.student(batch.input_ids, batch.attention_mask, batch.start,
                                       batch.completion_ids.shape[1], token_mask=selected,
                                       head_fn=_head_logprobs, head_kwargs=kwargs)
        full = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=logprobs.device)
        full[selected] = logprobs
        return full

    def _sync_teacher(self) -> None:
        """EMA every teacher_sync_steps optimizer steps; a step fp16 skipped on overflow moved no weight, so the
        teacher is not moved towards it either."""
        if self.ema is not None and self.step % self.args.teacher_sync_steps == 0 and engines.step_applied(self.student):
            self.ema.update(self.args.teacher_update_rate)
            self.teacher_syncs += 1
            self._teacher_head = None

    # ------------------------------------------------------------ evaluation

    def heldout_divergence(self, dataset, completion_column: str = "answer") -> float:
        """Mean per-token divergence (the training one) on fixed completions: prompt/teacher_prompt + the
        dataset's reference completion, teacher-forced. Deterministic, so comparable across steps."""
        dataset = with_teacher_prompts(load_prompt_dataset(dataset), self.args.teacher_prompt_template)
        prompts = tokenize_prompts(dataset, self.tokenizer, self.args.max_prompt_length,
                                   self.args.max_teacher_prompt_length, self.args.chat_template_kwargs)
        eos = self.tokenizer.eos_token_id
        answers = [self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.args.max_completion_length - 1]
                   + [eos] for text in dataset[completion_column]]
        ids, mask = left_pad([a[::-1] for a in answers], self.tokenizer.pad_token_id)
        ids, mask = ids.flip(1), mask.flip(1)  # right-padded completions
        batch = self._micro_batch(prompts.prompt_ids, prompts.teacher_prompt_ids, ids, mask,
                                  torch.zeros(len(answers), dtype=torch.bool))
        selected = batch.completion_mask.bool()
        weights = batch.loss_mask.float()[selected]
        head_kwargs = dict(teacher_hidden=self._teacher_hidden(batch), token_weights=weights,
                           teacher_weight=self._teacher_weight(), **self._divergence_kwargs())
        with torch.no_grad():
            out = DivergenceOutput(*self.student(batch.input_ids, batch.attention_mask, batch.start, ids.shape[1],
                                                 token_mask=selected, head_fn=_head_divergence,
                                                 head_kwargs=head_kwargs))
        return float(out.loss) / max(float(weights.sum()), 1.0)

    # ------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None) -> str:
        """A Hugging Face checkpoint (consolidated 16-bit weights, config, tokenizer); all ranks must call it."""
        output_dir = output_dir or self.args.output_dir
        state = engines.consolidated_state_dict(self.student)
        if self.rank == 0:
            checkpoint.write_pretrained(engines.language_model(self.student), state, self.tokenizer, output_dir)
        engines.barrier()
        return output_dir

    def save_checkpoint(self) -> str:
        """A resumable checkpoint; all ranks must call it. DeepSpeed saves the student engine (weights, optimizer,
        scheduler); each rank saves what DeepSpeed does not know: step, prompt position, rollouts not yet trained
        on, RNG states and the EMA teacher's partitions. DeepSpeed writes `latest` last."""
        directory = Path(self.args.output_dir) / "checkpoints"
        tag = f"step-{self.step}"
        state = {"step": self.step, "teacher_syncs": self.teacher_syncs, "sampler": self.sampler.state_dict(),
                 "prompts_truncated": (self.prompts_truncated, self.teacher_prompts_truncated),
                 "queue": [_to_cpu(asdict(batch)) for batch in self.queue], "rng": _rng_state(),
                 "ema": None if self.ema is None else self.ema.state_dict()}
        checkpoint.save_state(state, directory / tag / checkpoint.STATE_FILE.format(rank=self.rank))
        engines.save_checkpoint(self.student, str(directory), tag)
        node_local = self.args.save_on_each_node and engines.local_rank() == 0  # each node prunes its own disk
        if self.args.save_total_limit and (self.rank == 0 or node_local):
            checkpoint.prune(directory, self.args.save_total_limit, saved=tag)
        return str(directory / tag)

    def _checkpoint_to_resume(self, spec: str | None) -> tuple[Path, str] | None:
        return None if spec is None else checkpoint.resolve(spec, self.args.output_dir)

    def _check_resume_world_size(self, directory: Path, tag: str) -> None:
        """Each rank needs its own state file and none may exist past the last rank; decided on all ranks together,
        so that they refuse as one (node-local checkpoints hold only their node's files)."""
        folder = directory / tag
        mine = (folder / checkpoint.STATE_FILE.format(rank=self.rank)).is_file()
        beyond = (folder / checkpoint.STATE_FILE.format(rank=self.world_size)).is_file()
        if engines.max_over_ranks(float(beyond or not mine)):
            saved = len(list(folder.glob(checkpoint.STATE_FILE.format(rank="*"))))
            raise ValueError(f"{folder} holds the state of {saved} rank(s) (on rank {self.rank}'s disk) and this run "
                             f"has {self.world_size}: rollouts, RNG streams and ZeRO-3 partitions are per rank. Resume "
                             "with the number of ranks that saved it.")

    def _resume(self, directory: Path, tag: str) -> None:
        engines.load_checkpoint(self.student, str(directory), tag)
        state = checkpoint.load_state(directory / tag / checkpoint.STATE_FILE.format(rank=self.rank))
        self.step, self.teacher_syncs = state["step"], state["teacher_syncs"]
        self.prompts_truncated, self.teacher_prompts_truncated = state["prompts_truncated"]
        self.sampler.load_state_dict(state["sampler"])
        device = engines.device()
        self.queue = [MicroBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()})
                      for b in state["queue"]]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self._teacher_head = None
        _set_rng_state(state["rng"])

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


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_cpu(fields: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}


class StepStats:
    """Sums, minima and maxima of one logging window, reduced over ranks with three collectives."""

    SUMS = ("loss", "micro_batches", "divergence", "entropy", "loss_tokens", "length", "completions", "truncated",
            "ratio", "ratio_tokens", "ratio_clipped", "step", "tokens", "steps", *PHASES)
    EXTREMES = ("length", "ratio")

    def __init__(self):
        self.sums = dict.fromkeys(self.SUMS, 0.0)
        self.mins = dict.fromkeys(self.EXTREMES, math.inf)
        self.maxs = dict.fromkeys(self.EXTREMES, -math.inf)

    def _extreme(self, name: str, values: torch.Tensor) -> None:
        self.mins[name] = min(self.mins[name], float(values.min()))
        self.maxs[name] = max(self.maxs[name], float(values.max()))

    def add_step(self, seconds: dict[str, float], steps: int = 1) -> None:
        """A step's (or a checkpoint's) phase seconds, total seconds and tokens, from `train_step`/`PhaseClock`."""
        for name in ("step", "tokens", *PHASES):
            self.sums[name] += seconds.get(name, 0.0)
        self.sums["steps"] += steps

    def add(self, batch: MicroBatch, out: DivergenceOutput, is_clip: float | None) -> None:
        loss_mask = batch.loss_mask[batch.completion_mask.bool()].double().cpu()
        lengths = batch.completion_mask.sum(-1).double().cpu()
        sums = self.sums
        sums["loss"] += float(out.loss.detach())
        sums["micro_batches"] += 1
        sums["divergence"] += float((out.per_token.double().cpu() * loss_mask).sum())
        sums["entropy"] += float((out.entropy.double().cpu() * loss_mask).sum())
        sums["loss_tokens"] += float(loss_mask.sum())
        sums["length"] += float(lengths.sum())
        sums["completions"] += len(lengths)
        sums["truncated"] += float(batch.truncated.sum())
        self._extreme("length", lengths)
        if out.ratio is not None:
            ratio = out.ratio.double().cpu()
            sums["ratio"] += float((ratio * loss_mask).sum())
            sums["ratio_tokens"] += float(loss_mask.sum())
            if is_clip is not None:
                sums["ratio_clipped"] += float(((ratio >= is_clip) * loss_mask).sum())
            self._extreme("ratio", ratio)

    def reduce(self, world_size: int) -> dict[str, float]:
        """Means over the window and all ranks. Times are per optimizer step, averaged over ranks; tokens/s is
        the prompt + completion tokens trained on all ranks per second of (mean) step time."""
        totals = engines.all_reduce_sum(torch.tensor([self.sums[k] for k in self.SUMS], dtype=torch.float64,
                                                     device=engines.device()))
        mins = engines.all_reduce_min(torch.tensor([self.mins[k] for k in self.EXTREMES], dtype=torch.float64,
                                                   device=engines.device()))
        maxs = -engines.all_reduce_min(torch.tensor([-self.maxs[k] for k in self.EXTREMES], dtype=torch.float64,
                                                    device=engines.device()))
        t = dict(zip(self.SUMS, totals.cpu().tolist()))
        low, high = dict(zip(self.EXTREMES, mins.cpu().tolist())), dict(zip(self.EXTREMES, maxs.cpu().tolist()))
        tokens, steps = max(t["loss_tokens"], 1.0), max(t["steps"], 1.0)
        metrics = {"loss": t["loss"] / t["micro_batches"], "divergence": t["divergence"] / tokens,
                   "entropy": t["entropy"] / tokens, "completion_length": t["length"] / t["completions"],
                   "completion_length_min": low["length"], "completion_length_max": high["length"],
                   "clipped_ratio": t["truncated"] / t["completions"], "step_time": t["step"] / steps,
                   "tokens_per_second": t["tokens"] / max(t["step"] / world_size, 1e-9),
                   **{f"time/{phase}": t[phase] / steps for phase in PHASES}}
        if t["ratio_tokens"]:
            metrics.update(is_ratio_mean=t["ratio"] / t["ratio_tokens"], is_ratio_min=low["ratio"],
                           is_ratio_max=high["ratio"], is_ratio_clipped=t["ratio_clipped"] / t["ratio_tokens"])
        return metrics
