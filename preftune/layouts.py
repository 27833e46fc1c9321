"""How the sequences of a batch are laid out for one forward of the log-prob engine.

`TokenBatch` holds token ids, position ids and the attention mask of a layout, and which
positions are scored. Layouts: one sequence per padded row, sequences packed into rows
(position ids restarting per sequence), each prompt once with its completions branching from it
under a 4-D mask (`build_shared_prompt_batch`), and, in any of the padded ones, the tokens every
prompt starts with kept apart as a shared prefix (`TokenBatch.prefix_ids`) for the engine to run
once. preftune/logps.py runs them; tests/test_logps.py checks every layout against each
sequence alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SHARED_PREFIX = 8  # tokens; below this a separate prefix forward does not pay


@dataclass
class TokenBatch:
    """Sequences laid out for one forward.

    input_ids, position_ids: (R, T) — R rows; padded layout has one sequence per row, packed
        layout several sequences per row with position ids restarting at 0.
    attention_mask: (R, T), None (packed: attention stays within a sequence through position
        ids), or a boolean (R, 1, T, T) mask (True = may attend) for the shared-prompt layout,
        where several completions branch from one copy of their prompt.
    target_pos: (N,) flat indices into (R*T) of the positions whose next token is scored.
    target_ids: (N,) the scored next tokens.  seq_index: (N,) which sequence each belongs to.
    num_seqs: S sequences in all.
    prefix_ids: (L0,) tokens every sequence starts with, laid out once and not in the rows (whose
        position ids then start at L0); None when the batch has no shared prefix. target_pos
        indexes the rows only: the prefix's own tokens are never scored.
    paths: the varlen layout (preftune/varlen_layout.py): one row, no padding, no mask; each
        path is one sequence's context as ((start, end), ...) spans of the row, and the number
        of its trailing tokens it computes attention for. None for every other layout.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    seq_index: torch.Tensor
    num_seqs: int
    prefix_ids: torch.Tensor | None = None
    paths: tuple[tuple[tuple[tuple[int, int], ...], int], ...] | None = None

    def to(self, device) -> TokenBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TokenBatch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.position_ids),
            move(self.target_pos),
            move(self.target_ids),
            move(self.seq_index),
            self.num_seqs,
            move(self.prefix_ids),
            self.paths,
        )

    @property
    def lengths(self) -> torch.Tensor:
        return torch.bincount(self.seq_index, minlength=self.num_seqs)

    def without_prefix(self) -> TokenBatch:
        """The same sequences with the shared prefix laid out at the start of every row: what a
        decoder that cannot take a KV cache (gradient checkpointing in training) runs, and the
        plain form the tests compare the cached one with."""
        if self.prefix_ids is None:
            return self
        L0, (R, T) = self.prefix_ids.numel(), self.input_ids.shape
        dev = self.input_ids.device
        input_ids = torch.cat([self.prefix_ids.expand(R, L0), self.input_ids], 1)
        position_ids = torch.cat([torch.arange(L0, device=dev).expand(R, L0), self.position_ids], 1)
        if self.attention_mask.dim() == 2:
            mask = with_prefix_columns(self.attention_mask, L0)
        else:  # the prefix attends causally to itself; every row token sees all of it
            mask = torch.zeros(R, 1, L0 + T, L0 + T, dtype=torch.bool, device=dev)
            mask[..., :L0, :L0] = torch.ones(L0, L0, dtype=torch.bool, device=dev).tril()
            mask[..., L0:, :] = with_prefix_columns(self.attention_mask, L0)
        row, col = self.target_pos // T, self.target_pos % T
        return TokenBatch(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            target_pos=row * (L0 + T) + L0 + col,
            target_ids=self.target_ids,
            seq_index=self.seq_index,
            num_seqs=self.num_seqs,
        )


def laid_out(ids: list[int], start: int) -> list[int]:
    """The tokens of a sequence (`start` = its first scored token) that go into the forward.

    Position t predicts token t+1, so the last token's output is never used, and in a causal
    model no other position reads its keys and values: laying it out would cost a forward and a
    backward position for nothing (one in ~20 tokens of a chat preference pair). A sequence with
    nothing to score is laid out whole (it keeps at least one position)."""
    return ids[:-1] if len(ids) > max(start, 1) else ids


def branch_point(completions: list[list[int]]) -> int:
    """How many leading tokens of `completions` (the K completions of one prompt) to lay out
    once in the shared trunk: the tokens they all start with, except a final one that no
    completion continues (it would predict nothing)."""
    longest = max(len(c) for c in completions)
    m = 0
    while m < longest - 1 and all(len(c) > m and c[m] == completions[0][m] for c in completions):
        m += 1
    return m


def shared_group_length(
    prompt: list[int], completions: list[list[int]], share_completion_prefix: bool = True
) -> int:
    """Tokens `build_shared_prompt_batch` lays out for one prompt (after any shared prefix) and
    its completions: the trunk, then each branch without its last token."""
    m = branch_point(completions) if share_completion_prefix else 0
    return len(prompt) + m + sum(len(c[m:-1]) for c in completions)


def with_prefix_columns(mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """A row mask (R, T) or (R, 1, T, T) widened by `prefix` leading key columns, all visible."""
    ones = torch.ones(mask.shape[:-1] + (prefix,), dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], -1)


def common_prefix_length(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for k in range(max(n, 0)):
        if any(r[k] != first[k] for r in rows):
            return k
    return max(n, 0)


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Leading tokens to lay out once for a batch of `prompts`: their common prefix, each prompt
    keeping at least one token (the position that predicts its first completion token); 0 for a
    single prompt or a prefix shorter than MIN_SHARED_PREFIX, where a separate forward costs
    more than it saves."""
    if len(prompts) < 2:
        return 0
    n = common_prefix_length(prompts)
    return n if n >= MIN_SHARED_PREFIX else 0


def _layout(
    seqs: list[tuple[list[int], int]],
    pad_id: int,
    packed: bool,
    max_row: int | None = None,
    first_position: int = 0,
) -> TokenBatch:
    """seqs: (token ids, completion start). Builds the padded or packed TokenBatch; position ids
    start at `first_position` (the length of a shared prefix kept apart). A sequence's last
    token is only a target (`laid_out`), so it is not laid out."""
    seqs = [(laid_out(ids, start), start, ids) for ids, start in seqs]
    rows: list[list[tuple[int, list[int], int, list[int]]]] = []  # (seq, laid, start, ids)
    if packed:
        limit = max_row or sum(len(laid) for laid, _, _ in seqs)
        cur: list = []
        used = 0
        for i, (laid, start, ids) in enumerate(seqs):
            if cur and used + len(laid) > limit:
                rows.append(cur)
                cur, used = [], 0
            cur.append((i, laid, start, ids))
            used += len(laid)
        rows.append(cur)
    else:
        rows = [[(i, laid, start, ids)] for i, (laid, start, ids) in enumerate(seqs)]
    width = max(sum(len(laid) for _, laid, _, _ in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, width), dtype=torch.long)
    attention_mask = torch.zeros((R, width), dtype=torch.long)
    pos, tgt, sidx = [], [], []
    for r, row in enumerate(rows):
        off = 0
        for i, laid, start, ids in row:
            n = len(laid)
            input_ids[r, off : off + n] = torch.tensor(laid)
            position_ids[r, off : off + n] = torch.arange(first_position, first_position + n)
            attention_mask[r, off : off + n] = 1
            # position t predicts token t+1: score tokens start..end from positions start-1..
            for t in range(start, len(ids)):
                pos.append(r * width + off + t - 1)
                tgt.append(ids[t])
                sidx.append(i)
            off += n
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=None if packed else attention_mask,
        position_ids=position_ids,
        target_pos=torch.tensor(pos, dtype=torch.long),
        target_ids=torch.tensor(tgt, dtype=torch.long),
        seq_index=torch.tensor(sidx, dtype=torch.long),
        num_seqs=len(seqs),
    )


def build_token_batch(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    packed: bool = False,
    max_row: int | None = None,
    share_prefix: bool = False,
) -> TokenBatch:
    """prompt_i + completion_i for every i; only completion tokens are scored.

    `share_prefix`: the prompts' common leading tokens (`shared_prefix_length`) are kept apart
    in `prefix_ids` and run once. Padded layout only: the packed layout has no mask (sequences
    are told apart by their position ids), which a KV cache cannot serve.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError(
            "every sequence needs at least one prompt token (a BOS or chat header) to condition on"
        )
    L0 = shared_prefix_length(prompts) if share_prefix and not packed else 0
    seqs = [(p[L0:] + c, len(p) - L0) for p, c in zip(prompts, completions)]
    batch = _layout(seqs, pad_id, packed, max_row, first_position=L0)
    if L0:
        batch.prefix_ids = torch.tensor(prompts[0][:L0], dtype=torch.long)
    return batch


def build_shared_prompt_batch(
    prompts: list[list[int]],
    branches: list[list[list[int]]],
    pad_id: int,
    packed: bool = False,
    share_prefix: bool = False,
    share_completion_prefix: bool = True,
    fit_rows: bool = False,
) -> TokenBatch:
    """Each prompt once, its K completions branching from it: [prompt | c_1 | c_2 | ...].

    Completion k of prompt i is sequence k * n + i (so for pairs: chosen 0..n-1, rejected
    n..2n-1, the order of `build_token_batch(prompts * 2, chosen + rejected)`). Every branch
    continues the prompt's position ids (len(prompt), len(prompt) + 1, ...) and a boolean 4-D
    mask lets a branch token see its prompt and the earlier tokens of its own branch only, so
    each completion's log-prob is that of prompt + completion alone, while the prompt's
    forward (and backward) is done once instead of K times. `packed` puts all groups in one
    row (block-diagonal mask); otherwise one group per row, padded, or with `fit_rows` as many
    groups per row as fit in the longest group's width (`fitted_rows`). `share_prefix`: the
    prompts' common leading tokens are kept apart in `prefix_ids`, run once and seen by every
    group (in both layouts). A branch's last token is a target only and is not laid out.

    `share_completion_prefix`: the tokens all K completions of a prompt start with join the
    prompt in the shared trunk (`branch_point`): they are laid out once, and their log-probs,
    the same for every completion (same context, same token), come from one position each —
    an edit pair such as "58 + 51 = 109" / "58 + 51 = 129" branches at the differing digit.
    """
    n, K = len(prompts), _check_branches(prompts, branches)
    L0 = shared_prefix_length(prompts) if share_prefix else 0
    groups = [
        _group(i, n, p, comps, L0, share_completion_prefix)
        for i, (p, comps) in enumerate(zip(prompts, branches))
    ]
    if packed:
        rows = [list(range(n))]
    elif fit_rows:
        rows = fitted_rows([len(g[0]) for g in groups])
    else:
        rows = [[i] for i in range(n)]
    batch = _assemble_groups(groups, rows, pad_id, num_seqs=n * K)
    batch.prefix_ids = torch.tensor(prompts[0][:L0], dtype=torch.long) if L0 else None
    return batch


def fitted_rows(lengths: list[int]) -> list[list[int]]:
    """Groups of `lengths` into rows no wider than the longest, first fit in decreasing order:
    the padded layout's width with fewer rows, so less padding in every layer and fewer
    (width x width) attention squares (W6's chat pairs: 8 rows of ~505 slots for ~2,900
    tokens become 6)."""
    width, rows, used = max(lengths), [], []
    for g in sorted(range(len(lengths)), key=lambda g: -lengths[g]):
        r = next((r for r in range(len(rows)) if used[r] + lengths[g] <= width), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(g)
        used[r] += lengths[g]
    return rows


def _check_branches(prompts: list[list[int]], branches: list[list[list[int]]]) -> int:
    """K, the number of completions of every prompt; a ValueError for a malformed batch."""
    n = len(prompts)
    if n == 0 or len(branches) != n:
        raise ValueError(f"need one list of completions per prompt, got {len(branches)} for {n}")
    K = len(branches[0])
    if K == 0 or any(len(b) != K for b in branches):
        raise ValueError("every prompt needs the same number (>= 1) of completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(
            "every sequence needs at least one prompt token (a BOS or chat header) to condition on"
        )
    return K


def _group(i: int, n: int, p: list[int], comps: list[list[int]], L0: int, share_comps: bool):
    """Prompt i's group: (token ids, position ids, branch id per token (-1: the trunk),
    [(source offset, target token, sequence index)]), its first L0 tokens left to the prefix."""
    own = p[L0:]
    m = branch_point(comps) if share_comps else 0
    trunk = own + comps[0][:m]
    ids, pos, br, tg = list(trunk), list(range(L0, len(p) + m)), [-1] * len(trunk), []
    for k, c in enumerate(comps):
        off = len(ids)
        for j, tok in enumerate(c):
            # token j is predicted from token j - 1: in the trunk (the prompt's last token
            # for j = 0), or in this branch
            src = len(own) + j - 1 if j - 1 < m else off + j - 1 - m
            tg.append((src, tok, k * n + i))
        c = c[m:-1]  # a branch's last token is only a target (see `laid_out`)
        ids += c
        pos += range(len(p) + m, len(p) + m + len(c))
        br += [k] * len(c)
    return ids, pos, br, tg


def _assemble_groups(groups: list[tuple], rows: list[list[int]], pad_id: int, num_seqs: int):
    """The groups laid out in `rows` (lists of group indices), with the mask that lets a token
    see its own group's trunk and the earlier tokens of its own branch only."""
    width = max(sum(len(groups[g][0]) for g in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, width), dtype=torch.long)
    group_of = torch.full((R, width), -1, dtype=torch.long)
    branch_of = torch.full((R, width), -2, dtype=torch.long)
    pos_t, tgt, sidx = [], [], []
    for r, row in enumerate(rows):
        off = 0
        for g in row:
            ids, pos, br, tg = groups[g]
            L = len(ids)
            input_ids[r, off : off + L] = torch.tensor(ids)
            position_ids[r, off : off + L] = torch.tensor(pos)
            group_of[r, off : off + L] = g
            branch_of[r, off : off + L] = torch.tensor(br)
            for src, tok, seq in tg:
                pos_t.append(r * width + off + src)
                tgt.append(tok)
                sidx.append(seq)
            off += L
    q_group, k_group = group_of[:, :, None], group_of[:, None, :]
    q_branch, k_branch = branch_of[:, :, None], branch_of[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (
        (q_group == k_group) & (k_group >= 0) & ((k_branch == -1) | (k_branch == q_branch)) & causal
    )
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax row
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=mask[:, None],
        position_ids=position_ids,
        target_pos=torch.tensor(pos_t, dtype=torch.long),
        target_ids=torch.tensor(tgt, dtype=torch.long),
        seq_index=torch.tensor(sidx, dtype=torch.long),
        num_seqs=num_seqs,
    )
