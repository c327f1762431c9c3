"""CUDA checks, one process (`python tests/distributed/gpu_checks.py --out DIR --check NAME`), run by
tests/test_gpu.py on a GPU machine: an SDFT run under ZeRO-3 + CPU-Adam offload, whether DeepSpeed's
hybrid engine still fails (why it is refused), flash-attn vs sdpa divergence, an fp16 step skipped on overflow.
Writes DIR/<NAME>.json."""

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_HELDOUT, DEMO_TRAIN_CHAT, TOKENIZER_DIR
from sdft_ds.config import DS_CONFIG_DIR
from sdft_ds.data import left_pad
from sdft_ds.rollout import HFGenerateRollout, HybridEngineGenerate

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--check", required=True, choices=["train", "hybrid_engine", "flash_attention", "fp16_skip"])
parser.add_argument("--arch", default="llama")
cli = parser.parse_args()
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def model(arch: str, attn: str = "sdpa", dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                  max_position_embeddings=1024, tie_word_embeddings=arch == "qwen2")
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)


def trainer(arch: str, attn: str = "sdpa", dtype=torch.bfloat16, **settings):
    args = SDFTConfig(**{**dict(output_dir=f"{cli.out}/{cli.check}", per_device_train_batch_size=4, max_steps=4,
                                bf16=True, max_completion_length=32, learning_rate=1e-3, logging_steps=1),
                         **settings})
    return SDFTTrainer(model=model(arch, attn, dtype), ref_model=model(arch, attn, dtype), args=args,
                       processing_class=tokenizer,
                       train_dataset=str(DEMO_TRAIN_CHAT))


report: dict = {"device": torch.cuda.get_device_name()}
if cli.check == "train":
    t = trainer(cli.arch)
    before = {k: v.float().clone() for k, v in engines.consolidated_state_dict(t.student).items()}
    metrics = t.train()
    after = engines.consolidated_state_dict(t.student)
    report.update(metrics=metrics, finite=all(math.isfinite(v) for v in metrics.values()),
                  student_moved=max((after[k].float() - v).abs().max().item() for k, v in before.items()),
                  optimizer=type(t.student.optimizer.optimizer).__name__ if hasattr(t.student.optimizer, "optimizer")
                  else type(t.student.optimizer).__name__, path=t.rollout.name)
elif cli.check == "hybrid_engine":
    # A canary, not a path we train with: engines.check_accelerator refuses `hybrid_engine` under transformers 5.
    # Lifting that refusal here (our function, not DeepSpeed's) shows whether DeepSpeed's kernels now agree.
    engines.hybrid_engine_incompatibility = lambda: None
    config = json.loads((DS_CONFIG_DIR / "zero3_offload.json").read_text())
    config["hybrid_engine"] = {"enabled": True, "max_out_tokens": 4096, "inference_tp_size": 1}
    t = trainer(cli.arch, deepspeed=config)
    rows = [t.prompts.prompt_ids[i] for i in range(8)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    request, sampling = RolloutRequest(ids.cuda(), mask.cuda()), SamplingConfig(max_new_tokens=32)
    reference = HFGenerateRollout(t.student, t.eos_ids, tokenizer.pad_token_id, True, 1).generate(
        request, sampling, greedy=True).input_ids
    try:
        fast = HybridEngineGenerate(t.student, tokenizer, t.eos_ids, tokenizer.pad_token_id).generate(
            request, sampling, greedy=True).input_ids
        width = min(fast.shape[1], reference.shape[1])
        report.update(agree=bool(torch.equal(fast[:, :width], reference[:, :width])),
                      mismatched_rows=int((fast[:, :width] != reference[:, :width]).any(-1).sum()))
    except Exception as error:  # the failure is the finding
        report.update(agree=False, error=repr(error))
elif cli.check == "fp16_skip":
    # a loss scale of 2^32 overflows fp16 gradients: DeepSpeed skips the step, and the EMA must not advance
    config = json.loads((DS_CONFIG_DIR / "zero3_offload.json").read_text())
    config["fp16"] = {"enabled": True, "initial_scale_power": 32, "hysteresis": 2}
    t = trainer(cli.arch, dtype=torch.float16, bf16=False, fp16=True, teacher_mode="ema", teacher_update_rate=0.5, deepspeed=config)
    teacher_before = {k: v.float().clone() for k, v in engines.consolidated_state_dict(t.teacher).items()}
    t.train_step()
    teacher_after = engines.consolidated_state_dict(t.teacher)
    report.update(step_applied=t.step_applied, teacher_syncs=t.teacher_syncs,
                  teacher_moved=max((teacher_after[k].float() - v).abs().max().item()
                                    for k, v in teacher_before.items()))
else:
    values = {}
    for attn in ("sdpa", "flash_attention_2"):
        values[attn] = trainer(cli.arch, attn).heldout_divergence(str(DEMO_HELDOUT))
    report.update(values)
Path(cli.out, f"{cli.check}-{cli.arch}.json").write_text(json.dumps(report, indent=1))
