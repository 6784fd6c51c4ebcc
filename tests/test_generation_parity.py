"""The generate() surface through the real sharded runtime (real processes, gloo), against Transformers' generate on
each prompt alone: processors token-identical, beam search with scores, and seeded sampling that gives the same tokens
on every split as in one process, for the (1,1), (2,1), (1,2) and (2,2) splits."""

import pytest

from checkpoints import PROMPTS, assert_matches_hf, build_checkpoint, hf_alone, hf_greedy, run_split

SPLITS = [(1, 1), (2, 1), (1, 2), (2, 2)]


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
    }
    expected = {name: [hf_alone(model, p, opts) for p in PROMPTS] for name, opts in option_sets.items()}
    # the chosen options must matter, or the comparison proves nothing
    for name in ("repetition_penalty", "no_repeat_ngram", "bad_words", "suppress", "min_new_tokens"):
        assert [s[0]["output_ids"] for s in expected[name]] != [p["output_ids"] for p in plain], name
    sampling = {"max_new_tokens": 8, "do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.8, "seed": 123,
                "num_return_sequences": 2}
    option_sets["sample"] = sampling
    cases = [{"name": name, "folder": str(folder), "prompts": PROMPTS, "options": opts, "max_batch_size": 2}
             for name, opts in option_sets.items()]
    reference, _ = run_split(root, [c for c in cases if c["name"] == "sample"], 1, 1)
    return root, cases, expected, reference["sample"]


@pytest.mark.parametrize("tp,pp", SPLITS, ids=[f"tp{t}-pp{p}" for t, p in SPLITS])
def test_generate_options_match_transformers(setup, tp, pp):
    root, cases, expected, sampled = setup
    results, _ = run_split(root, cases, tp, pp)
    for name, theirs in expected.items():
        for p, (our_seqs, their_seqs) in enumerate(zip(results[name], theirs, strict=True)):
            if name == "beam":
                assert [s["output_ids"] for s in our_seqs] == [s["output_ids"] for s in their_seqs], (name, p)
                for a, b in zip(our_seqs, their_seqs):
                    assert abs(a["score"] - b["score"]) < 1e-4, (name, p)
            else:
                assert_matches_hf(our_seqs[0], their_seqs[0], f"{name} prompt {p}")
    # seeded sampling: the same tokens as in one process, on every split
    assert [[s["output_ids"] for s in seqs] for seqs in results["sample"]] == \
        [[s["output_ids"] for s in seqs] for seqs in sampled]
