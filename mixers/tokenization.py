"""Tokenizers: bytes (the default), or a Hugging Face ``tokenizer.json``, trained here as BPE or the user's own.

A tokenizer turns text into token ids and back. ``load_tokenizer("bytes")`` gives the 256 byte values;
``load_tokenizer(path)`` reads a ``tokenizer.json`` (a file, or a directory holding one) with the
``tokenizers`` library, which never runs code from the file. ``train_bpe`` trains a byte-level BPE
tokenizer on the user's corpus (``seqmix tokenizer task.path=... vocab_size=8000``).

Every tokenizer has a separator: the token placed between packed documents and after a
classification text. For bytes it is the NUL byte; for a ``tokenizer.json`` it is the first of
``SEPARATOR_TOKENS`` its special tokens hold (BPE tokenizers trained here hold ``<|endoftext|>``).
No text encodes to the separator: a ``tokenizer.json`` reads its special tokens in a text as text,
and the byte tokenizer turns a NUL in a text into U+FFFD. A ``tokenizer.json`` encodes every text
whole and unpadded, whatever truncation or padding the file sets, and its vocabulary size is its
largest id + 1.
Its ``fingerprint`` (the sha256 of the file) keys token caches, so a changed tokenizer never reuses
tokens made by another.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

import warnings

from seqmix.errors import SeqmixError, SeqmixWarning, first_few, not_a_file, one_line, require_int

BYTES = "bytes"
TOKENIZER_FILE = "tokenizer.json"
SEPARATOR_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
"""Tokens that a ``tokenizer.json`` may use to separate documents, in the order they are looked for."""
MAX_VOCAB = 2**32
MAX_TRAINED_VOCAB = 2**20
"""The largest vocabulary ``train_bpe`` trains: four times the largest in common use. The trainer
allocates about 70 bytes per token it may create before it reads the corpus, and a request it
cannot allocate aborts the process (vocab_size=10**9 asked for 70 GB)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


SPECIAL_AS_TEXT = b"\0special-tokens-encoded-as-text"
"""What a file tokenizer's fingerprint adds to the file's bytes: its encoding reads special tokens in a
text as text, which earlier encodings did not."""


WHOLE_TEXTS = b"\0no-truncation-no-padding"
"""What a file tokenizer's fingerprint adds too: its encoding ignores the file's truncation and padding."""


def apply_encoding_settings(backend) -> None:
    """Encode a ``tokenizers.Tokenizer`` as seqmix does, whatever its file asks: special tokens written
    in a text are text (``<|endoftext|>`` inside a document became the separator, a document boundary
    where there was none), and every text is encoded whole and unpadded (a file's truncation to 8
    tokens cut every document to 8; its padding filled the corpus with pad tokens)."""
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()


NUL_REPLACEMENT = "\ufffd".encode()
"""What the byte tokenizer encodes a NUL in a text as: the NUL byte is its separator."""


def warn_separators_replaced(owner: str, where: Sequence[str]) -> None:
    """Warn, naming the first few, that the texts at ``where`` held the separator's text, which was replaced."""
    if where:
        texts = f"{len(where)} texts" if len(where) > 1 else "1 text"
        warnings.warn(f"seqmix: {owner}: {texts} held a NUL byte, which the byte tokenizer keeps as the separator "
                      f"between documents; each became U+FFFD: {first_few(where)}", SeqmixWarning, stacklevel=3)


class Tokenizer:
    """What the tasks, ``seqmix generate`` and the exports need from a tokenizer.

    Attributes:
        name: ``bytes``, or the path of the ``tokenizer.json``.
        vocab_size: V; every id is in [0, V).
        separator: the id placed between packed documents.
        fingerprint: identifies the token mapping (a version tag for bytes, the file's sha256 otherwise).
    """

    name: str
    vocab_size: int
    separator: int
    fingerprint: str

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One 1-D int64 array of ids per text."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def holds_separator(self, text: str) -> bool:
        """Whether ``text`` holds what the separator is made of, which the encoding replaces so that no
        document boundary appears where there is none (a NUL, for bytes)."""
        return False

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; bytes that are not UTF-8 (a cut multi-byte character) become U+FFFD."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the text's UTF-8 encoding; documents are separated by the NUL byte, and a
    NUL in a text becomes U+FFFD (bytes EF BF BD), as a byte that is not UTF-8 does."""

    name = BYTES
    vocab_size = 256
    separator = 0
    # v1 kept a NUL in a text, which split its document in two.
    fingerprint = "bytes-v2"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [ids.astype(np.int64) for ids in self.encode_utf8([text.encode("utf-8", "surrogateescape") for text in texts])]

    def encode_utf8(self, documents: Sequence[bytes]) -> list[np.ndarray]:
        """The ids (uint8) of texts given as UTF-8 bytes, without a round trip through str."""
        return [np.frombuffer(document.replace(b"\0", NUL_REPLACEMENT), dtype=np.uint8) for document in documents]

    def holds_separator(self, text: str) -> bool:
        return "\0" in text

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class FileTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, run by the ``tokenizers`` library.

    Args:
        path: the ``tokenizer.json`` file.
    Attributes:
        file_bytes: the file as it was read, which runs, checkpoints and exports save.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise SeqmixError(f"tokenizer={str(path)!r} needs the tokenizers library: pip install 'seqmix[data]'") from None
        self.path = Path(path)
        raw = self.path.read_bytes()
        # What is saved beside a model is what was read: the file at the path may change while it trains.
        self.file_bytes = raw
        try:
            self.backend = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as error:  # the library raises its own Exception type for every malformed file
            raise SeqmixError(f"tokenizer={str(path)!r} is not a valid tokenizer.json ({one_line(error)})") from None
        self.name = str(self.path)
        vocabulary = self.backend.get_vocab(with_added_tokens=True)
        if not vocabulary:
            raise SeqmixError(f"tokenizer={str(path)!r} has no tokens")
        # Ids, not the count of tokens, bound what the model must embed: a vocabulary with gaps
        # ({"the": 2, "quick": 65538}, 6 tokens) had ids past its count, which wrapped round in the
        # uint16 token cache ("quick" stored as "the").
        self.vocab_size = max(vocabulary.values()) + 1
        if self.vocab_size > MAX_VOCAB:
            raise SeqmixError(f"tokenizer={str(path)!r} has token id {self.vocab_size - 1}; expected ids below {MAX_VOCAB}")
        special = {token.content for token in self.backend.get_added_tokens_decoder().values() if token.special}
        found = [token for token in SEPARATOR_TOKENS if token in special]
        if not found:
            plain = [token for token in SEPARATOR_TOKENS if token in vocabulary]
            raise SeqmixError(
                f"tokenizer={str(path)!r} has none of the separator tokens {list(SEPARATOR_TOKENS)} as a special token"
                + (f" ({plain[0]!r} is an ordinary entry of its vocabulary, which a text holding it encodes to, splitting "
                   "its document in two)" if plain else "")
                + "; add one to its added_tokens with special: true, or train a tokenizer with `seqmix tokenizer`"
            )
        self.separator = vocabulary[found[0]]
        apply_encoding_settings(self.backend)
        # The encoding changed with those settings, so caches made before them are not reused.
        self.fingerprint = hashlib.sha256(raw + SPECIAL_AS_TEXT + WHOLE_TEXTS).hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str | os.PathLike = BYTES) -> Tokenizer:
    """``bytes``, or a ``tokenizer.json`` file (or a directory holding one, such as a checkpoint or export)."""
    if spec == BYTES:
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise SeqmixError(f"tokenizer={spec!r} is not valid; expected {BYTES!r} or the path of a tokenizer.json")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if path.is_symlink():
        raise SeqmixError(f"tokenizer={str(spec)!r} is a symbolic link; give the tokenizer.json file itself")
    if not path.is_file():
        raise SeqmixError(f"tokenizer={str(spec)!r}: {path} {not_a_file(path)}; expected {BYTES!r} or a tokenizer.json")
    return FileTokenizer(path)


def saved_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in a checkpoint, pretrained or export directory: its ``tokenizer.json``, else bytes."""
    path = Path(directory) / TOKENIZER_FILE
    return FileTokenizer(path) if path.is_file() and not path.is_symlink() else ByteTokenizer()


class TextStream:
    """Decode ids as they arrive, emitting text only once it is whole.

    A token may end in the middle of a multi-byte character; the text so far then ends in U+FFFD
    and is held back until the next tokens complete it (or, after ``patience`` tokens, emitted as is).
    The ids are decoded together up to the last line break, then dropped, so a long stream costs
    per line, not per stream, and tokenizers whose decoding depends on neighbouring tokens stay right.
    """

    def __init__(self, tokenizer: Tokenizer, patience: int = 4):
        self.tokenizer, self.patience = tokenizer, patience
        self.ids: list[int] = []
        self.emitted = 0
        self.waiting = 0

    def push(self, token: int) -> str:
        """Add one id; return the new text that is ready ('' while a character is incomplete)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and self.waiting < self.patience:
            self.waiting += 1
            return ""
        self.waiting = 0
        new = text[self.emitted:]
        if text.endswith("\n"):
            self.ids, self.emitted = [], 0
        else:
            self.emitted = len(text)
        return new

    def finish(self) -> str:
        """The text still held back at the end of the stream (an incomplete character, as U+FFFD)."""
        rest = self.tokenizer.decode(self.ids)[self.emitted:]
        self.ids, self.emitted, self.waiting = [], 0, 0
        return rest


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | os.PathLike, min_frequency: int = 2) -> FileTokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` and write it to ``out`` (a ``tokenizer.json`` path).

    Byte-level BPE starts from the 256 byte values, so any text encodes and decodes back exactly; its
    first token is the separator ``<|endoftext|>``. ``vocab_size`` counts every token (257 to ``MAX_TRAINED_VOCAB``).
    """
    require_int("tokenizer", "vocab_size", vocab_size, 257, f"and at most {MAX_TRAINED_VOCAB}")
    if vocab_size > MAX_TRAINED_VOCAB:
        raise SeqmixError(f"tokenizer: vocab_size={vocab_size} is not valid; expected at most {MAX_TRAINED_VOCAB:,} "
                          "(the trainer reserves memory for every token it may create)")
    require_int("tokenizer", "min_frequency", min_frequency, 1)
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SEPARATOR_TOKENS[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    seen = 0

    def counted():
        nonlocal seen
        for text in texts:
            seen += len(text)
            yield text

    backend.train_from_iterator(counted(), trainer=trainer)
    if not seen:
        raise SeqmixError("tokenizer: the corpus holds no text; nothing to train a tokenizer on")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    backend.save(str(staging))
    os.replace(staging, out)
    return FileTokenizer(out)
