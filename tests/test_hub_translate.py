"""``python -m tfm.translate --hf DIR``: a Marian checkpoint with its own tokenizer, against transformers."""

import json
import os

import numpy as np
import pytest
from _hub import save_hf, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")
spm = pytest.importorskip("sentencepiece")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="needs the shared data folder")


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    """A tiny random Marian with Marian's tokenizer files: source.spm / target.spm and vocab.json."""
    d = tmp_path_factory.mktemp("marian_tok")
    pieces = []
    for lang in ("en", "de"):
        with open(os.path.join(DATA, "multi30k", f"train.{lang}"), encoding="utf-8") as f:
            lines = [next(f).strip() for _ in range(2000)]
        prefix = str(d / lang)
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=120,
                                       model_type="unigram", minloglevel=2, bos_id=-1, eos_id=-1, pad_id=-1)  # fmt: skip
        os.replace(prefix + ".model", d / ("source.spm" if lang == "en" else "target.spm"))
        pieces += [line.split("\t")[0] for line in open(prefix + ".vocab", encoding="utf-8")]
    vocab = {"</s>": 0, "<unk>": 1}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    vocab["<pad>"] = pad = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    torch.manual_seed(0)
    model = transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=pad + 1, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
    )).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.normal_(0.0, 0.2)
    save_hf(model, d)
    gen = json.loads((d / "generation_config.json").read_text()) | {"bad_words_ids": [[pad]]}
    (d / "generation_config.json").write_text(json.dumps(gen))
    return str(d), model, pad


SOURCES = ["A man in a blue shirt is standing on a ladder.", "", "Two dogs play in the snow."]


@pytest.mark.parametrize("beam", [0, 4])
def test_translate_cli_equals_transformers_generate(marian, beam, monkeypatch, capsys):
    import io

    from tfm import translate
    from tfm.hub.tokenizer import load_tokenizer

    directory, ref, pad = marian
    hf_tok = transformers.MarianTokenizer(os.path.join(directory, "source.spm"), os.path.join(directory, "target.spm"),
                                          os.path.join(directory, "vocab.json"))  # fmt: skip
    ours = load_tokenizer(directory)
    for text in SOURCES[::2]:  # the checkpoint's tokenizer encodes as transformers' MarianTokenizer does
        assert ours.encode(text).tolist() == hf_tok(text)["input_ids"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\n".join(SOURCES).encode() + b"\n")))
    argv = ["--hf", directory, "--beam_size", str(beam), "--alpha", "0", "--max_len", "20"]
    assert translate.main(argv) == 0
    printed = capsys.readouterr().out.split("\n")[: len(SOURCES)]
    assert printed[1] == ""  # a blank line stays blank
    for text, line in zip(SOURCES, printed):
        if not text:
            continue
        ids = torch.tensor([hf_tok(text)["input_ids"]])
        kw = dict(num_beams=4, length_penalty=0.0, early_stopping=False) if beam else dict(num_beams=1)
        with torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                               bad_words_ids=[[pad]], **kw)  # fmt: skip
        assert line == hf_tok.decode(out[0], skip_special_tokens=True), (text, np.asarray(out))
