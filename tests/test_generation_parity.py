"""The generate() surface through the real sharded runtime, against Transformers' generate on the same batch:
processors token-identical, beam search with scores, seeded sampling, for the (1,1), (2,1) and (1,2) splits."""

import pytest

from checkpoints import PROMPTS, build_checkpoint, hf_generate, hf_greedy, run_split

SPLITS = [(1, 1), (2, 1), (1, 2)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    folder = root / "model"
    model = build_checkpoint(folder, seed=11, tie_word_embeddings=True)
    plain = hf_greedy(model, PROMPTS, 10)
    # Tokens the model really produces, so that bans, suppression and extra eos ids change the output.
    t0, t1, t2 = plain[0]["output_ids"][:3]
    early = plain[1]["output_ids"][2]
    option_sets = {
        "repetition_penalty": {"max_new_tokens": 10, "repetition_penalty": 1.5},
        "no_repeat_ngram": {"max_new_tokens": 10, "no_repeat_ngram_size": 2},
        "bad_words": {"max_new_tokens": 10, "bad_words_ids": [[t0], [t1, t2]]},
        "suppress": {"max_new_tokens": 8, "suppress_tokens": [t1], "begin_suppress_tokens": [t0]},
        "forced_eos": {"max_new_tokens": 6, "forced_eos_token_id": 2},
        "several_eos": {"max_new_tokens": 10, "eos_token_id": [2, early]},
        "min_new_tokens": {"max_new_tokens": 10, "min_new_tokens": 6, "eos_token_id": [2, early]},
        "beam": {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.8,
                 "early_stopping": True, "eos_token_id": [2, early]},
        "sample": {"max_new_tokens": 8, "do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.8,
                   "seed": 123},
    }
    expected = {name: hf_generate(model, PROMPTS, opts) for name, opts in option_sets.items()}
    # the chosen options must matter, or the comparison proves nothing
    for name in ("repetition_penalty", "no_repeat_ngram", "bad_words", "suppress", "min_new_tokens"):
        assert [s[0]["output_ids"] for s in expected[name]] != [p["output_ids"] for p in plain], name
    cases = [{"name": name, "folder": str(folder), "prompts": PROMPTS, "options": opts,
              "drop_finished": name == "several_eos"} for name, opts in option_sets.items()]
    return root, cases, expected


@pytest.mark.parametrize("tp,pp", SPLITS, ids=[f"tp{t}-pp{p}" for t, p in SPLITS])
def test_generate_options_match_transformers(setup, tp, pp):
    root, cases, expected = setup
    results, _ = run_split(root, cases, tp, pp)
    for name, theirs in expected.items():
        ours = results[name]
        for p, (our_seqs, their_seqs) in enumerate(zip(ours, theirs, strict=True)):
            assert [s["output_ids"] for s in our_seqs] == [s["output_ids"] for s in their_seqs], (name, p)
            for a, b in zip(our_seqs, their_seqs):
                if b["score"] is not None:
                    assert abs(a["score"] - b["score"]) < 1e-4, (name, p)
