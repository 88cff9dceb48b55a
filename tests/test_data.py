"""Datasets: batch layout, determinism, resumable iterator state, clear errors."""

import os

import numpy as np
import pytest

from tfm.data import DataError, make_dataset

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")


def test_copy_task_batches():
    ds = make_dataset({"name": "copy", "batch_size": 5, "vocab_size": 10, "min_len": 2, "max_len": 6})
    b = ds.batch("train", 0)
    src, dec_in, tgt, w = b["inputs"], b["decoder_inputs"], b["targets"], b["weights"]
    assert src.shape == (5, 6) and dec_in.shape == tgt.shape == w.shape == (5, 7)
    for i in range(5):
        n = int((src[i] != 0).sum())
        assert 2 <= n <= 6 and np.all(src[i, n:] == 0) and np.all(src[i, :n] >= 3)
        assert dec_in[i, 0] == 1 and np.array_equal(dec_in[i, 1 : n + 1], src[i, :n])  # BOS y
        assert np.array_equal(tgt[i, :n], src[i, :n]) and tgt[i, n] == 2  # y EOS
        assert w[i].sum() == n + 1 and np.all(w[i, : n + 1] == 1)
    rev = make_dataset({"name": "copy", "batch_size": 5, "vocab_size": 10, "min_len": 2, "max_len": 6, "reverse": True})
    r = rev.batch("train", 0)
    n = int((r["inputs"][0] != 0).sum())
    assert np.array_equal(r["targets"][0, :n], r["inputs"][0, :n][::-1])


def test_batches_are_deterministic_and_the_iterator_resumes():
    ds = make_dataset({"name": "copy", "batch_size": 4})
    it = ds.iterator("train")
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    after = next(it)
    it2 = ds.iterator("train")
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["inputs"], after["inputs"])
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
    assert not np.array_equal(ds.batch("validation", 0)["inputs"], ds.batch("train", 0)["inputs"])
    with pytest.raises(DataError, match="index"):
        it2.set_state({"position": 3})
    with pytest.raises(DataError, match="split 'dev'"):
        ds.iterator("dev")


@pytest.mark.skipif(not os.path.isdir(DATA), reason="no shared data folder next to the checkout")
def test_shakespeare_char_vocabulary_and_splits():
    ds = make_dataset({"name": "shakespeare_char", "batch_size": 3, "data_dir": DATA, "block_size": 16})
    assert ds.vocab_size == 65  # nanoGPT's shakespeare_char
    assert len(ds.splits["train"]) == 1_003_854 and len(ds.splits["validation"]) == 111_540
    b = ds.batch("train", 7)
    assert b["inputs"].shape == b["targets"].shape == (3, 16)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert ds.decode(ds.encode("First Citizen")) == "First Citizen"


def test_bad_data_options_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"no text file at .*nothing\.txt"):
        make_dataset({"name": "shakespeare_char", "batch_size": 2, "data_dir": str(tmp_path), "path": "nothing.txt"})
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        make_dataset({"name": "shakespeare_char", "batch_size": 2, "data_dir": str(tmp_path), "path": "bin.txt"})
    with pytest.raises(DataError, match="data.min_len=5, data.max_len=3"):
        make_dataset({"name": "copy", "batch_size": 2, "min_len": 5, "max_len": 3})
    with pytest.raises(DataError, match="data.batch_size=0"):
        make_dataset({"name": "copy", "batch_size": 0})


def write_idx(path, array):
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_mnist(tmp_path):
    """A fake Fashion-MNIST in the original idx format: 5,020 train and 30 test images."""
    folder = tmp_path / "src" / "fashion_mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5020), ("t10k", 30)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 20 + rng.integers(0, 20, (n, 28, 28))).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_fashion_mnist_builder_prepares_offline_and_batches(tiny_fashion_mnist):
    opts = {"name": "fashion_mnist", "batch_size": 8, "data_dir": str(tiny_fashion_mnist / "src"),
            "tfds_dir": str(tiny_fashion_mnist / "tfds"), "flip": False}  # fmt: skip
    ds = make_dataset(opts)
    assert len(ds.sources["train"]) == 20 and len(ds.sources["validation"]) == 5000 and len(ds.sources["test"]) == 30
    assert list((tiny_fashion_mnist / "tfds").glob("fashion_mnist_idx/src_*/1.0.0/*.array_record*"))
    b = ds.batch("train", 0)
    assert b["inputs"].shape == (8, 28, 28, 1) and b["inputs"].dtype == np.float32 and b["labels"].shape == (8,)
    # Labels survive the round trip: the fake images encode the label in their brightness.
    raw = b["inputs"] * 0.3530 + 0.2860
    np.testing.assert_array_equal(np.floor(raw.mean(axis=(1, 2, 3)) * 255 / 20).astype(int), b["labels"])
    # An epoch of training batches covers the 20 training images once, reshuffled the next epoch.
    first = np.concatenate([ds.batch("train", i)["labels"] for i in range(5)])[:20]
    assert sorted(first) == sorted(int(ds.sources["train"][i]["label"]) for i in range(20))
    second = np.concatenate([ds.batch("train", i)["labels"] for i in range(5, 10)])[:20]
    assert sorted(second) == sorted(first) and not np.array_equal(second, first)
    held_out = [int(ds.sources["validation"][i]["label"]) for i in range(5000)]
    assert sorted(first.tolist() + held_out) == sorted((np.arange(5020) % 10).tolist())
    np.testing.assert_array_equal(ds.batch("train", 3)["inputs"], make_dataset(opts).batch("train", 3)["inputs"])
    # Test split: read once in order; the last batch is padded with zero weights.
    assert ds.num_batches("test") == 4
    last = ds.batch("test", 3)
    assert last["weights"].tolist() == [1] * 6 + [0] * 2


def test_fashion_mnist_missing_or_broken_files(tiny_fashion_mnist, tmp_path):
    with pytest.raises(DataError, match=r"lacks .*t10k-images-idx3-ubyte.gz"):
        make_dataset({"name": "fashion_mnist", "batch_size": 8, "data_dir": str(tmp_path), "path": "nowhere",
                      "tfds_dir": str(tmp_path / "tfds")})  # fmt: skip
    src = tiny_fashion_mnist / "src" / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz"
    src.write_bytes(b"not gzip at all")
    from tfm.data.builders import read_idx

    with pytest.raises(DataError, match="not a readable gzip idx file"):
        read_idx(str(src))


EN = ["A man rides a red bike.", "Two dogs play in the snow.", "A woman reads a book.", "Children run outside."]
DE = ["Ein Mann fährt ein rotes Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch.", "Kinder rennen draußen."]


@pytest.fixture
def tiny_multi30k(tmp_path):
    folder = tmp_path / "src" / "multi30k"
    folder.mkdir(parents=True)
    en, de = EN, DE
    for stem, n in (("train", 40), ("val", 4), ("test_2016_flickr", 5)):
        (folder / f"{stem}.en").write_text("\n".join(en[i % 4] for i in range(n)) + "\n", encoding="utf-8")
        (folder / f"{stem}.de").write_text("\n".join(de[i % 4] for i in range(n)) + "\n", encoding="utf-8")
    return tmp_path


def test_multi30k_builder_shared_tokenizer_and_batches(tiny_multi30k):
    opts = {"name": "multi30k", "batch_size": 4, "data_dir": str(tiny_multi30k / "src"),
            "tfds_dir": str(tiny_multi30k / "tfds"), "vocab_size": 60, "max_len": 16}  # fmt: skip
    ds = make_dataset(opts)
    assert [len(ds.pairs[s]) for s in ("train", "validation", "test")] == [40, 4, 5]
    assert ds.vocab_size == 60 and ds.tokenizer_path.endswith(".model")
    # One vocabulary for both languages: German and English pieces decode back exactly.
    for text in ("Ein Mann fährt ein rotes Fahrrad.", "Two dogs play in the snow."):
        assert ds.decode(ds.encode(text)) == text
    assert ds.encode("A woman reads a book.")[-1] == 2  # EOS ends every source
    b = ds.batch("validation", 1)  # rows 4..7 of a 4-row split: all padding
    assert b["weights"].sum() == 0
    b = ds.batch("train", 0)
    n = int(b["weights"][0].sum())
    np.testing.assert_array_equal(b["decoder_inputs"][0, 1:n], b["targets"][0, : n - 1])  # BOS y / y EOS
    assert b["decoder_inputs"][0, 0] == 1 and b["targets"][0, n - 1] == 2
    assert ds.decode(b["targets"][0]) in ds.references("train")
    # The cached tokenizer is reused, and an explicit one can be given.
    again = make_dataset(opts)
    assert again.tokenizer_path == ds.tokenizer_path
    assert make_dataset({**opts, "tokenizer_path": ds.tokenizer_path}).encode("Kinder").tolist() == ds.encode("Kinder").tolist()


def test_multi30k_mismatched_files_are_an_error(tiny_multi30k):
    (tiny_multi30k / "src" / "multi30k" / "val.de").write_text("nur eine Zeile\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"val.en has 4 lines but val.de has 1"):
        make_dataset({"name": "multi30k", "batch_size": 4, "data_dir": str(tiny_multi30k / "src"),
                      "tfds_dir": str(tiny_multi30k / "tfds2"), "vocab_size": 60})  # fmt: skip


def test_the_prepared_copy_follows_the_source_files(tiny_multi30k):
    """One shared tfds directory: other contents, another folder or broken files are never read from a stale copy."""
    folder = tiny_multi30k / "src" / "multi30k"
    opts = {"name": "multi30k", "batch_size": 4, "data_dir": str(tiny_multi30k / "src"),
            "tfds_dir": str(tiny_multi30k / "tfds"), "vocab_size": 40}  # fmt: skip
    assert len(make_dataset(opts).pairs["train"]) == 40
    for lang in ("en", "de"):  # the training files cut to 10 lines
        lines = (folder / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:10]
        (folder / f"train.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(make_dataset(opts).pairs["train"]) == 10
    (folder / "val.de").write_text("nur eine Zeile\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"val.en has 4 lines but val.de has 1"):
        make_dataset(opts)


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_packed_pairs_do_not_see_each_other(tiny_multi30k):
    """Every target token's log-probability is the same packed (several pairs per row, kept apart
    by segment ids and per-pair positions) as when its pair is alone in a row."""

    import jax
    import jax.numpy as jnp

    from tfm.models import Transformer, transformer_tiny

    opts = {"name": "multi30k", "batch_size": 4, "data_dir": str(tiny_multi30k / "src"),
            "tfds_dir": str(tiny_multi30k / "tfds"), "vocab_size": 60, "max_len": 64, "pack": True}  # fmt: skip
    ds = make_dataset(opts)
    packed = ds.batch("train", 1)
    assert packed["segment_ids"].max() >= 3, "rows must hold several pairs for the test to mean anything"
    # Every training pair appears once per epoch across the packed rows.
    n_rows = len(ds._rows_of_epoch(0))
    assert sorted(k for row in ds._rows_of_epoch(0) for k in row) == list(range(40)) and n_rows < 40

    model = Transformer(transformer_tiny.replace(vocab_size=60))
    params = model.init(jax.random.key(0), jnp.ones((1, 64), jnp.int32), jnp.ones((1, 64), jnp.int32))
    keys = {"segment_ids": "src_segment_ids", "decoder_segment_ids": "tgt_segment_ids",
            "positions": "src_positions", "decoder_positions": "tgt_positions"}  # fmt: skip
    logits = model.apply(params, packed["inputs"], packed["decoder_inputs"], **{v: packed[k] for k, v in keys.items()})
    logp = jax.nn.log_softmax(logits)
    checked = 0
    for i in range(4):
        for seg in range(1, int(packed["segment_ids"][i].max()) + 1):
            src = packed["inputs"][i][packed["segment_ids"][i] == seg]
            at = packed["decoder_segment_ids"][i] == seg
            dec_in, tgt = packed["decoder_inputs"][i][at], packed["targets"][i][at]
            alone = model.apply(params, src[None], dec_in[None])
            want = jax.nn.log_softmax(alone)[0, np.arange(len(tgt)), tgt]
            got = logp[i, np.flatnonzero(at), tgt]
            np.testing.assert_allclose(got, want, atol=1e-5)
            checked += 1
    assert checked >= 8


@pytest.mark.skipif(not os.path.isdir(DATA), reason="no shared data folder next to the checkout")
def test_shakespeare_subword_tokenizer(tmp_path):
    ds = make_dataset({"name": "shakespeare_char", "batch_size": 2, "data_dir": DATA, "tfds_dir": str(tmp_path),
                       "tokenizer": "bpe", "vocab_size": 300, "block_size": 32})  # fmt: skip
    assert ds.vocab_size == 300
    passage = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    ids = ds.encode(passage)
    assert ds.decode(ids) == passage and len(ids) < len(passage) * 0.75  # subwords, exact round trip
    assert sum(len(v) for v in ds.splits.values()) < 1_115_394 * 0.6  # 597,358 tokens for 1,115,394 characters
    assert set(ds.artifacts()) == {"tokenizer.model"}
    reloaded = make_dataset({"name": "shakespeare_char", "batch_size": 2, "data_dir": DATA, "tfds_dir": str(tmp_path),
                             "tokenizer": "bpe", "vocab_size": 300, "block_size": 32,
                             "tokenizer_path": str(next(tmp_path.glob("tfm_tokenizers/*.model")))})  # fmt: skip
    assert reloaded.encode(passage).tolist() == ids.tolist()


@pytest.fixture
def varied_multi30k(tmp_path):
    """40 pairs whose lengths grow from one sentence to ten sentences (for length bucketing)."""
    folder = tmp_path / "src" / "multi30k"
    folder.mkdir(parents=True)
    en, de = EN, DE
    for stem, n in (("train", 40), ("val", 4), ("test_2016_flickr", 5)):
        for lang, sents in (("en", en), ("de", de)):
            lines = [" ".join(sents[(i + j) % 4] for j in range(1 + i % 10)) for i in range(n)]
            (folder / f"{stem}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def _multi30k_opts(root, **kw):
    return {"name": "multi30k", "batch_size": 4, "data_dir": str(root / "src"), "tfds_dir": str(root / "tfds"),
            "vocab_size": 60, "max_len": 64, **kw}  # fmt: skip


def test_length_buckets_pad_each_batch_to_the_smallest_width_that_fits(varied_multi30k):
    ds = make_dataset(_multi30k_opts(varied_multi30k, bucket=True))
    plain = make_dataset(_multi30k_opts(varied_multi30k))
    assert ds.bucket_widths == [16, 32, 48, 64]
    per_epoch = 40 // 4
    seen, widths, positions = [], [], 0
    for i in range(per_epoch):
        b = ds.batch("train", i)
        w = b["targets"].shape[1]
        assert all(v.shape == (4, w) for v in b.values())
        need = max(int((b["inputs"] != 0).sum(1).max()), int(b["weights"].sum(1).max()))
        assert need <= w and (w == 16 or need > ds.bucket_widths[ds.bucket_widths.index(w) - 1]), (need, w)
        widths.append(w)
        positions += b["targets"].size
        seen += [ds.decode(row) for row in b["targets"]]
    assert len(set(widths)) > 1
    # One epoch serves every training pair once (targets are cut at max_len, so compare prefixes).
    refs = ds.references("train")
    assert len(seen) == 40 and all(any(r.startswith(s) for r in refs) for s in seen)
    # Less padding than one width for all, and the same tokens: the weights add up alike.
    plain_weight = sum(plain.batch("train", i)["weights"].sum() for i in range(per_epoch))
    assert sum(ds.batch("train", i)["weights"].sum() for i in range(per_epoch)) == plain_weight
    assert positions < per_epoch * 4 * 64
    # The next epoch is ordered differently; batches are reproducible.
    nxt = [ds.batch("train", per_epoch + i)["targets"].shape[1] for i in range(per_epoch)]
    again = make_dataset(_multi30k_opts(varied_multi30k, bucket=True))
    np.testing.assert_array_equal(again.batch("train", 3)["inputs"], ds.batch("train", 3)["inputs"])
    assert nxt != widths or not np.array_equal(ds.batch("train", per_epoch)["inputs"], ds.batch("train", 0)["inputs"])
    with pytest.raises(DataError, match="choose one"):
        make_dataset(_multi30k_opts(varied_multi30k, bucket=True, pack=True))


def test_fashion_mnist_batches_follow_the_shuffled_stream_and_decode_each_record_once(tiny_fashion_mnist):
    """Cached records give the batches of ``source.shuffle(seed).repeat()`` over epochs, each decoded once, in order."""
    fm = make_dataset({"name": "fashion_mnist", "batch_size": 8, "data_dir": str(tiny_fashion_mnist / "src"),
                       "tfds_dir": str(tiny_fashion_mnist / "tfds"), "flip": False, "seed": 3})  # fmt: skip
    reads, calls = [], []

    class Counting:  # the training split's source, counting what it decodes, read in chunks where it can
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            reads.append(i)
            return self.source[i]

        def __getitems__(self, ids):
            calls.append(list(ids))
            return [self[i] for i in ids]

    cache = fm._cache["train"]
    cache.source, cache.chunk = Counting(cache.source), 8
    stream = fm.sources["train"].shuffle(seed=3).repeat()  # 20 records: 2.5 batches an epoch
    for i in range(6):  # 48 examples, across three epochs
        expected = np.stack([stream[i * 8 + r]["image"] for r in range(8)]).astype(np.float32) / 255.0
        got = fm.batch("train", i)
        np.testing.assert_allclose(got["inputs"] * 0.3530 + 0.2860, expected, atol=1e-6)
        np.testing.assert_array_equal(got["labels"], [stream[i * 8 + r]["label"] for r in range(8)])
    assert reads == list(range(20))  # one pass, in order
    assert calls == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    validation = fm._cache["validation"]
    assert (validation.start, validation.stop) == (20, len(fm._cache["train"].source.source))  # the held-out tail
    first = fm.batch("validation", 0)
    np.testing.assert_array_equal(first["labels"], [fm.sources["validation"][j]["label"] for j in range(8)])
    test = fm.batch("test", 3)  # 30 test images: the last batch wraps around with zero weights
    np.testing.assert_array_equal(test["weights"], [1] * 6 + [0] * 2)
    np.testing.assert_array_equal(test["labels"], [fm.sources["test"][j % 30]["label"] for j in range(24, 32)])


def test_each_process_reads_only_its_rows_and_they_make_the_global_batch(tiny_fashion_mnist, varied_multi30k):
    fm = make_dataset({"name": "fashion_mnist", "batch_size": 8, "data_dir": str(tiny_fashion_mnist / "src"),
                       "tfds_dir": str(tiny_fashion_mnist / "tfds"), "flip": True, "crop_padding": 2})  # fmt: skip
    # A random crop is the original image shifted by at most 2 pixels (zeros shifted in), possibly flipped.
    raw = fm.sources["train"].shuffle(seed=0).repeat()[0]["image"].astype(np.float32)
    got = fm.batch("train", 0)["inputs"][0] * 0.3530 + 0.2860
    padded = np.pad(raw, ((2, 2), (2, 2), (0, 0)))
    shifts = [padded[y : y + 28, x : x + 28] / 255.0 for y in range(5) for x in range(5)]
    assert any(np.allclose(got, c, atol=1e-5) or np.allclose(got, c[:, ::-1], atol=1e-5) for c in shifts)
    datasets = {
        "fashion_mnist": fm,
        "multi30k": make_dataset(_multi30k_opts(varied_multi30k)),
        "multi30k packed": make_dataset(_multi30k_opts(varied_multi30k, pack=True)),
        "multi30k bucketed": make_dataset(_multi30k_opts(varied_multi30k, bucket=True)),
        "copy": make_dataset({"name": "copy", "batch_size": 4, "vocab_size": 12}),
    }
    for name, ds in datasets.items():
        b = ds.batch_size
        for split in ("train", "validation"):
            for i in (0, 3, 11):
                full = ds.batch(split, i)
                parts = [ds.local_batch(split, i, slice(a, a + b // 2)) for a in (0, b // 2)]
                for k in full:
                    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k], err_msg=f"{name} {split} {k}")
        it = ds.iterator("train", rows=slice(0, b // 2))
        np.testing.assert_array_equal(next(it)[next(iter(full))], ds.batch("train", 0)[next(iter(full))][: b // 2])


def test_shift_right_is_teacher_forcing():
    from tfm.data.base import shift_right

    dec_in, target = shift_right([5, 6, 7], bos=1, eos=2)
    assert dec_in.tolist() == [1, 5, 6, 7] and target.tolist() == [5, 6, 7, 2]
    assert dec_in.dtype == target.dtype == np.int32
    dec_in, target = shift_right([], bos=1, eos=2)  # an empty sentence still predicts EOS after BOS
    assert dec_in.tolist() == [1] and target.tolist() == [2]
