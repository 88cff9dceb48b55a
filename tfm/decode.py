"""Autoregressive decoding with the KV cache: greedy, sampling (temperature, top-k, top-p), beam search.

All loops are ``lax.while_loop``s under ``jax.jit``, batched, and stop early once
every sequence has produced ``eos_id``. The model is the training-mode module;
its decode-mode twin (``config.replace(decode=True)``) is built here
and its ``cache`` collection created at the maximal length, as the layers expect.

* ``generate``: decoder-only (``GPT``). ``prompt [B, P]`` (equal lengths) ->
  ``[B, P + max_new_tokens]``; the prompt is fed in one prefill call.
* ``generate_seq2seq``: encoder-decoder (``Transformer``, ``T5``), greedy or sampled.
  ``src [B, S]`` -> ``[B, max_len]`` (without the start token).
* ``beam_search``: encoder-decoder, beam ``k`` with the GNMT length penalty
  ``((5 + |Y|) / 6) ** alpha`` (the paper: k = 4, alpha = 0.6, §6.1).

After a sequence's EOS, the remaining positions hold ``pad_id``. The encoder-decoder searches also take
Hugging Face's generation constraints: ``suppress_ids`` (tokens never produced, e.g. Marian's pad) and
``force_eos`` (the last position is EOS, ``forced_eos_token_id``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import Array

if TYPE_CHECKING:
    import flax.linen as nn

NEG = -1.0e7  # a log-probability no real hypothesis reaches; finite so arithmetic stays NaN-free


def sample_logits(logits: Array, rng: Array | None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Array:
    """``logits [..., V]`` -> token ids ``[...]``. ``temperature == 0`` is greedy (argmax).

    ``top_k > 0`` keeps the k most likely tokens; ``top_p < 1`` keeps the smallest
    set of most likely tokens whose probability reaches ``top_p`` (nucleus
    sampling, Holtzman et al. 2020); both apply after the temperature.
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)  # the first token is always kept
        cutoff = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _decoding_twin(model):
    if "decode" not in model.config.field_names():
        raise ValueError(f"{type(model).__name__} has no decode mode")
    return type(model)(model.config.replace(decode=True))


def _create_cache(dec, params, *args, method=None):
    _, variables = dec.apply({"params": params}, *args, method=method, mutable=["cache"])
    return variables["cache"]


def _batch_axes(dec, params, make_args, batch: int, method=None):
    """For each cache leaf, the axis that grows with the batch (scanned stacks put layers first)."""
    a = jax.eval_shape(lambda: _create_cache(dec, params, *make_args(batch), method=method))
    b = jax.eval_shape(lambda: _create_cache(dec, params, *make_args(batch + 1), method=method))

    def axis(x, y):
        diff = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
        return diff[0] if diff else None

    return jax.tree.map(axis, a, b)


def constrain(logp: Array, i: Array, last: int, suppress_ids: tuple[int, ...] = (), force_eos: bool = False,
              eos_id: int | None = None) -> Array:  # fmt: skip
    """Scores ``[..., V]`` of step ``i``: ``suppress_ids`` set to ``NEG``; with ``force_eos``, at step ``last``
    every token but ``eos_id`` is ``NEG`` and ``eos_id`` scores 0 (Hugging Face's processors, in their order)."""
    if suppress_ids:
        logp = logp.at[..., jnp.asarray(suppress_ids)].set(NEG)
    if force_eos:
        if eos_id is None:
            raise ValueError("force_eos needs an eos_id")
        forced = jnp.where(jnp.arange(logp.shape[-1]) == eos_id, 0.0, NEG).astype(logp.dtype)
        logp = jnp.where(i == last, forced, logp)
    return logp


def _finish(token, done, eos_id, pad_id):
    token = jnp.where(done, pad_id, token)
    return token, done | (token == eos_id) if eos_id is not None else done


def _sample_loop(step, cache, last, tokens, offset, steps, rng, sampling, adjust=None):
    """Draw ``steps`` tokens into ``tokens[:, offset:]``, feeding each back through ``step(cache, token)
    -> (next logits, cache)``, until every row has produced EOS (later positions keep ``pad_id``).
    ``adjust(logits, i)``, if given, changes the logits of step ``i`` before the draw."""
    temperature, top_k, top_p, eos_id, pad_id = sampling

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, tokens, cache, last, done, rng = carry
        rng, sub = jax.random.split(rng)
        logits = last if adjust is None else adjust(last, i)
        token, done = _finish(sample_logits(logits, sub, temperature, top_k, top_p), done, eos_id, pad_id)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, offset + i))
        last, cache = step(cache, token)
        return i + 1, tokens, cache, last, done, rng

    carry = (jnp.int32(0), tokens, cache, last, jnp.zeros((tokens.shape[0],), bool), rng)
    return jax.lax.while_loop(cond, body, carry)[1]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id"))
def generate(
    model: nn.Module,
    params: Any,
    prompt: Array,
    rng: Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> Array:
    """Decoder-only: ``prompt [B, P]`` -> ``[B, P + max_new_tokens]`` (prompt included)."""
    b, p = prompt.shape
    total = p + max_new_tokens
    cfg = model.config
    if getattr(cfg, "position", None) == "learned" and total > cfg.max_len:
        raise ValueError(f"prompt {p} + max_new_tokens {max_new_tokens} exceeds the model's max_len={cfg.max_len}")
    rng = jax.random.key(0) if rng is None else rng
    dec = _decoding_twin(model)
    cache = _create_cache(dec, params, jnp.zeros((b, total), jnp.int32))
    logits, variables = dec.apply({"params": params, "cache": cache}, prompt, mutable=["cache"])
    tokens = jnp.full((b, total), pad_id, jnp.int32).at[:, :p].set(prompt)

    def step(cache, token):
        logits, variables = dec.apply({"params": params, "cache": cache}, token[:, None], mutable=["cache"])
        return logits[:, -1], variables["cache"]

    sampling = (temperature, top_k, top_p, eos_id, pad_id)
    return _sample_loop(step, variables["cache"], logits[:, -1], tokens, p, max_new_tokens, rng, sampling)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id",
                                             "segment_len"))  # fmt: skip
def generate_with_memory(
    model: nn.Module,
    params: Any,
    prompt: Array,
    rng: Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    segment_len: int | None = None,
) -> Array:
    """A model with a segment memory (Transformer-XL): ``prompt [B, P]`` -> ``[B, P + max_new_tokens]``.

    ``segment_len=None``: the prompt is one segment over an empty memory; each new token is the
    next segment, the memory (its last ``mem_len`` positions per layer) carried from call to call
    instead of a KV cache. ``segment_len=S``: the text goes through the model in segments of ``S``,
    as in training; each new token re-reads its unfinished segment (causality hides the empty
    positions after it) and the memory moves on when the segment is full. The Compressive
    Transformer needs this: its memory takes states ``compression_rate`` at a time.
    """
    b, p = prompt.shape
    cfg = model.config
    if p == 0:
        raise ValueError("the prompt must hold at least one token")
    slots, rate = cfg.memory_len, cfg.compression_rate if cfg.cmem_len else 1
    if (segment_len or 1) % rate:
        raise ValueError(f"segment_len={segment_len}: the compressed memory takes states in groups of "
                         f"compression_rate={rate}; give a multiple of it")  # fmt: skip
    memory = jnp.zeros((cfg.num_layers, b, slots, cfg.block.d_model), cfg.block.dtype)
    mask = jnp.zeros((b, slots), bool)
    tokens = jnp.full((b, p + max_new_tokens), pad_id, jnp.int32).at[:, :p].set(prompt)
    sampling = (temperature, top_k, top_p, eos_id, pad_id)
    rng = jax.random.key(0) if rng is None else rng
    if segment_len is None:
        logits, memory, mask = model.apply({"params": params}, prompt, memory, mask)

        def step(state, token):
            logits, memory, mask = model.apply({"params": params}, token[:, None], *state)
            return logits[:, -1], (memory, mask)

        return _sample_loop(step, (memory, mask), logits[:, -1], tokens, p, max_new_tokens, rng, sampling)

    s, done = segment_len, p // segment_len * segment_len
    for start in range(0, done, s):  # the prompt's full segments
        logits, memory, mask = model.apply({"params": params}, prompt[:, start : start + s], memory, mask)
    segment = jnp.zeros((b, s), jnp.int32).at[:, : p - done].set(prompt[:, done:])
    if p > done:
        logits = model.apply({"params": params}, segment, memory, mask)[0][:, : p - done]

    def step_in_segment(state, token):
        memory, mask, segment, n = state
        segment = jax.lax.dynamic_update_slice(segment, token[:, None], (0, n))
        logits, new_memory, new_mask = model.apply({"params": params}, segment, memory, mask)
        last = jax.lax.dynamic_index_in_dim(logits, n, axis=1, keepdims=False)
        full = n + 1 == s
        memory, mask = jnp.where(full, new_memory, memory), jnp.where(full, new_mask, mask)
        segment, n = jnp.where(full, jnp.zeros_like(segment), segment), jnp.where(full, 0, n + 1)
        return last, (memory, mask, segment, n)

    state = (memory, mask, segment, jnp.int32(p - done))
    return _sample_loop(step_in_segment, state, logits[:, -1], tokens, p, max_new_tokens, rng, sampling)


@functools.partial(
    jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id", "pad_id", "temperature", "top_k", "top_p",
                              "suppress_ids", "force_eos"),
)
def generate_seq2seq(
    model: nn.Module,
    params: Any,
    src: Array,
    rng: Array | None = None,
    *,
    max_len: int,
    bos_id: int,
    eos_id: int | None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress_ids: tuple[int, ...] = (),
    force_eos: bool = False,
) -> Array:
    """Encoder-decoder, greedy or sampled: ``src [B, S]`` -> ``[B, max_len]`` (no start token).

    ``suppress_ids`` are never drawn; ``force_eos`` makes position ``max_len - 1`` EOS (see ``constrain``).
    """
    b = src.shape[0]
    rng = jax.random.key(0) if rng is None else rng
    dec = _decoding_twin(model)
    encoded = dec.apply({"params": params}, src, method="encode")
    cache = _create_cache(dec, params, jnp.zeros((b, max_len), jnp.int32), encoded, src, method="decode")

    def step(cache, token):
        logits, variables = dec.apply(
            {"params": params, "cache": cache}, token[:, None], encoded, src, method="decode", mutable=["cache"]
        )
        return logits[:, -1], variables["cache"]

    last, cache = step(cache, jnp.full((b,), bos_id, jnp.int32))
    tokens = jnp.full((b, max_len), pad_id, jnp.int32)
    adjust = None
    if suppress_ids or force_eos:
        adjust = functools.partial(constrain, last=max_len - 1, suppress_ids=suppress_ids, force_eos=force_eos,
                                   eos_id=eos_id)  # fmt: skip
    sampling = (temperature, top_k, top_p, eos_id, pad_id)
    return _sample_loop(step, cache, last, tokens, 0, max_len, rng, sampling, adjust)


def length_penalty(length: Array | int, alpha: float) -> Array:
    """GNMT (Wu et al. 2016, eq. 14): ``((5 + |Y|) / 6) ** alpha``."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "alpha", "max_len", "bos_id", "eos_id", "pad_id",
                                             "suppress_ids", "force_eos", "finish_top_k_only"))  # fmt: skip
def beam_search(
    model: nn.Module,
    params: Any,
    src: Array,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    suppress_ids: tuple[int, ...] = (),
    force_eos: bool = False,
    finish_top_k_only: bool = False,
) -> tuple[Array, Array]:
    """Encoder-decoder beam search -> ``(tokens [B, max_len], scores [B])``, the best hypothesis per row.

    A hypothesis' score is its log-probability divided by ``length_penalty``
    (its length counts the EOS). A row stops when no live beam can still beat
    its worst finished one (the bound uses the longest possible length). If no
    beam finishes within ``max_len``, the best live beam is returned.
    With ``beam_size=1`` and ``alpha=0`` it is greedy decoding.

    ``suppress_ids`` and ``force_eos`` apply to the log-probabilities (``constrain``: a forced EOS adds 0).
    ``finish_top_k_only``: only an EOS among the K best of a step's 2K candidates finishes a hypothesis
    (Hugging Face's rule); by default any of the 2K does. With ``alpha=0``, ``force_eos`` and
    ``finish_top_k_only`` this is ``transformers``' beam search with ``length_penalty=0`` and
    ``early_stopping=False``, up to ties.
    """
    b, k = src.shape[0], beam_size
    dec = _decoding_twin(model)
    encoded = dec.apply({"params": params}, src, method="encode")
    encoded_k = jnp.repeat(encoded, k, axis=0)  # [B*K, S, D], beams of a row adjacent
    src_k = jnp.repeat(src, k, axis=0)
    make = lambda n: (jnp.zeros((n, max_len), jnp.int32), jnp.zeros((n,) + encoded.shape[1:], encoded.dtype),
                      jnp.zeros((n,) + src.shape[1:], src.dtype))  # noqa: E731  # fmt: skip
    axes = _batch_axes(dec, params, make, b * k, method="decode")
    cache = _create_cache(dec, params, jnp.zeros((b * k, max_len), jnp.int32), encoded_k, src_k, method="decode")

    def gather_beams(cache, origin):  # origin [B, K]: which beam of the same row each new beam continues
        flat = (jnp.arange(b)[:, None] * k + origin).reshape(-1)
        return jax.tree.map(lambda x, ax: x if ax is None else jnp.take(x, flat, axis=ax), cache, axes)

    seqs = jnp.full((b, k, max_len + 1), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    alive_lp = jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1))
    fin_seqs = jnp.full((b, k, max_len + 1), pad_id, jnp.int32)
    fin_scores = jnp.full((b, k), NEG, jnp.float32)
    fin_flags = jnp.zeros((b, k), bool)

    def cond(carry):
        i, _, alive_lp, _, fin_scores, fin_flags, _ = carry
        best_possible = alive_lp[:, 0] / length_penalty(max_len, alpha)
        worst_finished = jnp.min(jnp.where(fin_flags, fin_scores, NEG), axis=1)
        done = jnp.all(fin_flags, axis=1) & (worst_finished > best_possible)
        return (i < max_len) & ~jnp.all(done)

    def body(carry):
        i, seqs, alive_lp, fin_seqs, fin_scores, fin_flags, cache = carry
        token = jax.lax.dynamic_slice_in_dim(seqs, i, 1, axis=2).reshape(b * k, 1)
        logits, variables = dec.apply(
            {"params": params, "cache": cache}, token, encoded_k, src_k, method="decode", mutable=["cache"]
        )
        logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32))
        logp = constrain(logp, i, max_len - 1, suppress_ids, force_eos, eos_id).reshape(b, k, -1)
        vocab = logp.shape[-1]
        cand = (alive_lp[:, :, None] + logp).reshape(b, k * vocab)
        top_lp, top_idx = jax.lax.top_k(cand, 2 * k)  # 2K: enough to keep K alive after K finish
        origin, new_tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = jnp.take_along_axis(seqs, origin[:, :, None], axis=1)
        top_seqs = jax.lax.dynamic_update_slice(top_seqs, new_tok[:, :, None], (0, 0, i + 1))
        is_eos = new_tok == eos_id
        finishes = is_eos & (jnp.arange(2 * k) < k) if finish_top_k_only else is_eos

        # The K best candidates that did not end go on.
        alive_cand = jnp.where(is_eos, NEG, top_lp)
        alive_lp, keep = jax.lax.top_k(alive_cand, k)
        seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
        cache = gather_beams(variables["cache"], jnp.take_along_axis(origin, keep, axis=1))

        # Candidates that ended join the finished set if they beat its members.
        scores = jnp.where(finishes, top_lp / length_penalty(i + 1, alpha), NEG)
        all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)
        all_scores = jnp.concatenate([fin_scores, scores], axis=1)
        all_flags = jnp.concatenate([fin_flags, finishes], axis=1)
        fin_scores, best = jax.lax.top_k(jnp.where(all_flags, all_scores, NEG), k)
        fin_seqs = jnp.take_along_axis(all_seqs, best[:, :, None], axis=1)
        fin_flags = jnp.take_along_axis(all_flags, best, axis=1)
        return i + 1, seqs, alive_lp, fin_seqs, fin_scores, fin_flags, cache

    carry = (jnp.int32(0), seqs, alive_lp, fin_seqs, fin_scores, fin_flags, cache)
    _, seqs, alive_lp, fin_seqs, fin_scores, fin_flags, _ = jax.lax.while_loop(cond, body, carry)
    any_fin = fin_flags[:, 0]
    tokens = jnp.where(any_fin[:, None], fin_seqs[:, 0], seqs[:, 0])[:, 1:]
    scores = jnp.where(any_fin, fin_scores[:, 0], alive_lp[:, 0] / length_penalty(max_len, alpha))
    return tokens, scores


__all__ = ["beam_search", "constrain", "generate", "generate_seq2seq", "length_penalty", "sample_logits"]
