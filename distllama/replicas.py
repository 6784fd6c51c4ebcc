"""Data-parallel replicas (--dp): which prompts each replica runs, and the results they send rank 0 to write.

Every replica is a whole model (pp x tp ranks) with its own engine. The prompts are dealt by length, longest first,
back and forth, so that every replica gets as much work as the others and they finish together; a prompt's tokens do
not depend on the replica (its random stream comes from its index, distllama.sampling). Global rank 0, the first
replica's driver, writes every result in input order: the other drivers send each finished prompt's record to it
on a gloo group (a header, then the record as JSON bytes), which a thread on rank 0 receives while its own engine
runs.
"""

import json
import queue
import threading

import torch
import torch.distributed as dist

_END = -1  # header index: the sender is done


def share(order: list[int], lengths: dict[int, int], replicas: int, replica: int) -> list[int]:
    """The prompts (indices, in input order) replica `replica` runs: the prompts sorted by length, longest first,
    dealt back and forth (0, 1, ..., n-1, n-1, ..., 0, 0, 1, ...), so every replica gets as many tokens as the others."""
    by_length = sorted(order, key=lambda i: (-lengths[i], i))
    return sorted(i for k, i in enumerate(by_length)
                  if (k % replicas if k // replicas % 2 == 0 else replicas - 1 - k % replicas) == replica)


class ResultSender:
    """A replica driver's end: each finished prompt's record goes to rank 0."""

    def __init__(self, group):
        self.group = group

    def send(self, index: int, record: dict, tokens: int) -> None:
        data = json.dumps(record, ensure_ascii=False).encode()
        dist.send(torch.tensor([index, tokens, len(data)], dtype=torch.long), 0, group=self.group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)

    def close(self) -> None:
        dist.send(torch.tensor([_END, 0, 0], dtype=torch.long), 0, group=self.group)


class ResultReceiver:
    """Rank 0's end: a thread takes the records of the other replicas as they come (from any sender)."""

    def __init__(self, group, senders: int):
        self.group, self.senders = group, senders
        self.records: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._receive, name="distllama-results", daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        try:
            open_senders = self.senders
            while open_senders:
                header = torch.empty(3, dtype=torch.long)
                sender = dist.recv(header, group=self.group)  # from whichever replica is ready
                index, tokens, size = header.tolist()
                if index == _END:
                    open_senders -= 1
                    continue
                data = torch.empty(size, dtype=torch.uint8)
                dist.recv(data, sender, group=self.group)
                self.records.put((index, tokens, json.loads(bytes(data.numpy()))))
        except BaseException as e:  # reported on the main thread by drain / wait
            self.error = e

    def drain(self, emit) -> None:
        """Hand on what has arrived: emit(index, record, tokens)."""
        while True:
            try:
                index, tokens, record = self.records.get_nowait()
            except queue.Empty:
                break
            emit(index, record, tokens)
        if self.error is not None:
            raise self.error

    def wait(self, emit) -> None:
        """Hand on everything until every sender is done."""
        while self.thread.is_alive() or not self.records.empty():
            self.thread.join(timeout=0.2)
            self.drain(emit)
        self.drain(emit)
