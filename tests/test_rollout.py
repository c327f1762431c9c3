"""Completion masks and sampling settings: positions, not token identity, decide what the loss sees."""

import torch
from deepspeed.runtime.rollout import RolloutBatch, SamplingConfig
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from sdft_ds.assets import model_dir
from sdft_ds.data import left_pad
from sdft_ds.engines import Policy
from sdft_ds.batch import completion_mask, loss_mask
from sdft_ds.rollout import generation_config, split_completions

EOS, END, PAD = 5, 6, 5  # pad == eos, as after `tokenizer.pad_token = tokenizer.eos_token`


def test_mask_keeps_tokens_through_the_first_eos_only():
    ids = torch.tensor([[1, 2, EOS, PAD, PAD],   # stops at EOS; the pads after it equal EOS
                        [1, END, 3, 4, EOS],     # a second EOS id (chat models) stops it earlier
                        [1, 2, 3, 4, 7],         # truncated: no EOS, kept whole
                        [EOS, PAD, PAD, PAD, PAD]])  # immediate EOS: one token
    mask, truncated = completion_mask(ids, [EOS, END])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]


def test_split_completions_reads_after_the_prompt_and_refills_padding():
    input_ids = torch.tensor([[0, 9, 9, 1, EOS, 3], [9, 9, 9, 1, 2, 3]])
    batch = RolloutBatch(input_ids, torch.ones_like(input_ids), torch.tensor([3, 3]))
    completions = split_completions(batch, [EOS], pad_id=0)
    assert completions.ids.tolist() == [[1, EOS, 0], [1, 2, 3]]
    assert completions.lengths.tolist() == [2, 3]


def test_generation_ignores_the_models_own_sampling_defaults():
    model = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-student"))
    model.generation_config.repetition_penalty = 1.05  # as Qwen2.5-Instruct ships
    model.generation_config.top_k = 20
    sampling = SamplingConfig(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=0)
    config, _ = model._prepare_generation_config(generation_config(sampling, [EOS], 0))
    processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=3,
                                             encoder_input_ids=torch.zeros(1, 3, dtype=torch.long),
                                             prefix_allowed_tokens_fn=None, logits_processor=None)
    names = sorted(type(p).__name__ for p in processors)
    assert names == ["TemperatureLogitsWarper", "TopPLogitsWarper"], names


def test_skipped_leading_tokens_leave_the_loss_but_not_the_completion():
    mask, _ = completion_mask(torch.tensor([[1, 2, 3, EOS, PAD], [1, EOS, PAD, PAD, PAD]]), [EOS])
    assert loss_mask(mask, 3).tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]  # a short one contributes nothing
    assert loss_mask(mask, 0).tolist() == mask.tolist()


def test_training_forward_sees_the_positions_generate_used_with_left_padding(tokenizer):
    """GPT-2 has absolute position embeddings: a left-padded row scored with positions counted from the padding
    gets other logits than generate sampled from (RoPE models hide this, being relative)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    lm = GPT2LMHeadModel(config).eval()
    texts = ["Reverse the word 'cherry'.", "Hi", "Spell the number seven backwards, then add a full stop."]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(r) for r in rows}) == 3
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=6)
    with torch.no_grad():
        out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, output_logits=True,
                          return_dict_in_generate=True,
                          generation_config=generation_config(sampling, [tokenizer.eos_token_id],
                                                              tokenizer.pad_token_id, greedy=True))
    width = prompt_ids.shape[1]
    completions = out.sequences[:, width:]
    mask, _ = completion_mask(completions, [tokenizer.eos_token_id])
    expected = torch.stack(out.logits, 1)  # (B, C, V): the logits each completion token was chosen from

    with torch.no_grad():
        hidden = Policy(lm)(out.sequences, torch.cat([prompt_mask, mask], 1), width, completions.shape[1])
    logits = hidden @ lm.lm_head.weight.T
    selected = mask.bool()
    torch.testing.assert_close(logits[selected], expected[selected], rtol=0, atol=1e-5)
    assert torch.equal(logits.argmax(-1)[selected], completions[selected])  # greedy: the chosen tokens

    with torch.no_grad():  # the check can tell: positions 0.. from the first (pad) column move the padded rows
        unpositioned = lm(out.sequences, attention_mask=torch.cat([prompt_mask, mask], 1)).logits
    padded = selected & (prompt_mask[:, 0] == 0)[:, None]
    assert (unpositioned[:, width - 1:-1][padded] - expected[padded]).abs().max() > 1e-2
