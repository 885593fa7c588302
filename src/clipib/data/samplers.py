"""A distributed sampler for evaluation that never repeats an index.

``torch.utils.data.DistributedSampler`` pads the index list with duplicates so every rank gets the
same count; evaluated records would then contain some samples twice (DESIGN.md §5). Here rank ``r``
of ``W`` takes indices ``r, r + W, r + 2W, …``: each index exactly once over all ranks, counts
differing by at most one. It subclasses ``DistributedSampler`` so Lightning leaves it in place
(Lightning only injects its own sampler when the DataLoader's is not a ``DistributedSampler``).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sized

from torch.utils.data import DistributedSampler


class UnrepeatedDistributedSampler(DistributedSampler):
    """Strided, unpadded, unshuffled split of ``range(len(dataset))`` over ``num_replicas`` ranks.

    >>> [list(UnrepeatedDistributedSampler(range(5), num_replicas=2, rank=r)) for r in (0, 1)]
    [[0, 2, 4], [1, 3]]
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        """This rank's indices."""
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        """Number of indices on this rank (may differ by one between ranks)."""
        return self.num_samples
