"""A checkpoint's own tokenizer: ``tokenizer.json`` (the ``tokenizers`` library) or sentencepiece models.

``load_tokenizer(path)`` takes a checkpoint directory or a ``tokenizer.json`` /
``*.model`` file and returns a ``Tokenizer`` with ``encode(text) -> ids``,
``decode(ids) -> text`` and the special ids the decoders need (``bos_id`` is
the token a decoder starts from: the config's ``decoder_start_token_id`` for
encoder-decoders). Kinds:

* ``tokenizer.json``: GPT-2, Llama, BERT, ... (the fast tokenizer file).
* ``spiece.model``: T5's sentencepiece model; an EOS is appended to every encoded text.
* ``source.spm`` + ``target.spm`` + ``vocab.json``: Marian. The sentencepiece pieces map to
  ids through ``vocab.json`` (unknown pieces to ``<unk>``); an EOS is appended.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

from tfm.hub.convert import HubError


class Tokenizer:
    """``encode``/``decode`` plus ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` and the file that saves it."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int = 0
    filename: str = ""  # the artifact name a run saves it under

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def serialized(self) -> bytes:
        raise NotImplementedError

    def _special(self, config: dict) -> None:
        """Special ids from a model's ``config.json``, where it names them."""
        for ours, theirs in (("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
            if isinstance(config.get(theirs), int):
                setattr(self, ours, config[theirs])
        start = config.get("decoder_start_token_id", config.get("bos_token_id"))
        if isinstance(start, int):
            self.bos_id = start


class JsonTokenizer(Tokenizer):
    """A fast tokenizer file (``tokenizer.json``), read with the ``tokenizers`` library."""

    filename = "tokenizer.json"

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as Fast
        except ImportError:
            raise HubError("tokenizer.json needs the tokenizers package (pip install 'tfm-jax[hub]')") from None
        try:
            self.fast = Fast.from_file(path)
        except Exception as e:  # a corrupt or foreign file: name it
            raise HubError(f"{path}: not a tokenizer.json file ({type(e).__name__}: {e})") from None
        self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.fast.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.fast.decode([int(i) for i in ids], skip_special_tokens=True)

    def serialized(self) -> bytes:
        return self.fast.to_str().encode("utf-8")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model whose ids are the model's (T5); ``add_eos`` appends EOS to each text."""

    filename = "tokenizer.model"

    def __init__(self, path: str, add_eos: bool = True):
        from tfm.data.base import DataError, load_sentencepiece

        try:
            self.sp = load_sentencepiece(path)
        except DataError as e:
            raise HubError(str(e)) from None
        self.vocab_size, self.add_eos = self.sp.get_piece_size(), add_eos
        self.eos_id, self.pad_id = self.sp.eos_id(), max(self.sp.pad_id(), 0)

    def encode(self, text: str) -> np.ndarray:
        ids = self.sp.encode(text)
        return np.array(ids + [self.eos_id] if self.add_eos and self.eos_id >= 0 else ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in ids if int(i) < self.vocab_size and int(i) not in (self.eos_id, self.pad_id)]
        return self.sp.decode(keep)

    def serialized(self) -> bytes:
        return self.sp.serialized_model_proto()


class MarianTokenizer(Tokenizer):
    """Marian: source/target sentencepiece models for the pieces, ``vocab.json`` for their ids."""

    def __init__(self, directory: str):
        from tfm.data.base import load_sentencepiece

        with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
            self.stoi = json.load(f)
        self.itos = {i: s for s, i in self.stoi.items()}
        self.source = load_sentencepiece(os.path.join(directory, "source.spm"))
        self.target = load_sentencepiece(os.path.join(directory, "target.spm"))
        self.vocab_size = max(self.itos) + 1
        self.unk_id = self.stoi.get("<unk>", 1)
        self.eos_id, self.pad_id = self.stoi.get("</s>", 0), self.stoi.get("<pad>", self.vocab_size - 1)
        self.bos_id = self.pad_id

    def encode(self, text: str) -> np.ndarray:
        pieces = self.source.encode(text, out_type=str)
        return np.array([self.stoi.get(p, self.unk_id) for p in pieces] + [self.eos_id], np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.eos_id, self.pad_id}
        pieces = [self.itos.get(int(i), "") for i in ids if int(i) not in specials]
        # As transformers' MarianTokenizer: pieces the target model lacks keep their text, "▁" read as a space.
        return self.target.decode_pieces([p for p in pieces if p]).replace("\u2581", " ").strip()


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at ``path``: a checkpoint directory, a ``tokenizer.json`` or a sentencepiece model."""
    path = os.path.expanduser(os.fspath(path))
    config: dict = {}
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            tok: Tokenizer = JsonTokenizer(os.path.join(path, "tokenizer.json"))
        elif all(os.path.isfile(os.path.join(path, n)) for n in ("source.spm", "target.spm", "vocab.json")):
            tok = MarianTokenizer(path)
        elif os.path.isfile(os.path.join(path, "spiece.model")):
            tok = SentencePieceTokenizer(os.path.join(path, "spiece.model"))
        else:
            raise HubError(f"{path}: no tokenizer.json, spiece.model or Marian source.spm/target.spm/vocab.json")
    elif path.endswith(".json") and os.path.isfile(path):
        tok = JsonTokenizer(path)
    elif os.path.isfile(path):
        tok = SentencePieceTokenizer(path)
    else:
        raise HubError(f"{path}: no tokenizer there (give a checkpoint directory or a tokenizer.json file)")
    tok._special(config)
    return tok


__all__ = ["JsonTokenizer", "MarianTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer"]
