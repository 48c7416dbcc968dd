"""The umT5 wrapper on a tiny random UMT5EncoderModel and a tokenizer built offline (no download)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel  # noqa: E402

from fastwam.config import TextConfig  # noqa: E402
from fastwam.model.encoders import build_text_encoder  # noqa: E402
from fastwam.model.umt5 import UMT5TextEncoder, clean_prompt  # noqa: E402

WORDS = ("a video recorded from robot's point of view executing the following instruction: pick up black bowl and "
         "place it on plate open top drawer").split()
TEMPLATE = "A video recorded from a robot's point of view executing the following instruction: {task}"
D_MODEL = 16


def _tokenizer() -> T5Tokenizer:
    # A unigram vocabulary written out directly: T5's special tokens (<pad>=0, </s>=1, <unk>=2), the word-boundary
    # piece, whole words, and single letters as a fallback for anything else.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in dict.fromkeys(w.lower() for w in WORDS)]
    vocab += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz':"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    tok = _tokenizer()
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(tok), d_model=D_MODEL, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16, is_encoder_decoder=False)
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")
    return root


def test_shapes_padding_template(umt5_dir, tmp_path):
    enc = UMT5TextEncoder.from_pretrained(umt5_dir, max_len=24, template=TEMPLATE, cache_dir=tmp_path)
    assert (enc.dim, enc.max_len) == (D_MODEL, 24)
    out = enc(["pick up the black bowl", "open the top drawer"])
    assert out.shape == (2, 24, D_MODEL) and out.dtype == torch.float32
    # Reference: tokenizer + model by hand on the templated prompt.
    tok = enc.tokenizer(["A video recorded from a robot's point of view executing the following instruction: "
                         "pick up the black bowl"], padding="max_length", max_length=24, truncation=True,
                        return_tensors="pt")
    n = int(tok["attention_mask"].sum())
    assert 1 < n < 24 and tok["input_ids"][0, n - 1] == 1  # real tokens end with </s>
    with torch.no_grad():
        ref = enc.model(**tok).last_hidden_state[0]
    torch.testing.assert_close(out[0, :n], ref[:n], rtol=1e-5, atol=1e-6)
    assert (out[0, n:] == 0).all()  # zeroed past the real tokens, as Wan does
    assert (out[0, :n].abs().sum(-1) > 0).all()
    # Whitespace / HTML entities do not change the prompt.
    assert clean_prompt("  pick &amp; place\n the  bowl ") == "pick & place the bowl"
    torch.testing.assert_close(enc(["  pick up   the black\tbowl "])[0], out[0])


def test_truncation(umt5_dir):
    enc = UMT5TextEncoder.from_pretrained(umt5_dir, max_len=8, template="{task}", cache_dir=None)
    out = enc(["pick up the black bowl and place it on the plate then open the top drawer"])
    assert out.shape == (1, 8, D_MODEL) and (out[0].abs().sum(-1) > 0).all()


def test_disk_cache(umt5_dir, tmp_path):
    enc = UMT5TextEncoder.from_pretrained(umt5_dir, max_len=16, template=TEMPLATE, cache_dir=tmp_path / "c")
    first = enc(["open the top drawer"])
    files = list((tmp_path / "c").glob("*.safetensors"))
    assert len(files) == 1
    # A fresh encoder (empty memory cache) must read the file, not run the model.
    again = UMT5TextEncoder.from_pretrained(umt5_dir, max_len=16, template=TEMPLATE, cache_dir=tmp_path / "c")

    def boom(*a, **k):
        raise AssertionError("the model ran although the embedding is cached on disk")

    again.model.forward = boom
    assert torch.equal(again(["open the top drawer"]), first)
    # Another max_len / template gives another key (and so does another model directory).
    other = UMT5TextEncoder.from_pretrained(umt5_dir, max_len=12, template=TEMPLATE, cache_dir=tmp_path / "c")
    other(["open the top drawer"])
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2
    # A corrupt cache file is recomputed, not fatal.
    files[0].write_bytes(b"garbage")
    fresh = UMT5TextEncoder.from_pretrained(umt5_dir, max_len=16, template=TEMPLATE, cache_dir=tmp_path / "c")
    assert torch.equal(fresh(["open the top drawer"]), first)


def test_build_from_config_and_errors(umt5_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTWAM_TEXT_CACHE", str(tmp_path / "env_cache"))
    enc = build_text_encoder(TextConfig(kind="umt5", path=str(umt5_dir / "text_encoder"), max_len=10), D_MODEL)
    assert isinstance(enc, UMT5TextEncoder) and enc.template == TextConfig.template
    assert enc(["pick up the black bowl"]).shape == (1, 10, D_MODEL)
    assert len(list((tmp_path / "env_cache").glob("*.safetensors"))) == 1
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(FileNotFoundError, match="text_encoder/config.json"):
        UMT5TextEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="task"):
        UMT5TextEncoder.from_pretrained(umt5_dir, template="no placeholder")


def test_disk_cache_is_bounded_least_recently_used_first(umt5_dir, tmp_path):
    import time

    enc = UMT5TextEncoder.from_pretrained(umt5_dir, max_len=16, template=TEMPLATE, cache_dir=tmp_path / "c")
    enc(["prompt zero"])
    one = next((tmp_path / "c").glob("*.safetensors")).stat().st_size
    enc.max_cache_bytes = 3 * one  # room for three embeddings
    first = enc.cache_path(enc.prompt("prompt zero"))
    for i in range(1, 5):
        time.sleep(0.01)  # distinct modification times
        if i == 3:  # the cache is full (0, 1, 2); using "prompt zero" again makes it the most recent ...
            before = first.stat().st_mtime_ns
            fresh = UMT5TextEncoder.from_pretrained(umt5_dir, max_len=16, template=TEMPLATE, cache_dir=tmp_path / "c")
            fresh(["prompt zero"])  # read from disk (a fresh encoder's memory is empty): marks it used
            assert first.stat().st_mtime_ns > before
        enc([f"prompt {i}"])
    files = list((tmp_path / "c").glob("*.safetensors"))
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= 3 * one
    # ... so "prompt 3" and "prompt 4" evict 1 and 2, the least recently used, and 0 stays.
    assert first.exists() and enc.cache_path(enc.prompt("prompt 4")).exists()
    for gone in (1, 2):
        assert not enc.cache_path(enc.prompt(f"prompt {gone}")).exists()
