"""distllama.results (the ordered, resumable, never-destroying results writer) and distllama.merge."""

import json
import os
import subprocess
import sys

import pytest

from distllama.merge import merge
from distllama.results import ResultsError, ResultWriter


def rec(index, **extra):
    return {"index": index, "input_ids": [1, index], **extra}


def lines(path):
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]  # not splitlines(): U+2028 is no newline


def line_bytes(*indices):
    return b"".join(json.dumps(rec(i), ensure_ascii=False).encode() + b"\n" for i in indices)


def test_a_line_is_one_line_even_to_splitlines(tmp_path):
    """Generated text may hold U+0085, U+2028 or U+2029, which str.splitlines takes for line ends: they are written
    escaped (the same JSON), other non-ASCII text as itself."""
    out = tmp_path / "out.jsonl"
    records = [rec(0, text="a\x85b\u2028c\u2029d"), rec(1, text="é 日本")]
    writer = ResultWriter(out, order=[0, 1])
    for i, record in enumerate(records):
        writer.add(i, record)
    writer.finish()
    text = out.read_text(encoding="utf-8")
    assert [json.loads(line) for line in text.splitlines()] == records
    assert "é 日本" in text


def test_lines_follow_order_whatever_order_results_arrive(tmp_path):
    out = tmp_path / "out.jsonl"
    writer = ResultWriter(out, order=[0, 1, 2, 3])
    assert not out.exists()  # nothing is created before the first line is ready
    writer.add(2, rec(2))
    writer.add(1, rec(1))
    assert not out.exists() and writer.written == 0  # 2 and 1 wait for 0
    writer.add(0, rec(0))
    assert [r["index"] for r in lines(out)] == [0, 1, 2]  # written as soon as every earlier one is
    assert writer.written == 3
    writer.add(3, rec(3))
    writer.finish()
    assert [r["index"] for r in lines(out)] == [0, 1, 2, 3]


def test_shard_order_and_bad_adds(tmp_path):
    out = tmp_path / "shard1.jsonl"
    writer = ResultWriter(out, order=[1, 5, 9])
    with pytest.raises(ValueError, match="not in this run's order"):
        writer.add(2, rec(2))
    writer.add(1, rec(1))
    with pytest.raises(ValueError, match="given twice"):
        writer.add(1, rec(1))
    with pytest.raises(RuntimeError, match="index 5"):
        writer.finish()
    writer.add(9, rec(9))
    writer.add(5, rec(5))
    writer.finish()
    assert [r["index"] for r in lines(out)] == [1, 5, 9]
    with pytest.raises(ValueError, match="twice"):
        ResultWriter(out, order=[1, 1])


def test_unicode_text_is_one_line(tmp_path):
    out = tmp_path / "out.jsonl"
    writer = ResultWriter(out, order=[0])
    writer.add(0, rec(0, text="a\nb\u2028c é 日本"))
    writer.finish()
    assert out.read_bytes().count(b"\n") == 1
    assert lines(out)[0]["text"] == "a\nb\u2028c é 日本"


def test_existing_file_is_replaced_only_when_the_run_finishes(tmp_path):
    out = tmp_path / "out.jsonl"
    yesterday = b'{"index": 0, "text": "yesterday"}\n'
    out.write_bytes(yesterday)
    writer = ResultWriter(out, order=[0, 1])
    writer.add(0, rec(0))
    assert out.read_bytes() == yesterday  # the new lines go to out.jsonl.partial
    assert (tmp_path / "out.jsonl.partial").read_bytes() == line_bytes(0)
    writer.add(1, rec(1))
    writer.finish()
    assert out.read_bytes() == line_bytes(0, 1)
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_failed_run_leaves_existing_file_untouched_and_says_how_to_continue(tmp_path):
    out = tmp_path / "out.jsonl"
    yesterday = b'{"index": 0, "text": "yesterday"}\n'
    out.write_bytes(yesterday)
    before = os.stat(out).st_mtime_ns

    writer = ResultWriter(out, order=[0, 1, 2])  # fails before any result: no trace at all
    assert writer.abort() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]

    writer = ResultWriter(out, order=[0, 1, 2])
    writer.add(0, rec(0))
    note = writer.abort()
    assert out.read_bytes() == yesterday and os.stat(out).st_mtime_ns == before
    assert "out.jsonl.partial" in note and "--resume" in note and "\n" not in note
    assert (tmp_path / "out.jsonl.partial").read_bytes() == line_bytes(0)

    # --resume continues the partial file (the newer run) and then replaces yesterday's
    writer = ResultWriter(out, order=[0, 1, 2], resume=True)
    assert writer.done == {0}
    writer.add(1, rec(1))
    writer.add(2, rec(2))
    writer.finish()
    assert out.read_bytes() == line_bytes(0, 1, 2)
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_new_file_gets_lines_directly_and_interrupted_run_leaves_complete_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    writer = ResultWriter(out, order=[0, 1, 2])
    writer.add(0, rec(0))
    writer.add(1, rec(1))
    note = writer.abort()
    assert out.read_bytes() == line_bytes(0, 1)
    assert "first 2 of 3" in note and "--resume" in note


def test_killed_writer_leaves_only_complete_lines(tmp_path):
    """A real process killed (SIGKILL) while writing: the file is complete lines plus at most one torn line,
    and resuming gives exactly the uninterrupted file."""
    out = tmp_path / "out.jsonl"
    script = (
        "import os, signal, sys\n"
        "from distllama.results import ResultWriter\n"
        f"w = ResultWriter({str(out)!r}, order=list(range(1000)))\n"
        "for i in range(1000):\n"
        "    w.add(i, {'index': i, 'input_ids': [1, i], 'text': 'x' * 5000})\n"
        "    if i == 300: os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    data = out.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 301
    # simulate a kill mid-write as well: a torn last line
    out.write_bytes(data + b'{"index": 301, "input_ids": [1, 301], "te')
    writer = ResultWriter(out, order=list(range(1000)), resume=True)
    assert writer.done == set(range(301))
    for i in range(301, 1000):
        writer.add(i, {"index": i, "input_ids": [1, i], "text": "x" * 5000})
    writer.finish()
    expected = b"".join(json.dumps({"index": i, "input_ids": [1, i], "text": "x" * 5000}).encode() + b"\n"
                        for i in range(1000))
    assert out.read_bytes() == expected


@pytest.mark.parametrize("tail", [b'{"index": 2, "inp', b'{"index": 2, "inp\n', b"\n"])
def test_resume_cuts_a_torn_last_line(tmp_path, tail):
    out = tmp_path / "out.jsonl"
    out.write_bytes(line_bytes(0, 1) + tail)
    writer = ResultWriter(out, order=[0, 1, 2, 3], resume=True)
    assert writer.done == {0, 1}
    assert out.read_bytes() == line_bytes(0, 1) + tail  # nothing is touched before the first line is written
    writer.add(3, rec(3))
    writer.add(2, rec(2))
    writer.finish()
    assert out.read_bytes() == line_bytes(0, 1, 2, 3)


def test_resume_of_a_finished_file_only_cuts_the_torn_tail(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(line_bytes(0, 1) + b'{"ind')
    writer = ResultWriter(out, order=[0, 1], resume=True)
    assert writer.done == {0, 1}
    writer.finish()
    assert out.read_bytes() == line_bytes(0, 1)


def test_resume_without_a_file_is_a_fresh_run(tmp_path):
    out = tmp_path / "out.jsonl"
    writer = ResultWriter(out, order=[0, 1], resume=True)
    assert writer.done == set()
    writer.add(0, rec(0))
    writer.add(1, rec(1))
    writer.finish()
    assert out.read_bytes() == line_bytes(0, 1)


@pytest.mark.parametrize("content,order,fragment", [
    (line_bytes(0, 2), [0, 1, 2], "line 2 holds the result for index 2"),  # a gap
    (line_bytes(1), [0, 1], "line 1 holds the result for index 1"),  # another shard's file
    (line_bytes(0, 1, 2), [0, 1], "holds 3 results"),
    (b'{"index": 0}\nnot json\n{"index": 1}\n', [0, 1, 2], "line 2 is not a result line"),
    (b'{"no_index": 0}\n', [0, 1], "line 1 has no index"),
    (b"[1, 2]\n" + line_bytes(1), [0, 1], "line 1 is not a result line"),
])
def test_resume_refuses_another_runs_file(tmp_path, content, order, fragment):
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with pytest.raises(ResultsError, match=fragment) as error:
        ResultWriter(out, order=order, resume=True)
    assert str(out) in str(error.value)
    assert out.read_bytes() == content


def test_resume_check_refuses_lines_of_other_prompts(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(line_bytes(0))
    prompts = {0: [1, 99], 1: [1, 1]}

    def check(index, record):
        return None if record["input_ids"] == prompts[index] else f"its input_ids are not prompt {index}'s"

    with pytest.raises(ResultsError, match="line 1: its input_ids are not prompt 0's"):
        ResultWriter(out, order=[0, 1], resume=True, check=check)
    prompts[0] = [1, 0]
    assert ResultWriter(out, order=[0, 1], resume=True, check=check).done == {0}


def test_fresh_run_supersedes_a_stale_partial(tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_bytes(line_bytes(0))  # an older failed run over an older out.jsonl
    writer = ResultWriter(out, order=[0, 1])  # out.jsonl is gone: lines go straight to it
    writer.add(0, rec(0, text="new"))
    assert not (tmp_path / "out.jsonl.partial").exists()  # so that --resume does not take it for the newer run
    writer.abort()
    assert ResultWriter(out, order=[0, 1], resume=True).done == {0}


def test_unwritable_outputs_fail_before_any_work(tmp_path):
    with pytest.raises(ResultsError, match="does not exist"):
        ResultWriter(tmp_path / "no" / "out.jsonl", order=[0])
    with pytest.raises(ResultsError, match="is a folder"):
        ResultWriter(tmp_path, order=[0])


def test_empty_order_still_leaves_an_empty_file(tmp_path):
    out = tmp_path / "out.jsonl"
    ResultWriter(out, order=[]).finish()
    assert out.read_bytes() == b""


# ---- merge ---------------------------------------------------------------------------------------------------------

def write_shards(tmp_path, n_prompts, n_shards):
    shards = []
    for shard in range(n_shards):
        path = tmp_path / f"shard{shard}.jsonl"
        writer = ResultWriter(path, order=list(range(shard, n_prompts, n_shards)))
        for index in writer.order:
            writer.add(index, rec(index))
        writer.finish()
        shards.append(path)
    return shards


def test_merge_orders_shards_by_index(tmp_path):
    shards = write_shards(tmp_path, 10, 3)
    out = tmp_path / "all.jsonl"
    assert merge(out, reversed(shards)) == 10
    assert out.read_bytes() == line_bytes(*range(10))
    proc = subprocess.run([sys.executable, "-m", "distllama.merge", str(tmp_path / "cli.jsonl"), *map(str, shards)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli.jsonl").read_bytes() == line_bytes(*range(10))


def test_merge_refuses_gaps_duplicates_and_unfinished_shards(tmp_path):
    shards = write_shards(tmp_path, 10, 3)
    out = tmp_path / "all.jsonl"
    out.write_bytes(b"keep me\n")
    with pytest.raises(ResultsError, match="index 1 .*shard is missing"):
        merge(out, [shards[0], shards[2]])
    with pytest.raises(ResultsError, match="index 0 is in both"):
        merge(out, [shards[0], *shards])
    shards[1].write_bytes(shards[1].read_bytes() + b'{"index": 10, "inp')
    with pytest.raises(ResultsError, match="shard1.jsonl line 4 is incomplete"):
        merge(out, shards)
    assert out.read_bytes() == b"keep me\n"  # a refused merge leaves OUT untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.jsonl", "shard0.jsonl", "shard1.jsonl", "shard2.jsonl"]
    proc = subprocess.run([sys.executable, "-m", "distllama.merge", str(out), *map(str, shards)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("distllama merge: error:") and "shard1.jsonl" in proc.stderr


# ---- through the command line -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny checkpoint, five prompts, and the results file of an uninterrupted run (batch size 2)."""
    from checkpoints import build_checkpoint
    from distllama import generate

    root = tmp_path_factory.mktemp("resume")
    build_checkpoint(root / "ckpt", seed=11, num_hidden_layers=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [1, 5 + i, 40 + 3 * i, 7][: 2 + i % 3]}) + "\n"
                               for i in range(5)))

    def run(out, *extra):
        return generate.main(["--model", str(root / "ckpt"), "--device", "cpu", "--prompts-file", str(prompts),
                              "--max-new-tokens", "4", "--batch-size", "2", "--output", str(out), *extra])

    full = root / "full.jsonl"
    assert run(full) == 0
    return run, full.read_bytes()


def split_lines(data: bytes) -> list[bytes]:
    return [line + b"\n" for line in data.split(b"\n")[:-1]]


def kept(line: bytes) -> bytes:
    """A result line marked so that it shows whether a resumed run kept it or computed it again."""
    record = json.loads(line)
    record["text"] = "kept from the earlier run"
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


def test_cli_resume_at_a_batch_boundary_equals_the_uninterrupted_file(cli_run, tmp_path):
    run, full = cli_run
    out = tmp_path / "out.jsonl"
    done = [kept(line) for line in split_lines(full)[:2]]
    out.write_bytes(b"".join(done) + split_lines(full)[2][:30])  # 2 lines and a torn third
    assert run(out, "--resume") == 0
    assert out.read_bytes() == b"".join(done + split_lines(full)[2:])


def test_cli_resume_inside_a_batch_keeps_the_tokens(cli_run, tmp_path):
    run, full = cli_run
    out = tmp_path / "out.jsonl"
    done = [kept(line) for line in split_lines(full)[:3]]
    out.write_bytes(b"".join(done))  # prompt 3 now runs without prompt 2 beside it
    assert run(out, "--resume") == 0
    ours, theirs = lines(out), [json.loads(line) for line in split_lines(full)]
    assert [r["output_ids"] for r in ours] == [r["output_ids"] for r in theirs]
    assert all(abs(a - b) < 1e-5
               for r, s in zip(ours, theirs) for a, b in zip(r["token_logprobs"], s["token_logprobs"]))
    assert split_lines(out.read_bytes())[:3] == done  # kept lines are kept byte for byte


def test_cli_rerun_over_old_results_and_resume_of_its_partial(cli_run, tmp_path, monkeypatch):
    run, full = cli_run
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"index": 0, "text": "older results"}\n')
    # the earlier rerun was killed after two lines: they are in out.jsonl.partial, out.jsonl is untouched
    done = [kept(line) for line in split_lines(full)[:2]]
    (tmp_path / "out.jsonl.partial").write_bytes(b"".join(done) + b'{"ind')
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued Slurm job resumes without being told
    assert run(out) == 0
    assert out.read_bytes() == b"".join(done + split_lines(full)[2:])
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_cli_fresh_run_replaces_old_results_only_at_the_end(cli_run, tmp_path, monkeypatch):
    run, full = cli_run
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"index": 0, "text": "older results"}\n')
    (tmp_path / "out.jsonl.partial").write_bytes(kept(split_lines(full)[0]))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert run(out, "--no-resume") == 0  # --no-resume wins over the Slurm default: everything is computed afresh
    assert out.read_bytes() == full and not (tmp_path / "out.jsonl.partial").exists()
