"""ListOps with the rules of the Long Range Arena generator (Nangia & Bowman 2018; Tay et al. 2021).

An expression is a digit 0–9 or ``[OP a1 … an ]`` with 2..max_args operands, each itself an
expression. Operators: MIN, MAX, MED (median) and SM (sum modulo 10). The label is the value of the
expression, a digit, so the task is 10-way classification.

Generation follows LRA's ``generate_tree``: below ``max_depth`` a node is an operator with
probability 1/4 (else a digit), at ``max_depth`` always a digit; the operator and the digits are
uniform and the operand count is uniform in [2, max_args]. Whole trees are re-drawn until their
token count lies in [min_length, max_length].

MED of an even number of operands is the lower median (the smaller of the two middle values), so
every value stays a digit; LRA's ``int(np.median(x))`` truncates the mean of the middle values
instead, which gives a different label for some even-length operand lists.
"""
from __future__ import annotations

import random
from typing import Union

import torch

from seqmix.errors import SeqmixError, require_int, require_seed
from seqmix.tasks._checks import check_request
from seqmix.tasks.base import Batch, Task, generator_for

PAD = 0
DIGITS = tuple(range(1, 11))
"""Token of digit d is DIGITS[d] = d + 1."""
OPERATORS = ("MIN", "MAX", "MED", "SM")
OPENERS = {op: 11 + i for i, op in enumerate(OPERATORS)}
"""Token of each operator's opening bracket, rendered ``[MIN`` etc."""
CLOSE = 15
VOCAB_SIZE = 16

OPERATOR_P = 0.25
"""LRA's chance that a node above max_depth is an operator (its VALUE_P)."""
MAX_DRAWS = 10_000
"""Trees drawn per sequence before giving up on a length window that is (nearly) unreachable."""

Tree = Union[int, tuple[str, tuple["Tree", ...]]]
"""An expression: a digit, or (operator, operands)."""


def evaluate(tree: Tree) -> int:
    """The value (a digit) of an expression tree."""
    if isinstance(tree, int):
        return tree
    op, operands = tree
    values = sorted(evaluate(operand) for operand in operands)
    if op == "MIN":
        return values[0]
    if op == "MAX":
        return values[-1]
    if op == "MED":
        return values[(len(values) - 1) // 2]
    return sum(values) % 10


def tokenize(tree: Tree) -> list[int]:
    """The token ids of an expression tree (operator opener, operands, closer)."""
    if isinstance(tree, int):
        return [DIGITS[tree]]
    op, operands = tree
    return [OPENERS[op], *(token for operand in operands for token in tokenize(operand)), CLOSE]


def render(tokens) -> str:
    """Readable text of token ids (a list or a 1-D tensor); padding is dropped."""
    names = {DIGITS[d]: str(d) for d in range(10)} | {t: f"[{op}" for op, t in OPENERS.items()} | {CLOSE: "]"}
    return " ".join(names[int(t)] for t in tokens if int(t) != PAD)


def encode(text: str) -> list[int]:
    """Token ids of an expression written as ``render`` writes it, e.g. ``"[MAX 2 9 [MIN 4 7 ] 0 ]"``."""
    ids = {str(d): DIGITS[d] for d in range(10)} | {f"[{op}": t for op, t in OPENERS.items()} | {"]": CLOSE}
    unknown = [word for word in text.split() if word not in ids]
    if unknown:
        raise SeqmixError(f"listops: token {unknown[0]!r} is not valid; expected one of {sorted(ids)}")
    return [ids[word] for word in text.split()]


def parse(tokens) -> Tree:
    """The expression tree of token ids (padding ignored); malformed sequences raise SeqmixError."""
    stream = [int(t) for t in tokens if int(t) != PAD]
    operators = {t: op for op, t in OPENERS.items()}
    stack: list[tuple[str, list[Tree]]] = []
    result: list[Tree] = []
    for position, token in enumerate(stream):
        if token in operators:
            stack.append((operators[token], []))
            continue
        if token == CLOSE:
            if not stack or len(stack[-1][1]) < 2:
                raise SeqmixError(f"listops: ']' at token {position} closes no operator with 2 or more operands")
            op, operands = stack.pop()
            node: Tree = (op, tuple(operands))
        elif token in DIGITS:
            node = DIGITS.index(token)
        else:
            raise SeqmixError(f"listops: token id {token} at {position} is not valid; expected 0..{VOCAB_SIZE - 1}")
        (stack[-1][1] if stack else result).append(node)
    if stack or len(result) != 1:
        raise SeqmixError(f"listops: {render(stream)!r} is not a single complete expression")
    return result[0]


def longest_tree(max_depth: int, max_args: int) -> int:
    """The most tokens a tree can have: every node above max_depth an operator with max_args operands."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


class ListOps(Task):
    """ListOps: classify the value (0–9) of a nested MIN/MAX/MED/SM expression over digits.

    Args:
        max_depth: deepest level of the tree (the root is level 1); at least 2 so operators occur.
        max_args: most operands per operator (at least 2).
        min_length, max_length: the window of token counts a tree must fall in.
        seq_len: L, the padded length; None means max_length.
        seed: seeds every batch.

    Batches: inputs (B, L) long tokens, right-padded with 0; padding_mask (B, L) bool, True at
    padding; targets (B,) long, the expression's value.
    """

    name = "listops"
    head = "classification"
    metric = "accuracy"
    vocab_size = VOCAB_SIZE
    num_classes = 10

    def __init__(self, max_depth: int = 6, max_args: int = 5, min_length: int = 32, max_length: int = 256,
                 seq_len: int | None = None, seed: int = 0):
        require_int(self.name, "max_depth", max_depth, 2, "a depth-1 tree is a single digit")
        require_int(self.name, "max_args", max_args, 2)
        require_int(self.name, "min_length", min_length, 1)
        require_int(self.name, "max_length", max_length, min_length, "min_length")
        seq_len = max_length if seq_len is None else seq_len
        require_int(self.name, "seq_len", seq_len, max_length, "max_length, so every tree fits")
        require_seed(self.name, "seed", seed)
        longest = longest_tree(max_depth, max_args)
        if min_length > longest:
            raise SeqmixError(
                f"{self.name}: min_length={min_length} is not valid for max_depth={max_depth}, max_args={max_args}; "
                f"no tree is longer than {longest} tokens"
            )
        self.max_depth = max_depth
        self.max_args = max_args
        self.min_length = min_length
        self.max_length = max_length
        self.seq_len = seq_len
        self.seed = seed

    def draw_tree(self, rng: random.Random, depth: int = 1) -> tuple[Tree, int]:
        """One tree from LRA's recursive process, with its token count."""
        if depth >= self.max_depth or rng.random() >= OPERATOR_P:
            return rng.randrange(10), 1
        operands, length = [], 2
        for _ in range(rng.randint(2, self.max_args)):
            operand, operand_length = self.draw_tree(rng, depth + 1)
            operands.append(operand)
            length += operand_length
        return (rng.choice(OPERATORS), tuple(operands)), length

    def draw_in_window(self, rng: random.Random) -> Tree:
        """A tree whose token count lies in [min_length, max_length] (rejection sampling)."""
        for _ in range(MAX_DRAWS):
            tree, length = self.draw_tree(rng)
            if self.min_length <= length <= self.max_length:
                return tree
        raise SeqmixError(
            f"{self.name}: no tree with {self.min_length}..{self.max_length} tokens in {MAX_DRAWS} draws with "
            f"max_depth={self.max_depth}, max_args={self.max_args}; widen the length window"
        )

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        check_request(self.name, split, index, batch_size, self.seq_len)
        # Trees are drawn in Python (recursive, variable size); a Random seeded from the batch's torch
        # generator keeps the batch a pure function of (seed, split, index).
        seed = int(torch.randint(2**62, (1,), generator=generator_for(self.seed, split, index)))
        rng = random.Random(seed)
        inputs = torch.full((batch_size, self.seq_len), PAD, dtype=torch.long)
        targets = torch.empty(batch_size, dtype=torch.long)
        for row in range(batch_size):
            tree = self.draw_in_window(rng)
            tokens = tokenize(tree)
            inputs[row, : len(tokens)] = torch.tensor(tokens)
            targets[row] = evaluate(tree)
        return Batch(inputs, targets, inputs == PAD)
