"""`python -m distllama.merge OUT.jsonl SHARD.jsonl...`: join the results files of a Slurm job array's shards.

Each shard (`--shard I/N`) writes its own file whose lines carry the prompts' global "index"; the merged file holds
every line ordered by index, as one run over all prompts writes it. Refused, with the file and line named: a torn
or bad line (an unfinished shard: finish it with --resume), an index given twice, and a gap in the indices.
OUT is written beside itself and moved into place, so a refused merge leaves an existing OUT untouched.
"""

import os
import sys
import tempfile
from pathlib import Path

from distllama.results import ResultsError, read_complete_lines


def merge(out, shards) -> int:
    """Write the merged file; returns the number of lines."""
    lines: dict[int, tuple[bytes, str]] = {}  # index -> (line, where it came from)
    for shard in map(Path, shards):
        try:
            records, kept = read_complete_lines(shard)
            raw_lines = shard.read_bytes()[:kept].split(b"\n")[:-1]
            size = shard.stat().st_size
        except OSError as e:
            raise ResultsError(f"cannot read {shard}: {e.strerror}") from None
        if kept < size:
            raise ResultsError(f"{shard} line {len(records) + 1} is incomplete: that shard did not finish "
                               "(rerun it with --resume)")
        for number, (record, raw) in enumerate(zip(records, raw_lines), 1):
            index = record.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ResultsError(f"{shard} line {number}: no integer \"index\" field")
            if index in lines:
                raise ResultsError(f"index {index} is in both {lines[index][1]} and {shard} line {number}")
            lines[index] = (raw, f"{shard} line {number}")
    missing = sorted(set(range(len(lines))) - set(lines))
    if missing:
        raise ResultsError(f"no shard holds the result for index {missing[0]}"
                           + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
                           + ": a shard is missing or unfinished")
    out = Path(out)
    try:
        fd, temp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".merging")
    except OSError as e:
        raise ResultsError(f"cannot write {out}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(lines[index][0] + b"\n" for index in range(len(lines)))
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return len(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m distllama.merge OUT.jsonl SHARD.jsonl...", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        count = merge(argv[0], argv[1:])
    except (ResultsError, OSError) as e:  # OSError: a failure while writing OUT
        print(f"distllama merge: error: {e}", file=sys.stderr)
        return 1
    print(f"distllama merge: {count} results from {len(argv) - 1} file(s) into {argv[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
