"""sdft_ds.models: the fused head reproduces each architecture's own logits or refuses the model by name; dropout is
really off; completions end at either model's EOS."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from sdft_ds import engines, models
from sdft_ds.divergence import IDENTITY, target_logprobs

VOCAB = 96
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64)
# model_type -> tiny config; the output-layer transforms are set far from their defaults' near-identity
CONFIGS = {
    "llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": dict(LLAMA_LIKE, head_dim=8), "mistral": LLAMA_LIKE,
    "phi3": dict(LLAMA_LIKE, pad_token_id=0), "gemma": dict(LLAMA_LIKE, head_dim=8),
    "gemma2": dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0),
    "gemma3_text": dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0),
    "cohere": dict(LLAMA_LIKE, logit_scale=0.3), "granite": dict(LLAMA_LIKE, logits_scaling=4.0),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                word_embed_proj_dim=32),
    "bloom": dict(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4),
}
REFUSED = {"gptj": dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4),
           "phi": dict(LLAMA_LIKE), "codegen": dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4)}


def tiny(model_type: str, **kwargs):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs), dtype=torch.float64)
    with torch.no_grad():  # logits of a few units, so that a softcap of 2 is far from linear
        lm.get_output_embeddings().weight.mul_(40)
    return lm.eval()


def head_logprobs(lm, head):
    """log softmax over the whole vocabulary at 5 positions, from the hidden states and output weight the trainer's
    Policy hands its head."""
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))

    def every_id(hidden, weight):
        n = hidden.shape[0]
        return (target_logprobs(hidden.repeat_interleave(VOCAB, 0), weight, torch.arange(VOCAB).repeat(n),
                                head=head).view(n, VOCAB),)

    with torch.no_grad():
        (got,) = engines.Policy(lm)(ids, torch.ones_like(ids), 1, 5, token_mask=torch.ones(2, 5, dtype=torch.bool),
                                    head_fn=every_id)
        want = torch.log_softmax(lm(input_ids=ids).logits[:, :5].double(), -1).reshape(-1, VOCAB)
    return got, want


@pytest.mark.parametrize("model_type", CONFIGS)
def test_fused_head_reproduces_the_models_logits(model_type):
    lm = tiny(model_type, **CONFIGS[model_type])
    head = models.logit_transform(lm.config)
    models.check_output_layer(lm)
    got, want = head_logprobs(lm, head)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if head != IDENTITY:  # positive control: the plain h·Wᵀ the head used to assume is far off
        plain, _ = head_logprobs(lm, IDENTITY)
        assert (plain - want).abs().max() > 0.1


@pytest.mark.parametrize("model_type", REFUSED)
def test_models_with_an_output_bias_are_refused_by_name(model_type):
    lm = tiny(model_type, **REFUSED[model_type])
    assert lm.get_output_embeddings().bias is not None
    with pytest.raises(ValueError, match=f"model_type '{model_type}': its output layer adds a bias"):
        models.logit_transform(lm.config)  # from the config alone, before anything is loaded
    with pytest.raises(ValueError, match="adds a bias"):
        models.check_output_layer(lm)  # and from the loaded module, whatever its config says


def test_unknown_logit_attributes_are_refused():
    config = AutoConfig.for_model("llama", **LLAMA_LIKE)
    config.logits_scaling = 8.0  # e.g. a MuP model whose modeling code we do not know
    with pytest.raises(ValueError, match=r"'llama': its config sets \{'logits_scaling': 8.0\}"):
        models.logit_transform(config)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_disable_dropout_turns_attention_dropout_off(model_type):
    """Qwen2 and Llama copy attention_dropout into each attention module at build time and pass it to the kernel
    in train mode; setting the config afterwards changes nothing."""
    lm = tiny(model_type, **dict(LLAMA_LIKE, attention_dropout=0.5)).train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    assert not torch.equal(lm(input_ids=ids).logits, lm(input_ids=ids).logits)  # dropout is on
    models.disable_dropout(lm)
    assert torch.equal(lm(input_ids=ids).logits, lm(input_ids=ids).logits)


def test_eos_ids_are_the_union_of_both_models(tokenizer):
    student, teacher = tiny("qwen2", **LLAMA_LIKE), tiny("qwen2", **LLAMA_LIKE)
    student.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    teacher.generation_config = GenerationConfig(eos_token_id=[7, 9])  # e.g. an instruct teacher's end-of-turn
    assert models.eos_ids(tokenizer, student, teacher) == sorted({tokenizer.eos_token_id, 7, 9})


def test_a_topk_support_wider_than_the_vocabulary_is_refused_before_any_engine(tokenizer):
    from sdft_ds import SDFTConfig, SDFTTrainer
    from sdft_ds.assets import DEMO_TRAIN, model_dir

    args = SDFTConfig(distillation_mode="topk", distillation_topk=5000)  # the tiny vocabulary has 1024 entries
    with pytest.raises(ValueError, match=r"distillation_topk=5000 exceeds the model's vocabulary \(1024 entries\)"):
        SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args, processing_class=tokenizer,
                    train_dataset=str(DEMO_TRAIN))
