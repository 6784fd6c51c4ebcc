"""The GPU's rules, checked on the CPU: no GPU runs in CI, so a run here pretends its device ("cpu:0") is apart from
the host. Every tensor is tagged where it was made (the run's device, or the host), the tag follows each op, and the
checks are the ones a cuda run would fail on or slow down at: an op mixing host and device tensors (a 0-dim host
tensor is allowed, as on cuda), and a device tensor read on the host (a synchronisation) more than once per step."""

import json
import traceback
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import distllama.distributed
from checkpoints import MIXED_PROMPTS, build_checkpoint
from distllama import generate
from distllama.pipeline import Pipeline

DEVICE = torch.device("cpu", 0)  # what the run takes for its accelerator; its tensors still live in host memory
HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "equal"}
MIXING_ALLOWED = {"copy_", "to", "__get__", "__set__"}  # copies across devices, attribute access


class TwoDevices(TorchFunctionMode):
    """Tags tensors host or device; records ops mixing them, and host reads of device tensors, by source line."""

    def __init__(self):
        super().__init__()
        self.on_device = {}  # id(tensor) -> weakref, for the tensors on DEVICE
        self.mixed, self.host_reads = [], []

    def is_device(self, t) -> bool:
        if isinstance(t, torch.nn.Parameter):  # weights are made on the device (nn.Parameter wraps a new object)
            return True
        ref = self.on_device.get(id(t))
        return ref is not None and ref() is t

    def tag(self, t) -> None:
        key = id(t)
        self.on_device[key] = weakref.ref(t, lambda _, key=key: self.on_device.pop(key, None))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        on_device = any(self.is_device(t) for t in tensors)
        on_host = any(not self.is_device(t) and t.dim() > 0 for t in tensors)
        indexing = name == "__getitem__" and self.is_device(args[0])  # cuda takes host indices
        if on_device and on_host and name not in MIXING_ALLOWED and not indexing:
            self.mixed.append(f"{name} at {caller()}")
        if name in HOST_READS and tensors and self.is_device(tensors[0]):
            self.host_reads.append(f"{name} at {caller()}")
        out = func(*args, **kwargs)
        if name == "__get__" and isinstance(out, torch.device) and on_device:
            return DEVICE  # x.device of a device tensor: the run's device
        targets = [x for x in leaves if isinstance(x, (torch.device, str))]
        if name in ("cpu", "to") and out is args[0] and not any(x in (DEVICE, "cpu:0") for x in targets) and (
                name == "cpu" or any(x in (torch.device("cpu"), "cpu") for x in targets)):
            out = out.clone()  # a device -> host copy is a new tensor, also where the two share memory here
            return out
        if name == "to" and any(x in (DEVICE, "cpu:0") for x in targets):
            on_device = True
        elif not tensors:  # a factory: on the device only where asked for
            on_device = any(x in (DEVICE, "cpu:0") for x in leaves)
        if on_device:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.tag(t)
        return out


def caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/distllama/" in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    build_checkpoint(folder)
    return folder


@pytest.mark.parametrize("options", [
    [],
    ["--do-sample", "--seed", "3", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.05",
     "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "2", "--min-new-tokens", "3"],
    ["--do-sample", "--seed", "1", "--typical-p", "0.9", "--epsilon-cutoff", "0.0003", "--eta-cutoff", "0.0003",
     "--bad-words-ids", "[[5, 6], [7]]", "--suppress-tokens", "[3, 4]", "--eos-token-id", "[2, 7]",
     "--exponential-decay-length-penalty", "[3, 1.5]", "--forced-eos-token-id", "2"],
    ["--max-prefill-tokens", "4", "--stop-strings", '["a"]', "--num-return-sequences", "1"],
    ["--num-beams", "3", "--num-return-sequences", "2"],
], ids=["greedy", "sampling", "more-processors", "chunked-prefill", "beams"])
def test_no_host_device_mixing_and_one_host_read_per_step(folder, tmp_path, monkeypatch, options):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in MIXED_PROMPTS))
    monkeypatch.setattr(distllama.distributed, "pick_device", lambda device, local_rank: DEVICE)
    steps, reads_at_start = [], []  # loading may read the device (a packed weight's probe); each step once at most
    result, submit = Pipeline.result, Pipeline.submit

    def first_submit_marks_the_start(self, plan):
        if not reads_at_start:
            reads_at_start.append(len(mode.host_reads))
        return submit(self, plan)
    monkeypatch.setattr(Pipeline, "result", lambda self: steps.append(1) or result(self))
    monkeypatch.setattr(Pipeline, "submit", first_submit_marks_the_start)
    mode = TwoDevices()
    with mode:
        code = generate.main(["--model", str(folder), "--device", "cpu", "--prompts-file", str(prompts),
                              "--max-batch-size", "3", "--max-new-tokens", "6", "--output", str(tmp_path / "o.jsonl"),
                              *options])
    assert code == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == len(MIXED_PROMPTS)
    assert mode.mixed == []
    step_reads = mode.host_reads[reads_at_start[0]:]
    assert steps and len(step_reads) <= len(steps), sorted(set(step_reads))


def test_the_emulation_sees_mixing_and_host_reads():
    """The checks above can fail: a host tensor added to a device one, and a device value read on the host."""
    mode = TwoDevices()
    with mode:
        on_device = torch.zeros(3, device=DEVICE)
        on_host = torch.ones(3)
        on_device + torch.tensor(1.0)  # a 0-dim host tensor: allowed, as on cuda
        on_device + on_host
        moved = on_host.to(on_device.device) + on_device  # moved first: fine
        moved.sum().item()
        moved.cpu() + on_host  # a copy on the host: fine
    assert len(mode.mixed) == 1 and mode.mixed[0].startswith("add ")
    assert [r.split(" ")[0] for r in mode.host_reads] == ["item", "cpu"]
