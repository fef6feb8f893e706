"""Batches for the loop: a right-padding collator, a seeded distributed sampler, and the training stream whose
position a checkpoint stores."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from hiddenkey_ds.data.encoding import IGNORE_INDEX


def make_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """list of {"input_ids", "labels"} -> padded long tensors input_ids, attention_mask, labels (-100 on padding):
    transformers' DataCollatorForSeq2Seq. It costs ~1 ms more per 8 x 256 batch than a hand-written torch.full
    collator (measured), nothing next to a training step.

    Right padding: positions keep their ids from 0, and causal attention never looks at the padded tail.
    """
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: load it with hiddenkey_ds.models.loading.load_tokenizer")
    if tokenizer.padding_side != "right":
        raise ValueError(f"the tokenizer pads on the {tokenizer.padding_side}; training needs right padding: load it "
                         "with hiddenkey_ds.models.loading.load_tokenizer")
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                                 label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        # only the model's inputs: other columns (lengths, status) would reach tokenizer.pad and fail to stack
        return dict(pad([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]))

    return collate


class ShardSampler(DistributedSampler):
    """DistributedSampler that knows how many of its indices are real.

    Training (drop_last=True): the tail that does not divide evenly is dropped, so ranks see disjoint shards
    of equal size. Evaluation (drop_last=False): every example is seen; to give all ranks the same number of
    batches (ZeRO-3 forwards are collective) the shards are padded with repeats of the first examples, and
    those come last in each rank's order: only the first ``num_real`` samples of this rank should be scored.
    """

    @property
    def num_real(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.drop_last:
            return self.num_samples
        # DistributedSampler gives rank r the global positions r, r + W, r + 2W, ...; positions >= n are padding
        return len(range(self.rank, min(n, self.total_size), self.num_replicas))


def make_sampler(dataset: Any, world_size: int, rank: int, seed: int, shuffle: bool, drop_last: bool = True) -> ShardSampler:
    """Seeded sampler of this rank's shard.

    Training keeps the default ``drop_last=True`` (disjoint shards, no repeated example, whether shuffled or
    not); evaluation passes ``shuffle=False, drop_last=False`` and scores the first ``sampler.num_real``.
    The loop must call ``sampler.set_epoch(epoch)`` before each epoch: the shuffle order is a function of
    (seed, epoch) only, identical on every rank and every resume.
    """
    if drop_last and len(dataset) < world_size:
        raise ValueError(f"{len(dataset)} examples cannot be split across {world_size} ranks")
    return ShardSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)


class MicroBatchStream:
    """This rank's training micro-batches, epoch after epoch, with an exact position to checkpoint.

    The position is ``(epoch, index)``: ``index`` micro-batches of ``epoch`` have been handed out. It advances
    when a batch is handed out, not by arithmetic at the optimizer step, so a step whose micro-batches span an
    epoch boundary (``train.grad_accum`` not dividing the epoch) is restored exactly: ``load_state_dict`` of a
    saved position gives the same remaining batches as the uninterrupted run. Each epoch's order is
    ``sampler.set_epoch(epoch)``'s, a function of (seed, epoch) only; the partial last micro-batch of an epoch
    is dropped (every rank runs the same number of forwards).

    torchdata's StatefulDataLoader would replace only the ``index`` bookkeeping: the epoch loop, ``set_epoch``
    and the grouping into optimizer steps stay here either way, so it is not worth a dependency.
    """

    def __init__(self, dataset: Any, sampler: DistributedSampler, collate: Callable[[list[dict]], dict],
                 micro_batch_size: int):
        self.dataset, self.sampler, self.collate, self.micro_batch_size = dataset, sampler, collate, micro_batch_size
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.micro_batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"data position {index} is outside an epoch of {self.batches_per_epoch} micro-batches")
        self.epoch, self.index, self._order = epoch, index, None

    def __iter__(self) -> "MicroBatchStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batches_per_epoch == 0:
            raise ValueError("the training split holds fewer examples per rank than one micro-batch")
        if self.index >= self.batches_per_epoch:  # epoch done: the next one reshuffles with its own seed
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        start = self.index * self.micro_batch_size
        rows = self._order[start:start + self.micro_batch_size]
        self.index += 1
        return self.collate([self.dataset[j] for j in rows])
