"""When a sequence ends: its eos ids, and stop strings matched the way Transformers' StopStringCriteria does.

StopCondition answers for a whole batch of equal-length rows as tensors (beam search) and for one row's token list
on the host (the engine, after each step's single sync).
"""

import torch


class StopCondition:
    """Which rows just ended: last token is an eos id, or a stop string ends in the last token.

    Stop strings follow HF's StopStringCriteria: a match must overlap the last token (it may start inside an earlier
    one or stick out before the window), and the whole row, prompt included, is the text searched. Call with
    sequences [N, cur_len] -> BoolTensor [N]. max_length is not checked here.
    """

    def __init__(self, eos_token_id: list[int] | int | None, stop_strings: list[str] | None = None,
                 vocab: dict[str, int] | None = None, token_bytes: list[bytes] | None = None):
        """token_bytes: token_bytes_from_vocab(vocab), when many conditions share one vocabulary."""
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos_ids = torch.tensor(eos, dtype=torch.long)
        self.eos_set = set(eos)
        self.stop_strings = [s.encode("utf-8") for s in (stop_strings or [])]
        self.token_bytes = []
        if self.stop_strings:
            if vocab is None and token_bytes is None:
                raise ValueError("stop_strings need the tokenizer vocabulary (vocab=tokenizer.get_vocab())")
            self.token_bytes = token_bytes if token_bytes is not None else token_bytes_from_vocab(vocab)
            # HF looks at most one token per character of the longest stop string
            self.window = max(len(s) for s in self.stop_strings)

    @property
    def tail_length(self) -> int:
        """How many of a row's last tokens `ends` needs."""
        return self.window if self.stop_strings else 1

    def ends(self, tokens: list[int]) -> bool:
        """Whether the row tokens (prompt + generated) just ended: its last token is an eos id, or a stop string
        ends in it."""
        if tokens[-1] in self.eos_set:
            return True
        return bool(self.stop_strings) and self._ends_with_stop_string(tokens[-self.window:])

    def __call__(self, sequences: torch.LongTensor) -> torch.BoolTensor:
        ended = torch.isin(sequences[:, -1], self.eos_ids.to(sequences.device))
        if self.stop_strings:
            tails = sequences[:, -self.window :].tolist()
            for row, tail in enumerate(tails):
                if not ended[row] and self._ends_with_stop_string(tail):
                    ended[row] = True
        return ended

    def _ends_with_stop_string(self, token_ids: list[int]) -> bool:
        pieces = [self.token_bytes[t] if 0 <= t < len(self.token_bytes) else b"" for t in token_ids]
        text = b"".join(pieces)
        last_start = len(text) - len(pieces[-1])
        # an occurrence counts when it ends inside the last token, i.e. starts after this offset
        return any(text.find(stop, max(0, last_start - len(stop) + 1)) != -1 for stop in self.stop_strings)


# GPT-2 byte-level BPE writes each byte as a printable character; this inverts that table.
def _byte_level_decoder() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes_from_vocab(vocab: dict[str, int]) -> list[bytes]:
    """The text (UTF-8 bytes) each token id stands for, as HF's StopStringCriteria cleans the vocabulary.

    Byte-level BPE ("Ġ" for space; Llama 3, SmolLM): map characters back to bytes. SentencePiece ("▁" for space;
    Llama 2): "▁" is a space and "<0xNN>" the byte NN. Anything else: the token's own text.
    """
    tokens = list(vocab)
    byte_level = any("Ġ" in t for t in tokens) and not any("▁" in t for t in tokens)
    sentencepiece = any("▁" in t for t in tokens)
    byte_decoder = _byte_level_decoder()
    table = [b""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        if byte_level and all(c in byte_decoder for c in token):
            text = bytes(byte_decoder[c] for c in token)
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            text = bytes([int(token[3:5], 16)])
        elif sentencepiece:
            text = token.replace("▁", " ").encode("utf-8")
        else:
            text = token.encode("utf-8")
        table[token_id] = text
    return table
