"""The results file: one JSON line per prompt, in output order, each written as soon as every earlier one is, and an
existing file never destroyed by a run that fails.

Where the lines go (FILE is --output):
- FILE missing or empty: appended straight to FILE, so a killed run leaves a valid prefix there.
- FILE with content, no resume: written to FILE.partial beside it, which replaces FILE (os.replace) only when the
  run finishes. A failed or interrupted run leaves FILE byte-for-byte as it was; FILE.partial holds its lines.
- resume: continue FILE.partial if it exists (it is the newer run), else FILE. A torn last line (no newline, or not
  JSON) is cut off; the complete lines must be the results of the first prompts of the run's order, and those
  prompts are skipped (`done`); the rest are appended. The finished file equals an uninterrupted run's.
Nothing is created, opened for writing or truncated before the first line is ready, so a run that fails earlier
leaves no trace. Each line is one write() and a flush (no fsync: a crash of the machine may lose the last lines,
which --resume then redoes).

Interface:
    writer = ResultWriter(path, order, resume=False, key=lambda record: record["index"], check=None)
    writer.done         # set of indices already complete in the file (resume); the run skips them
    writer.add(i, rec)  # rec is buffered until every index before i in `order` is written
    writer.finish()     # every index of `order` was added: the file now holds them all
    writer.abort()      # failed / interrupted: keep the complete lines; returns a one-line note ("" if none)
    writer.written      # lines written by this run

`python -m distllama.merge` (distllama/merge.py) joins the files of a job array's shards.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

PARTIAL = ".partial"


def json_line(record) -> str:
    """record as one line of JSON, non-ASCII text as itself but for U+0085, U+2028 and U+2029, which str.splitlines
    takes for line ends: those are escaped (json.dumps escapes the control characters it also splits at)."""
    line = json.dumps(record, ensure_ascii=False)
    return line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


class ResultsError(ValueError):
    """An output file that cannot be written or resumed; the message names the file (and line)."""


def read_complete_lines(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a results file's complete lines, and the number of bytes they take.

    A last line without a newline, or that is not a JSON object, is torn (an interrupted write): it is left out, so
    the byte count stops before it. A bad line before the last is an error naming the file and line."""
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last item is what follows the last newline: b"" or a torn line
    records, kept = [], 0
    for number, raw in enumerate(lines[:-1], 1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except (ValueError, RecursionError) as e:
            if number == len(lines) - 1 and not lines[-1]:
                break  # the last line, cut short where the newline survived: torn too
            reason = e.msg if isinstance(e, json.JSONDecodeError) else " ".join(str(e).split())
            raise ResultsError(f"{path} line {number} is not a result line ({reason})") from None
        records.append(record)
        kept += len(raw) + 1
    return records, kept


class ResultWriter:
    """Writes one JSON line per prompt, in the run's output order, as soon as every earlier one is written.

    order: the prompt indices this run writes, in output order ([0..n), or for one shard of a job array its own).
    resume: take the complete lines already in the file as done (see the module docstring for which file).
    key(record): a line's index (default its "index" field). check(index, record) -> None or the reason a kept line
        does not belong to this run (e.g. other input_ids); a reason stops the resume with an error naming the line.
    """

    def __init__(self, path, order: list[int], resume: bool = False,
                 key: Callable[[dict], int] = lambda record: record["index"],
                 check: Callable[[int, dict], str | None] | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL)
        self.order = list(order)
        self._position = {index: i for i, index in enumerate(self.order)}
        if len(self._position) != len(self.order):
            raise ValueError("order holds an index twice")
        self._pending: dict[int, dict] = {}  # position in order -> record waiting for an earlier one
        self._next = 0  # position in order of the next line to write
        self._file = None
        self._written = 0
        self._cut_at = None  # resume: bytes of the target to keep (a torn tail beyond them is cut off)

        if resume and self.partial.exists():
            self.target = self.partial
        elif resume or not self._has_content(self.path):
            self.target = self.path
        else:
            self.target = self.partial  # an earlier run's FILE stays untouched until this one finishes
        self._check_writable()
        if resume and self.target.exists():
            self._resume(key, check)
        self.done = set(self.order[:self._next])

    @property
    def written(self) -> int:
        return self._written

    def add(self, index: int, record: dict) -> None:
        position = self._position.get(index)
        if position is None:
            raise ValueError(f"result for index {index}, which is not in this run's order")
        if position < self._next or position in self._pending:
            raise ValueError(f"result for index {index} given twice")
        self._pending[position] = record
        while self._next in self._pending:
            self._write(self._pending.pop(self._next))
            self._next += 1

    def finish(self) -> None:
        """The run completed: every index of order was added. The results file now holds them all."""
        if self._next < len(self.order):
            missing = self.order[self._next]
            raise RuntimeError(f"finish() before the result for index {missing} was added")
        self._open()  # also when nothing was left to write: cuts a torn tail, creates an empty file for no prompts
        self._file.close()
        if self.target == self.partial:
            os.replace(self.partial, self.path)

    def abort(self) -> str:
        """The run failed or was interrupted: close what is written (complete lines only) and say where it is."""
        if self._file is not None:
            self._file.close()
        complete = self._next
        if complete == 0 or complete == len(self.order) and self.target == self.path:
            return ""
        of = f"{complete} of {len(self.order)} results"
        if self.target == self.partial:
            return (f"{self.path} is untouched; {of} are in {self.partial}: rerun with --resume to finish them "
                    f"(it replaces {self.path} when done)")
        return f"{self.path} holds the first {of}: rerun with --resume to finish it"

    # ---- internals -----------------------------------------------------------------------------------------------

    @staticmethod
    def _has_content(path: Path) -> bool:
        try:
            return path.stat().st_size > 0
        except FileNotFoundError:
            return False
        except OSError as e:
            raise ResultsError(f"cannot use output file {path}: {e.strerror}") from None

    def _check_writable(self) -> None:
        """Fail now, before any model work, rather than at the first result."""
        folder = self.target.parent
        if not folder.is_dir():
            raise ResultsError(f"cannot write {self.path}: folder {folder} does not exist")
        for path in (self.path, self.target):
            if path.is_dir():
                raise ResultsError(f"cannot write {path}: it is a folder")
            if path.exists() and not os.access(path, os.W_OK):
                raise ResultsError(f"cannot write {path}: permission denied")
        if not self.target.exists() and not os.access(folder, os.W_OK):
            raise ResultsError(f"cannot write {self.target}: folder {folder} is not writable")

    def _resume(self, key, check) -> None:
        try:
            records, self._cut_at = read_complete_lines(self.target)
        except OSError as e:
            raise ResultsError(f"cannot read {self.target} to resume: {e.strerror}") from None
        if len(records) > len(self.order):
            raise ResultsError(f"{self.target} holds {len(records)} results, but this run has only "
                               f"{len(self.order)} prompts: it is not this run's output")
        for number, record in enumerate(records, 1):
            expected = self.order[number - 1]
            try:
                found = key(record)
            except (KeyError, TypeError, ValueError):
                raise ResultsError(f"{self.target} line {number} has no index: not a result line") from None
            if found != expected:
                raise ResultsError(f"{self.target} line {number} holds the result for index {found!r}, but this run "
                                   f"puts index {expected} there: it is another run's output (other prompts or "
                                   "--shard); remove it or run without --resume")
            reason = check(expected, record) if check else None
            if reason:
                raise ResultsError(f"{self.target} line {number}: {reason}; remove it or run without --resume")
        self._next = len(records)

    def _open(self) -> None:
        if self._file is not None:
            return
        try:
            if self._cut_at is not None:  # resume: drop the torn tail, then append
                self._file = open(self.target, "ab")
                self._file.truncate(self._cut_at)
            elif self.target == self.partial:
                self._file = open(self.target, "wb")  # an older FILE.partial (not resumed) is superseded
            else:
                self._file = open(self.target, "ab")  # missing or empty FILE
                # A FILE.partial left by an earlier failed run is superseded by this fresh run; left in place, a
                # later --resume would take it for the newer run.
                self.partial.unlink(missing_ok=True)
        except OSError as e:
            raise ResultsError(f"cannot write {self.target}: {e.strerror}") from None

    def _write(self, record: dict) -> None:
        self._open()
        line = (json_line(record) + "\n").encode("utf-8")
        try:
            self._file.write(line)  # one write; a kill mid-line leaves a torn line that --resume drops
            self._file.flush()
        except OSError as e:
            raise ResultsError(f"cannot write {self.target}: {e.strerror}") from None
        self._written += 1
