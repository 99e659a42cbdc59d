"""Aspect-ratio buckets: sizes near the training area so wide and tall images keep their framing."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[Bucket]:
    """All sizes with sides a multiple of `step`, area at most resolution², aspect within `max_aspect`.

    For each width the tallest height fitting the area is taken, as kohya's bucketing does.
    """
    area = resolution * resolution
    buckets = {Bucket(resolution, resolution)}
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            buckets.add(Bucket(width, height))
        width += step
    return sorted(buckets, key=lambda b: b.aspect)


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's (compared in log space)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - aspect), -b.width * b.height))


def bucket_batches(bucket_of: list[Bucket], repeats: list[int], batch_size: int, seed: int):
    """Endless full batches of example indices, each from one bucket, reshuffled every epoch.

    Deterministic in (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
    """
    epoch = 0
    while True:
        rng = random.Random(f"{seed}-{epoch}")
        by_bucket: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            by_bucket.setdefault(bucket, []).extend([index] * repeats[index])
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                # Always full: the last batch of a bucket is topped up from its start, so every
                # data-parallel process gets its share and batch statistics don't jump.
                batches.append(batch + [indices[i % len(indices)] for i in range(batch_size - len(batch))])
        rng.shuffle(batches)
        yield from batches
        epoch += 1
