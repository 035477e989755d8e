"""Turning rendered examples into padded token batches, the same way for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantorder.config import ANSWER_MARKER
from quantorder.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized example; `labels` has IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, text: str, max_len: int, answer_only: bool = False) -> Example:
    """Tokenize as the Olive study does: `f"{bos} {text} {eos}"`, special tokens as text, truncated.

    With `answer_only`, tokens that end before the answer (after ANSWER_MARKER) are not targets.
    """
    full = f"{tokenizer.bos_token} {text} {tokenizer.eos_token}"
    enc = tokenizer(
        full, add_special_tokens=False, truncation=True, max_length=max_len, return_offsets_mapping=answer_only
    )
    ids = enc["input_ids"]
    labels = list(ids)
    if answer_only:
        marker = full.find(ANSWER_MARKER)
        if marker < 0:  # scoring every token would pass for answer-only perplexity
            raise UserError(f"answer-only scoring needs {ANSWER_MARKER!r} in every example; it is not in {text[:80]!r}")
        start = marker + len(ANSWER_MARKER)
        labels = [IGNORE_INDEX if end <= start else tok for tok, (_, end) in zip(ids, enc["offset_mapping"])]
    return Example(ids, labels)


def pad_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed NLL (float32) and target count; logits predict the next token."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    valid = targets != IGNORE_INDEX
    return (nll * valid).sum(dim=1), valid.sum(dim=1)
