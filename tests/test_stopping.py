"""Stop conditions against Transformers' StopStringCriteria: the vocabulary cleaning and the tail matching."""

import pytest
import torch
from transformers.generation.stopping_criteria import StopStringCriteria

from distllama.stopping import StopCondition, token_bytes_from_vocab


def _byte_level_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "stop here, then go on; the end is near"] * 50
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _sentencepiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "a", "b", "c", "d", "e", "f", "s", "t",
              "o", "p", "▁s", "to", "op", "▁stop", "ab", "abc", "def"]
    merges = [("▁", "s"), ("t", "o"), ("o", "p"), ("▁s", "top"), ("a", "b"), ("ab", "c"), ("de", "f")]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize("make_tokenizer", [lambda: _byte_level_tokenizer(300), _sentencepiece_tokenizer])
def test_vocab_cleaning_matches_transformers(make_tokenizer):
    tokenizer = make_tokenizer()
    mode = StopStringCriteria._get_stop_string_matching_mode(tokenizer)
    assert mode in ("byte_level", "byte_fallback")
    hf_tokens, hf_ids = StopStringCriteria.clean_tokenizer_vocab(tokenizer, stop_string_matching_mode=mode)
    ours_table = token_bytes_from_vocab(tokenizer.get_vocab())
    assert {i: ours_table[i] for i in hf_ids} == dict(zip(hf_ids, hf_tokens))


def test_stop_condition_matches_stop_string_criteria():
    """Every (row tail, stop string) case of HF's docstring family, on random token sequences of a real vocab."""
    tokenizer = _byte_level_tokenizer(300)
    vocab = tokenizer.get_vocab()
    stop_strings = ["stop", "e, t", "x", "the end"]
    hf = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
    ours_stop = StopCondition(None, stop_strings, vocab)
    text_ids = tokenizer("stop here, then go on; the end is near the box", add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    rows = [torch.tensor(text_ids[:end]) for end in range(1, len(text_ids) + 1)]
    rows += [torch.randint(0, len(vocab), (9,), generator=generator) for _ in range(200)]
    for row in rows:
        assert bool(ours_stop(row[None])[0]) == bool(hf(row[None], None)[0]), tokenizer.decode(row)
    assert sum(bool(hf(row[None], None)[0]) for row in rows) >= 5


