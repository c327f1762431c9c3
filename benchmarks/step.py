"""One SDFT optimizer step, timed: sdft_ds against TRL's SDFTTrainer and a plain PyTorch reference; sdft_ds with a
LoRA student against sdft_ds training the whole model.

    source launch/setup_env.sh dev && pip install trl==1.16.0     # TRL is optional: without it that case is skipped
    python benchmarks/step.py                                     # CPU: sizes small, vocab152k, loss-bound;
                                                                  # cases reference, trl, sdft_ds
    python benchmarks/step.py --size small --warmup 1 --steps 1   # smoke test
    python benchmarks/step.py --cases reference,sdft_ds --sdft-configs zero3_offload.json,zero3.json
    python benchmarks/step.py --device cuda --out benchmarks/results/step_cuda.txt
    python benchmarks/step.py --size wide --cases sdft_ds,sdft_ds_lora --lora-r 16  # LoRA vs full: memory

Every case runs in a fresh process (so its peak memory is its own) on the same work: a tiny Qwen2-style model
built from a config with a fixed seed and saved once per size (student and frozen teacher load that checkpoint),
fp32, sdpa attention, forward KL(T||S) over the full vocabulary (alpha 0), temperature 1, top_p 1, top_k 0, one
completion per prompt, AdamW lr 1e-5 (weight decay 0, clipping at 1.0, linear decay), the first 64 demo prompts
tokenised by the same `tokenizer(text)` call all three trainers make. sdft_ds_lora is the sdft_ds case with
use_peft: a LoRA adapter (rank --lora-r, lora_alpha 32, every linear layer but the output layer) on the student,
which alone trains; its frozen teacher is the student's engine with the adapter disabled (no ref_model: no second
copy of the weights), the same initial model the sdft_ds case's teacher loads. The checkpoint's generation_config holds
only eos/pad ids, so no model default (repetition_penalty, top_k=50, ...) can change the sampling. The untrained
model almost never samples EOS (1 id in the vocabulary), so completions run to the limit in every case.
Definitions: s/step = median over the --steps measured steps (after --warmup steps) of the wall-clock step;
tokens/s = median of (prompt + completion tokens trained in the step, summed over the batch, padding excluded,
completion up to and including the first EOS) / step time; phases = mean seconds per measured step, "other" = step
minus the named phases (batch assembly, LR schedule, teacher sync, bookkeeping); peak = the case process's peak
RSS (ru_maxrss), on CUDA torch.cuda.max_memory_allocated (the mem/ ratios use it). time/X, mem/X: this case ÷ X,
full = the sdft_ds case with the same DeepSpeed config. trained / total params: parameters with requires_grad in
the model the case trains / all of its parameters (with LoRA, the adapter's are in both).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR  # noqa: E402  (paths only: imports no deepspeed)

# Qwen2-0.5B's shape in miniature: GQA (4 query / 2 KV heads), tied embeddings. 6.03 M parameters at vocab 8,192.
BODY = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=1024)
SIZES = {"small": dict(vocab=8192, batch=4, completion=64),
         "vocab152k": dict(vocab=151_936, batch=4, completion=64),
         "loss-bound": dict(vocab=151_936, batch=8, completion=256),  # TRL's dense loss alone peaks near 8.7 GB here
         # vocab152k's work on 2.5x its parameters: more of the peak grows with them (teacher copy, gradients, Adam
         # state: under LoRA, the adapter's only), so the LoRA/full memory gap shows (sdft_ds_lora)
         "wide": dict(vocab=151_936, batch=4, completion=64,
                      body=dict(hidden_size=512, num_hidden_layers=8, intermediate_size=2048))}
PHASES = ("generation", "teacher_forward", "student_forward", "backward", "optimizer_step")
NUM_PROMPTS, LR, SEED, GB = 64, 1e-5, 0, 1e9


class Timer:
    """Seconds per phase of the current step. CUDA is synchronised at each boundary so a phase owns its kernels."""

    def __init__(self, device: str):
        self.cuda, self.records, self.seconds, self.started = device == "cuda", [], {}, 0.0
        self.parameters = {}  # the trained model's parameter_counts, set by the case

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self.seconds, self.started = {}, self.now()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def __call__(self, name: str):
        start = self.now()
        yield
        self.add(name, self.now() - start)

    def end(self, tokens: int, completion_length: float) -> None:
        self.records.append(dict(self.seconds, step=self.now() - self.started, tokens=int(tokens),
                                 completion_length=float(completion_length)))


def parameter_counts(model) -> dict:
    """Trained (requires_grad) and all parameters; a ZeRO-3 parameter's full size is its ds_numel."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return {"trained": sum(n for n, trained in sizes if trained), "total": sum(n for n, _ in sizes)}


# ---------------------------------------------------------------- case 1: plain PyTorch + transformers, one process

def left_pad(rows, pad_id, device):
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)


def first_eos_mask(ids, eos_ids):
    """1 on completion tokens up to and including the first EOS, from positions (pad may equal an EOS id)."""
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), ids.shape[1])
    return (torch.arange(ids.shape[1], device=ids.device)[None] <= first[:, None]).long()


def completion_logits(model, prompts, completion, mask, pad_id):
    """Logits predicting each completion token after the left-padded prompts: [B, C, V]."""
    ids, prompt_mask = left_pad(prompts, pad_id, completion.device)
    ids, attention = torch.cat([ids, completion], 1), torch.cat([prompt_mask, mask], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # numbered as generate() numbers left-padded rows
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                logits_to_keep=completion.shape[1] + 1)
    return out.logits[:, :-1].float()


def forward_kl(student_logits, teacher_logits, mask):
    """SPEC 2, alpha 0, tau 1: KL(T||S) summed over the vocabulary; mean per sequence, then over sequences."""
    log_s, log_t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    per_token, mask = (log_t.exp() * (log_t - log_s)).sum(-1), mask.float()
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def run_reference(spec, timer, rows, tokenizer):
    device, batch, pad, total = spec["device"], spec["batch"], tokenizer.pad_token_id, spec["warmup"] + spec["steps"]
    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    student = AutoModelForCausalLM.from_pretrained(spec["ckpt"], **load).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(spec["ckpt"], **load).to(device).eval().requires_grad_(False)
    timer.parameters = parameter_counts(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)  # torch's default decay is 0.01
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=total)  # HF/sdft_ds "linear"
    configured = student.generation_config.eos_token_id  # EOS ids as TRL and sdft_ds take them: tokenizer's + model's
    eos = sorted({tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None})
    # Every sampling field explicit: generate() fills unset (None) fields from the model's own generation_config.
    sampling = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, num_return_sequences=1,
        max_new_tokens=spec["completion"], min_new_tokens=0, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, forced_eos_token_id=None)
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    teacher_prompts = [tokenizer(r["teacher_prompt"])["input_ids"] for r in rows]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED)).tolist()
    for step in range(total):
        timer.begin()
        picked = [order[(step * batch + i) % len(order)] for i in range(batch)]
        student_rows, teacher_rows = [prompts[i] for i in picked], [teacher_prompts[i] for i in picked]
        with timer("generation"), torch.no_grad():
            ids, attention = left_pad(student_rows, pad, device)
            completion = student.generate(input_ids=ids, attention_mask=attention, generation_config=sampling)
        mask = first_eos_mask(completion[:, ids.shape[1]:], eos)
        width = int(mask.sum(-1).max())  # right-padded completions, cut to the longest
        mask = mask[:, :width]
        completion = completion[:, ids.shape[1]:ids.shape[1] + width].masked_fill(mask == 0, pad)
        with timer("teacher_forward"), torch.no_grad():
            teacher_logits = completion_logits(teacher, teacher_rows, completion, mask, pad)
        with timer("student_forward"):
            loss = forward_kl(completion_logits(student, student_rows, completion, mask, pad), teacher_logits, mask)
        with timer("backward"):
            loss.backward()
        with timer("optimizer_step"):
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        schedule.step()
        timer.end(sum(map(len, student_rows)) + int(mask.sum()), float(mask.sum(-1).float().mean()))


# ---------------------------------------------------------------- case 2: TRL's SDFTTrainer (trl.experimental.sdft)

def run_trl(spec, timer, rows, tokenizer):
    try:
        import trl
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    except ImportError as error:
        return f"skipped: TRL is not importable ({error}); `pip install trl==1.16.0` adds this case"
    from datasets import Dataset
    from transformers import TrainerCallback
    # TRL builds the teacher prompt as template.format(prompt=..., privileged_context=...): split the demo's
    # teacher_prompt so that TRL rebuilds exactly the same string, hence the same token ids.
    template = "{prompt}\n\n{privileged_context}"
    contexts = [r["teacher_prompt"][len(r["prompt"]) + 2:] for r in rows]
    assert all(template.format(prompt=r["prompt"], privileged_context=c) == r["teacher_prompt"]
               for r, c in zip(rows, contexts))
    args = SDFTConfig(
        output_dir=spec["workdir"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        num_generations=1, max_completion_length=spec["completion"], max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="linear", seed=SEED,
        distillation_mode="full_logits", distillation_alpha=0.0,  # TRL: alpha 0 = kl_div(log S, log T) = KL(T||S)
        teacher_model_kind="base",  # frozen teacher, loaded by TRL from the student's checkpoint path
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, num_loss_tokens_to_skip=0,
        teacher_prompt_template=template, use_vllm=False, report_to="none", logging_steps=10**6,
        save_strategy="no", disable_tqdm=True, use_cpu=spec["device"] == "cpu",
        gradient_checkpointing=False, bf16=False, fp16=False,  # TRL's defaults are True, True
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "privileged_context": contexts})
    trainer = SDFTTrainer(model=spec["ckpt"], args=args, train_dataset=dataset, processing_class=tokenizer)
    timer.parameters, counts = parameter_counts(trainer.model), {}

    # TRL has no phase timer: wrap this instance's own methods (TRL's code runs unchanged).
    def wrap(owner, name, phase=None, after=None):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            chosen = phase(*a, **k) if callable(phase) else phase
            with timer(chosen) if chosen else nullcontext():
                result = original(*a, **k)
            return after(result) if after else result
        setattr(owner, name, wrapper)

    def count(batch):  # the trained batch; both masks exclude padding, completion_mask ends at the first EOS
        counts.update(tokens=int(batch["prompt_mask"].sum() + batch["completion_mask"].sum()),
                      length=float(batch["completion_mask"].sum(-1).float().mean()))
        return batch

    wrap(trainer, "_prepare_inputs", after=count)
    wrap(trainer, "_generate", "generation")
    wrap(trainer, "_forward_logits", lambda *a, **k: "teacher_forward"
         if k.get("model", a[0] if a else None) is trainer.teacher_model else None)
    wrap(trainer, "compute_loss", "_loss")  # student forward + loss = compute_loss - teacher forward
    wrap(trainer.accelerator, "backward", "backward")
    wrap(trainer, "_clip_grad_norm", "optimizer_step")

    class StepTimer(TrainerCallback):  # on_step_begin .. on_step_end: the generation is inside (training_step)
        def on_step_begin(self, *_, **__):
            timer.begin()

        def on_pre_optimizer_step(self, *_, **__):
            self.started = timer.now()

        def on_optimizer_step(self, *_, **__):
            timer.add("optimizer_step", timer.now() - self.started)

        def on_step_end(self, *_, **__):
            timer.add("student_forward", timer.seconds.pop("_loss") - timer.seconds.get("teacher_forward", 0.0))
            timer.end(counts["tokens"], counts["length"])

    trainer.add_callback(StepTimer())
    trainer.train()
    return None if trl.__version__ == "1.16.0" else f"ran TRL {trl.__version__}, not 1.16.0"


# ---------------------------------------------------------------- case 3: sdft_ds (sdft_ds_lora: with a LoRA student)

def run_sdft(spec, timer, rows, tokenizer):
    from datasets import Dataset
    from sdft_ds import SDFTConfig, SDFTTrainer
    if not hasattr(SDFTTrainer, "train_step"):
        return "skipped: this checkout's SDFTTrainer has no train_step()"
    args = SDFTConfig(
        output_dir=spec["workdir"], per_device_train_batch_size=spec["batch"], max_completion_length=spec["completion"],
        max_steps=spec["warmup"] + spec["steps"], learning_rate=LR, teacher_mode="frozen", report_to="none",
        logging_steps=10**6, deepspeed=spec["ds_config"], teacher_deepspeed=spec["teacher_config"], seed=SEED,
        attn_implementation="sdpa", distillation_alpha=0.0, distillation_mode="full", temperature=1.0, top_p=1.0,
        top_k=0, num_generations=1,
        **(dict(use_peft=True, lora_r=spec["lora_r"], lora_target_modules="all-linear") if spec["lora_r"] else {}))
    dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "teacher_prompt")})
    # RANK is unset in this process, so SDFTTrainer makes its own 1-rank process group (engines.init_distributed).
    # LoRA without ref_model: the teacher is the student's base model (adapter disabled), not a loaded copy.
    trainer = SDFTTrainer(model=spec["ckpt"], ref_model=None if spec["lora_r"] else spec["ckpt"], args=args,
                          processing_class=tokenizer, train_dataset=dataset)
    timer.parameters = parameter_counts(trainer.student.module)
    for _ in range(args.max_steps):
        timer.begin()
        phases = trainer.train_step()
        timer.seconds = {k: phases.get(k, 0.0) for k in PHASES}  # teacher_sync and checkpoint land in "other"
        timer.end(phases["tokens"], phases["completion_tokens"] / phases["completions"])
        timer.records[-1]["reported_step"] = phases["step"]  # train_step's own total, next to the wall clock
    return None


# ---------------------------------------------------------------- one case in a fresh process

def child(spec: dict) -> None:
    torch.manual_seed(SEED)
    with open(DEMO_TRAIN) as f:
        rows = [json.loads(line) for line in f][:NUM_PROMPTS]
    timer, tokenizer = Timer(spec["device"]), AutoTokenizer.from_pretrained(spec["ckpt"])
    run = {"reference": run_reference, "trl": run_trl}.get(spec["case"], run_sdft)
    result = {"note": run(spec, timer, rows, tokenizer), "records": timer.records, "parameters": timer.parameters,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}
    if spec["device"] == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / GB
    print("RESULT " + json.dumps(result), flush=True)


def run_case(spec: dict) -> dict:
    """Each case alone in a fresh process, with no launcher variables: sdft_ds then makes a 1-rank group."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["DS_ACCELERATOR"] = spec["device"]  # launch/setup_env.sh exports cpu; --device decides for every case
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not found:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        return {"note": f"failed with exit code {proc.returncode}:\n```\n{tail}\n```"}
    result = json.loads(found[-1][len("RESULT "):])
    measured = result["records"][spec["warmup"]:]
    if not measured:
        return {"note": result["note"] or "no measured step"}
    phases = {k: statistics.mean(r.get(k, 0.0) for r in measured) for k in PHASES}
    phases["other"] = statistics.mean(r["step"] - sum(r.get(k, 0.0) for k in PHASES) for r in measured)
    return dict(s_per_step=statistics.median(r["step"] for r in measured),
                tokens_per_s=statistics.median(r["tokens"] / r["step"] for r in measured),
                tokens_per_step=statistics.mean(r["tokens"] for r in measured),
                mean_completion_length=statistics.mean(r["completion_length"] for r in measured), phases=phases,
                peak_gb=result.get("peak_cuda_gb", result["peak_rss_gb"]), peak_rss_gb=result["peak_rss_gb"],
                parameters=result["parameters"], note=result["note"], records=result["records"])


# ---------------------------------------------------------------- parent: checkpoints, cases, report

def build_checkpoint(vocab: int, directory: str, body: dict) -> int:
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(SEED)
    config = Qwen2Config(vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**BODY, **body})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def table(rows: dict, device: str) -> list[str]:
    ref, trl = rows.get("reference", {}), rows.get("trl", {})
    out = [f"| case | s/step | tokens/s | peak {'CUDA' if device == 'cuda' else 'RSS'} GB | generation | teacher fwd | "
           "student fwd+loss | backward | optimizer | other | mean completion | time/ref | time/TRL | time/full | "
           "mem/ref | mem/TRL | mem/full | trained params | total params |", "|---" * 19 + "|"]
    for name, row in rows.items():
        if "s_per_step" in row:
            full = rows.get(name.replace("sdft_ds_lora[", "sdft_ds["), {}) if name.startswith("sdft_ds") else {}
            ratios = [f"{row[key] / base[key]:.2f}" if key in base else "–"
                      for key in ("s_per_step", "peak_gb") for base in (ref, trl, full)]
            cells = [f"{row['s_per_step']:.3f}", f"{row['tokens_per_s']:.0f}", f"{row['peak_gb']:.2f}",
                     *(f"{row['phases'][k]:.3f}" for k in (*PHASES, "other")), f"{row['mean_completion_length']:.1f}"]
            counts = [f"{row['parameters'][k]:,}" for k in ("trained", "total")]
            out.append(f"| {name} | " + " | ".join(cells + ratios + counts) + " |")
    return out + [f"- {name}: {row['note']}" for name, row in rows.items() if row.get("note")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small,vocab152k,loss-bound", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--cases", default="reference,trl,sdft_ds",
                        help="comma list of reference, trl, sdft_ds, sdft_ds_lora")
    parser.add_argument("--sdft-configs", "--ds-config", default="zero3_offload.json",
                        help="comma list of student DeepSpeed configs (in ds_configs/ or paths); one sdft_ds "
                             "(and sdft_ds_lora) case each")
    parser.add_argument("--lora-r", type=int, default=16, help="the sdft_ds_lora case's LoRA rank")
    parser.add_argument("--teacher-config", help="teacher DeepSpeed config (in ds_configs/ or a path); default: "
                                                 "sdft_ds's")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    parser.add_argument("--steps", type=int, default=8, help="measured steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    def resolve(name):
        return name if name is None or os.path.exists(name) else os.path.join(REPO, "ds_configs", name)

    wanted = args.cases.split(",")
    cases = {c: None for c in ("reference", "trl") if c in wanted}
    cases.update({f"{case}[{c}]": resolve(c) for case in ("sdft_ds", "sdft_ds_lora") if case in wanted
                  for c in args.sdft_configs.split(",")})
    lines, report = [], {"device": args.device, "warmup": args.warmup, "steps": args.steps, "sizes": {}}

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    for size in args.size.split(","):
        shape = SIZES[size]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "model")
            body = shape.get("body", {})
            params = build_checkpoint(shape["vocab"], ckpt, body)
            layers = {**BODY, **body}
            emit(f"\n### {size}: {params:,} parameters, vocab {shape['vocab']:,}, hidden {layers['hidden_size']} × "
                 f"{layers['num_hidden_layers']} layers, {shape['batch']} prompts × {shape['completion']} completion "
                 f"tokens per step, {args.device}\n")
            rows = {}
            for i, (case, ds_config) in enumerate(cases.items()):
                started = time.perf_counter()
                rows[case] = run_case(dict(
                    case=case, ckpt=ckpt, device=args.device, batch=shape["batch"], completion=shape["completion"],
                    warmup=args.warmup, steps=args.steps, workdir=os.path.join(tmp, f"out-{i}"), ds_config=ds_config,
                    teacher_config=resolve(args.teacher_config),
                    lora_r=args.lora_r if case.startswith("sdft_ds_lora") else None))
                print(f"  {case}: {time.perf_counter() - started:.0f} s wall", file=sys.stderr, flush=True)
            report["sizes"][size] = dict(parameters=params, **shape, cases=rows)
            for line in table(rows, args.device):
                emit(line)
    emit()
    emit(json.dumps(report))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
