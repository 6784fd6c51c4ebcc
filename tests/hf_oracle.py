"""Transformers as the oracle: a tiny random Llama checkpoint, and a StepModel adapter over HF's LlamaForCausalLM.

HFStepModel lets beam search (distllama.beam) run on Transformers' own forward pass, so
any difference from `hf_model.generate()` is a difference in the loop, not in the model.
"""

from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

TINY_LLAMA_CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # wider than HF's 0.02 so that a random model has peaked, varied logits (fewer near-ties, eos is reachable)
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    tie_word_embeddings=False,
)


def tiny_llama(tmp_path, seed: int = 0, **config_overrides) -> tuple[LlamaForCausalLM, Path]:
    """Build a seeded random float32 LlamaForCausalLM, save it under tmp_path; returns (model in eval mode, folder)."""
    config = LlamaConfig(**{**TINY_LLAMA_CONFIG, **config_overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    folder = Path(tmp_path) / "tiny-llama"
    model.save_pretrained(folder)
    return model, folder


class HFStepModel:
    """The StepModel protocol over a Transformers causal LM with a DynamicCache."""

    def __init__(self, hf_model):
        self.hf_model = hf_model
        self.vocab_size = hf_model.config.vocab_size
        # optional StepModel attribute: HF caps its default max_length (20 new tokens) at this
        self.max_position_embeddings = hf_model.config.max_position_embeddings
        self.cache = None
        self.forward_calls = 0  # tests check e.g. that dropping finished rows shrinks the work
        self.rows_seen = []  # batch size of every forward call

    def start(self, batch_size: int, max_length: int) -> None:
        self.cache = DynamicCache(config=self.hf_model.config)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids):
        # like generate(): a mask without padding is dropped (the attention kernels then take their causal fast path)
        mask = None if bool((attention_mask == 1).all()) else attention_mask
        outputs = self.hf_model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = outputs.cache
        self.forward_calls += 1
        self.rows_seen.append(input_ids.shape[0])
        return outputs.logits[:, -1].to(torch.float32)

    def reorder(self, index) -> None:
        self.cache.reorder_cache(index)
