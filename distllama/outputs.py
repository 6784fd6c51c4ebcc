"""What generation returns: one PromptOutput per prompt, holding its sequences (one, or num_return_sequences).

Its own module so that the engine, beam search and the command line can all import it without importing each other.
"""

from dataclasses import dataclass, field


@dataclass
class SequenceOutput:
    output_ids: list[int]  # generated tokens only, up to and including the eos / stop token; no padding after
    finish_reason: str  # "eos" (eos token or stop string) or "length"
    token_logprobs: list[float]  # log_softmax of the model's raw logits (before processors) at each output id
    score: float | None = None  # beam search: the sequence score, as HF's sequences_scores


@dataclass
class PromptOutput:
    sequences: list[SequenceOutput] = field(default_factory=list)  # num_return_sequences entries, best first
