"""LoRA students (sdft_ds.lora): a 2-rank step equals a plain-PyTorch PEFT step of the naive loss with the teacher
as the adapter-free base or as the EMA adapter (ZeRO-3 and ZeRO-2 with CPU-Adam offload); the EMA adapter
follows its formula and the base weights never change; the adapter-disabled teacher is the base model exactly; export
(adapter and merged) loads with peft and transformers; a resumed run continues the interrupted one (within 1e-6);
refusals come before any engine."""

import contextlib
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import launch
from helpers import naive_divergence
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir
from test_zero3_step import completion_logits

STUDENT = "tiny-qwen2-student"


def _reference_step(before, batches, teacher_mode):
    """The student's weights after one plain AdamW step (lr 1, eps 1) of the naive sequence-mean forward KL, on a
    PEFT model holding the run's initial weights; the teacher is that model with its adapter disabled (frozen) or
    as it is before the step (ema: the teacher adapter starts as the student's)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir(STUDENT), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    missing, unexpected = model.get_base_model().load_state_dict(
        {k: v.float() for k, v in before.items() if ".teacher." not in k}, strict=False)
    assert not unexpected and all(".teacher." in k or k == "lm_head.weight" for k in missing)
    per_rank = []
    for b in batches:
        length = b["completion_ids"].shape[1]
        with torch.no_grad(), model.disable_adapter() if teacher_mode == "frozen" else contextlib.nullcontext():
            teacher = completion_logits(model, b["teacher_input_ids"], b["teacher_attention_mask"],
                                        int(b["teacher_start"]), length)
        student = completion_logits(model, b["input_ids"], b["attention_mask"], int(b["start"]), length)
        d, m = naive_divergence(student, teacher, alpha=0.0), b["loss_mask"].double()
        per_rank.append(((d * m).sum(-1) / m.sum(-1)).mean())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.0, eps=1.0,
                                  weight_decay=0.0)
    torch.stack(per_rank).mean().backward()
    optimizer.step()
    return {k: v.detach() for k, v in model.get_base_model().state_dict().items()}


@pytest.mark.multirank
@pytest.mark.parametrize("teacher_mode, ds_config", [("frozen", "zero3_offload.json"), ("ema", "zero3_offload.json"),
                                                     ("frozen", "zero2_offload.json")])
def test_two_rank_lora_step_matches_a_plain_peft_step(tmp_path, teacher_mode, ds_config):
    launch(["tests/distributed/lora_step.py", "--out", str(tmp_path), "--teacher", teacher_mode,
            "--deepspeed", ds_config])
    saved = torch.load(tmp_path / "step.pt")
    before, after = saved["before"], saved["after"]
    adapter = [k for k in after if ".lora_" in k and ".default." in k]
    assert sorted(saved["trained"]) == sorted(adapter) and len(adapter) == 2 * 3 * 2  # A, B × 3 targets × 2 layers
    assert saved["syncs"] == (1 if teacher_mode == "ema" else 0)

    expected = _reference_step(before, saved["batches"], teacher_mode)
    for name in adapter:
        torch.testing.assert_close(after[name].float(), expected[name], rtol=0, atol=2e-6, msg=name)
        assert (after[name].float() - before[name].float()).abs().max() > 1e-3, name  # the step moved it
    for name, value in before.items():  # the base never changes (it is also the frozen teacher)
        if ".lora_" not in name:
            assert torch.equal(after[name], value), name
    teacher_adapter = [k for k in after if ".teacher." in k]
    assert len(teacher_adapter) == (len(adapter) if teacher_mode == "ema" else 0)
    for name in teacher_adapter:  # θ_T ← (1 − r)·θ_T + r·θ_S at r = 0.25, from the student's initial adapter
        student = name.replace(".teacher.", ".default.")
        assert torch.equal(before[name], before[student])
        formula = 0.75 * before[name].float() + 0.25 * after[student].float()
        torch.testing.assert_close(after[name].float(), formula, rtol=0, atol=1e-7, msg=name)


def _trainer(out, peft_config=None, **settings):
    from sdft_ds import SDFTConfig, SDFTTrainer

    defaults = dict(output_dir=str(out), deepspeed="zero0.json", max_steps=3, per_device_train_batch_size=2,
                    max_completion_length=8, learning_rate=1e-2, seed=0, use_peft=peft_config is None)
    return SDFTTrainer(model=str(model_dir(STUDENT)), args=SDFTConfig(**{**defaults, **settings}),
                       processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR), train_dataset=str(DEMO_TRAIN),
                       peft_config=peft_config)


def _hidden(lm, ids, mask, start, length, selected):
    """What the trainer's teacher forward returns, from a plain transformers model."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return hidden[:, start - 1:start - 1 + length][selected]


def _greedy(trainer, ids, mask):
    from deepspeed.runtime.rollout import RolloutRequest

    return trainer.rollout.generate(RolloutRequest(ids, mask), trainer.sampling, greedy=True).input_ids


RANDOM_ADAPTER = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")


def test_the_adapter_free_teacher_is_the_base_model_exactly_and_never_trains(tmp_path, in_process):
    from sdft_ds import engines

    trainer = _trainer(tmp_path, LoraConfig(**RANDOM_ADAPTER))
    base = AutoModelForCausalLM.from_pretrained(model_dir(STUDENT), dtype=torch.float32).eval()
    assert type(trainer.teacher).__name__ == "AdapterTeacher" and trainer._teacher_weight() is None
    for step in range(2):  # before and after an optimizer step
        batch = trainer.generate_round()[0]
        length = batch.completion_ids.shape[1]
        with torch.no_grad():
            expected = _hidden(base, batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_start,
                               length, batch.selected)
            student = trainer.student(batch.input_ids, batch.attention_mask, batch.start, length)[batch.selected]
            plain = _hidden(base, batch.input_ids, batch.attention_mask, batch.start, length, batch.selected)
        assert torch.equal(trainer._teacher_hidden(batch), expected)
        assert (student - plain).abs().max() > 1e-3  # the student runs with its adapter
        if step == 0:
            trainer.train_step()
    lm = engines.language_model(trainer.student)
    trained = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    own = {k.replace(".base_layer", ""): v for k, v in lm.state_dict().items() if ".lora_" not in k}
    assert own.keys() == base.state_dict().keys()
    for name, value in base.state_dict().items():  # the base weights never moved
        assert torch.equal(own[name], value), name


def test_generation_runs_the_students_adapter_and_the_teachers_none(tmp_path, in_process, tokenizer):
    """Greedy rollout tokens (gather-once under ZeRO-3) equal a plain PEFT model's with the run's adapter, and a
    LoRA frozen teacher generating (generate_from_teacher) gives the base model's."""
    from sdft_ds import engines
    from sdft_ds.data import left_pad

    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Reverse 'cherry'.", "Count to five")]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(model_dir(STUDENT), dtype=torch.float32)
    base_tokens = base.generate(**settings)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir(STUDENT), dtype=torch.float32),
                               LoraConfig(**RANDOM_ADAPTER))  # built before a ZeRO-3 trainer is registered

    student = _trainer(tmp_path / "student", LoraConfig(**RANDOM_ADAPTER), deepspeed="zero3_offload.json")
    reference.get_base_model().load_state_dict(engines.consolidated_state_dict(student.student), strict=False)
    with_adapter = reference.generate(**settings)
    assert not torch.equal(with_adapter, base_tokens)  # the adapter changes what is generated
    assert torch.equal(_greedy(student, ids, mask)[:, :with_adapter.shape[1]], with_adapter)
    teacher = _trainer(tmp_path / "teacher", LoraConfig(**RANDOM_ADAPTER), generate_from_teacher=True)
    assert torch.equal(_greedy(teacher, ids, mask)[:, :base_tokens.shape[1]], base_tokens)


def test_the_exported_adapter_loads_with_peft_and_the_merged_model_with_transformers(tmp_path, in_process, tokenizer):
    from safetensors import safe_open

    from sdft_ds import engines

    trainer = _trainer(tmp_path / "run", LoraConfig(**RANDOM_ADAPTER), deepspeed="zero3_offload.json",
                       teacher_mode="ema", save_merged_model=True)
    trainer.train_step()
    trained = {k: v.float() for k, v in engines.consolidated_state_dict(trainer.student).items()}
    trainer.save_model()
    engines.forget_hf_config()  # the loads below build whole models

    out = tmp_path / "run"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as saved:
        keys = list(saved.keys())
        assert len(keys) == 2 * 7 * 2 and all(".lora_" in k and "teacher" not in k for k in keys)  # no EMA adapter
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir(STUDENT), dtype=torch.float32),
                                      str(out))
    for name, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, trained[name]), name  # the trained adapter, on the untouched base
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    ids = tokenizer(["Reverse the word 'cherry'."], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    settings = dict(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(merged.generate(**settings), model.generate(**settings))


def test_a_lora_run_resumes_exactly_with_its_ema_adapter_and_only_with_the_same_adapter(tmp_path, in_process):
    from sdft_ds import checkpoint, engines

    def trainer(**settings):
        return _trainer(tmp_path, **{"deepspeed": "zero3_offload.json", "teacher_mode": "ema", "lora_r": 4,
                                     "teacher_update_rate": 0.5, **settings})

    first = trainer()
    first.train_step()
    first.train_step()
    path = first.save_checkpoint()
    first.train_step()
    expected = engines.consolidated_state_dict(first.student)
    module = torch.load(next(Path(path).glob("*model_states.pt")), weights_only=False)["module"]
    # not the frozen base again (DeepSpeed drops frozen parameters by name; the tied output weight's second name stays)
    assert sorted(k for k in module if ".lora_" not in k) == ["lm.lm_head.weight"]
    assert len(module) == 1 + 2 * 7 * 2
    with pytest.raises(checkpoint.CheckpointError, match=r"lora: 'r=4, "):
        trainer(lora_r=8, resume_from_checkpoint="latest")
    resumed = trainer(resume_from_checkpoint="latest")
    resumed.train()
    assert resumed.step == 3 and resumed.teacher_syncs == 3
    state = engines.consolidated_state_dict(resumed.student)
    assert any(".teacher." in k for k in state)
    # the student's adapter, the EMA adapter and the base; not bitwise for the same reason as tests/test_resume.py's
    # (a fresh DeepSpeedCPUAdam's bias correction differs in the last ulp): 3e-8 measured, the step moves 1e-2
    assert state.keys() == expected.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("settings, peft_config, message", [
    (dict(lora_target_modules="nonexistent_proj"), None, "match no layer"),
    (dict(lora_target_modules="q_proj,lm_head"), None, "is the output layer"),
    (dict(lora_target_modules="embed_tokens"), None, "linear layers only"),
    ({}, dict(use_dora=True), "use_dora"),
    ({}, dict(init_lora_weights="pissa"), "rewrites the base weights"),
    ({}, dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(use_peft=False, save_merged_model=True), None, "save_merged_model"),
    (dict(teacher_mode="ema"), "ref_model", "one architecture"),
])
def test_lora_settings_it_cannot_train_correctly_are_refused_before_any_engine(tmp_path, settings, peft_config,
                                                                               message):
    from sdft_ds import SDFTConfig, SDFTTrainer

    use_peft = not isinstance(peft_config, dict)  # a dict: a LoraConfig passed as peft_config instead
    args = SDFTConfig(output_dir=str(tmp_path), deepspeed="zero0.json", **{"use_peft": use_peft, **settings})
    kwargs = {}
    if isinstance(peft_config, dict):
        kwargs["peft_config"] = LoraConfig(target_modules="all-linear", **peft_config)
    elif peft_config == "ref_model":
        kwargs["ref_model"] = str(model_dir("tiny-llama"))
    with pytest.raises(ValueError, match=message):
        SDFTTrainer(model=str(model_dir(STUDENT)), args=args, train_dataset=str(DEMO_TRAIN),
                    processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR), **kwargs)
    assert not (tmp_path / "checkpoints").exists()


def test_only_lora_configs_are_accepted(tmp_path):
    from peft import IA3Config

    from sdft_ds import SDFTConfig, SDFTTrainer

    with pytest.raises(ValueError, match="LoRA adapters only"):
        SDFTTrainer(model=str(model_dir(STUDENT)), args=SDFTConfig(output_dir=str(tmp_path)),
                    train_dataset=str(DEMO_TRAIN), processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                    peft_config=IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


@pytest.mark.parametrize("ref_model", [None, STUDENT])
def test_the_ema_adapter_follows_the_students_and_nothing_else_moves(tmp_path, in_process, ref_model):
    """ZeRO-0, one rank: the teacher adapter beside the student's (no ref_model), or a ref_model of the student's
    architecture as a separate engine with an adapter of its own; either starts as the student's adapter and is
    averaged towards it, θ_T ← 0.75·θ_T + 0.25·θ_S; every base weight stays as loaded."""
    from sdft_ds import SDFTConfig, SDFTTrainer, engines

    args = SDFTConfig(output_dir=str(tmp_path), deepspeed="zero0.json", max_steps=1, per_device_train_batch_size=2,
                      max_completion_length=8, learning_rate=1e-2, teacher_mode="ema", teacher_update_rate=0.25)
    trainer = SDFTTrainer(model=str(model_dir(STUDENT)), ref_model=ref_model and str(model_dir(ref_model)), args=args,
                          processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR), train_dataset=str(DEMO_TRAIN),
                          peft_config=LoraConfig(**RANDOM_ADAPTER))
    separate = ref_model is not None
    assert type(trainer.teacher).__name__ == ("DeepSpeedEngine" if separate else "AdapterTeacher")

    def weights():  # {name: value} of the student's adapter and base, and of the teacher's adapter
        student = engines.consolidated_state_dict(trainer.student)
        if not separate:
            return student, {k.replace(".teacher.", ".default."): v for k, v in student.items() if ".teacher." in k}
        return student, {k: v for k, v in engines.consolidated_state_dict(trainer.teacher).items() if ".lora_" in k}

    holder = trainer.teacher if separate else trainer.student  # the engine whose base is the teacher's
    (student, teacher), base = weights(), engines.consolidated_state_dict(holder)
    assert teacher and all(torch.equal(value, student[name]) for name, value in teacher.items())
    trainer.train_step()
    after_student, after_teacher = weights()
    for name, value in after_teacher.items():
        torch.testing.assert_close(value, 0.75 * teacher[name] + 0.25 * after_student[name], rtol=0, atol=1e-7)
        assert (after_student[name] - student[name]).abs().max() > 1e-3, name
    after_base = engines.consolidated_state_dict(holder)
    for name, value in base.items():
        if ".lora_" not in name:
            assert torch.equal(after_base[name], value), name
