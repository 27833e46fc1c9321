"""Which records train and which are held out for the eval/ metrics.

A user's data is used whole: every record either trains or is held out, and the held-out ones
are drawn at random (seeded by `seed`), so a file sorted by topic or date does not hold out only
its tail. The bundled arithmetic sets keep the split the default job has always been measured
on: their last records held out, their first 256 trained on (`num_train=auto`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BUNDLED_NUM_TRAIN = 256  # the default job's training pairs


@dataclass
class Split:
    train: list[int]  # record indices, in file order
    eval: list[int]
    unused: int  # records neither trained on nor held out (num_train below the training part)
    how: str  # how the held-out records were chosen, for the note


def split_records(
    n: int, num_eval: int, num_train: int | str | None, seed: int, bundled: bool
) -> Split:
    """Hold out `num_eval` of `n` records (at most a fifth), then keep the first `num_train`
    (None: all; 'auto': all, or BUNDLED_NUM_TRAIN of a bundled set) of the rest."""
    n_eval = min(num_eval, n // 5)  # never eat more than a fifth of the data
    if bundled:
        held = list(range(n - n_eval, n))
        how = f"the bundled set's last {n_eval}"
    else:
        # random.Random(int).sample gives the same choice on every platform and Python 3 version
        held = sorted(random.Random(seed).sample(range(n), n_eval))
        how = f"drawn at random with seed {seed}"
    held_set = set(held)
    train = [i for i in range(n) if i not in held_set]
    limit = train_limit(num_train, bundled)
    if limit is not None and limit < len(train):
        unused, train = len(train) - limit, train[:limit]
    else:
        unused = 0
    return Split(train, held, unused, how)


def train_limit(num_train: int | str | None, bundled: bool) -> int | None:
    """How many records train at most: num_train, where 'auto' is all but for the bundled sets."""
    if num_train == "auto":
        return BUNDLED_NUM_TRAIN if bundled else None
    return num_train


def split_note(
    name: str, split: Split, held_out: int, num_train, n_examples: int, batch_size: int
) -> str:
    """What the run trains on, said once: counts, the held-out choice, what is left out.
    `held_out` counts the held-out records (from `split`, or from eval_data)."""
    parts = [f"{name}: {len(split.train)} records train, {held_out} held out ({split.how})"]
    if split.unused:
        parts.append(f"{split.unused} more not used (num_train={num_train})")
    dropped = n_examples % batch_size
    batches = f"{n_examples // batch_size} full batches of {batch_size}"
    parts.append(
        f"the {n_examples} training examples make {batches}"
        if not dropped
        else f"the {n_examples} training examples make {batches}: the {dropped} past the last "
        f"full batch are left out of each epoch (each epoch draws a new order)"
    )
    return "; ".join(parts)
