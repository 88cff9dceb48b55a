"""What the encoder–decoder families share: two stacks, then ``encode`` and ``decode``.

    src    -> family's embedding -> N x EncoderBlock           -> encoded [B, S, D]
    tgt_in -> family's embedding -> N x DecoderBlock(encoded) -> OutputHead -> logits [B, T, V]

``Transformer`` (Vaswani et al. 2017) and ``T5`` (Raffel et al. 2020) specialise it:
each builds its embeddings, positions and head in ``setup`` (after ``setup_stacks``)
and writes ``encode`` and ``decode``; the stacks, the decode positions, the dropout
and ``__call__`` are this class's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
from jax import Array

from tfm.layers.blocks import DecoderBlock, EncoderBlock, Stack
from tfm.models.common import DecodePositions, ModelConfig


class EncoderDecoder(nn.Module):
    """Base of the encoder–decoders: ``__call__(src [B, S], tgt_in [B, T]) -> logits [B, T, V]`` (float32).

    ``tgt_in`` is the shifted-right target (BOS first). Packed rows pass
    ``*_segment_ids`` / ``*_positions`` through to ``encode`` and ``decode`` where the
    family takes them (``PACKING``); otherwise they are refused by name. The config
    has ``num_encoder_layers``, ``num_decoder_layers``, ``scan_layers``,
    ``remat_policy`` and ``block``, which both stacks share (the decoder's is causal).
    """

    config: ModelConfig

    PACKING: ClassVar[bool] = True  # whether packed rows (segment ids, per-segment positions) are supported

    def setup_stacks(self) -> None:
        """The encoder and decoder stacks, the decode positions and the embeddings' dropout (call in ``setup``)."""
        cfg, b = self.config, self.config.block
        self.encoder = Stack(EncoderBlock, dataclasses.replace(b, decode=False), cfg.num_encoder_layers,
                             cfg.scan_layers, cfg.remat_policy)  # fmt: skip
        self.decoder = Stack(DecoderBlock, dataclasses.replace(b, causal=True), cfg.num_decoder_layers,
                             cfg.scan_layers, cfg.remat_policy)  # fmt: skip
        self.decode_positions = DecodePositions(b.decode)
        self.dropout = nn.Dropout(b.dropout_rate)

    def encode(self, src: Array, *, deterministic: bool = True, **packing: Array) -> Array:
        """``src [B, S]`` -> ``encoded [B, S, D]`` (per family)."""
        raise NotImplementedError

    def decode(self, tgt_in: Array, encoded: Array, src: Array, *, deterministic: bool = True,
               **packing: Array) -> Array:  # fmt: skip
        """``tgt_in [B, T]``, ``encoded [B, S, D]``, ``src [B, S]`` (for its padding) -> logits ``[B, T, V]`` (per family)."""
        raise NotImplementedError

    def __call__(
        self,
        src: Array,
        tgt_in: Array,
        *,
        src_segment_ids: Array | None = None,
        tgt_segment_ids: Array | None = None,
        src_positions: Array | None = None,
        tgt_positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        given = dict(src_segment_ids=src_segment_ids, tgt_segment_ids=tgt_segment_ids, src_positions=src_positions,
                     tgt_positions=tgt_positions)  # fmt: skip
        given = {k: v for k, v in given.items() if v is not None}
        if given and not self.PACKING:
            raise ValueError(f"{type(self).__name__} takes unpacked batches only; got {sorted(given)} "
                             f"(set the data's packing off)")  # fmt: skip
        enc = {k: v for k, v in given.items() if k in ("src_segment_ids", "src_positions")}
        dec = {k: v for k, v in given.items() if k in ("src_segment_ids", "tgt_segment_ids", "tgt_positions")}
        encoded = self.encode(src, deterministic=deterministic, **enc)
        return self.decode(tgt_in, encoded, src, deterministic=deterministic, **dec)
