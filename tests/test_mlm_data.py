"""BERT's masked-LM samples (msg_megatron/data/mlm_data.py, megatron's BERTMaskedWordPieceDataset) on
the embedded corpus: the WordPiece tokenizer has BERT's special tokens and loads in transformers;
masking statistics over 10k samples (15% of the tokens chosen; of those 80% [MASK], 10% random,
10% kept; each within 1 percentage point); whole-word masking; sentence pairs; samples are a
function of their number only (deterministic, resumable, epochs independent of the run's length)."""
import os

import numpy as np
import pytest

from msg_megatron.data.corpus import embedded_documents, select_documents
from msg_megatron.data.errors import DataError
from msg_megatron.data.mlm_data import FIELDS, MLMCorpus, MLMTokenizer, split_sentences, train_wordpiece
from msg_megatron.data.tokenize_files import write_indexed

pytestmark = pytest.mark.slow  # trains a tokenizer, draws ~20k samples (~15 s)

SEQ = 64


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mlm"))
    docs = select_documents(embedded_documents(), 1_000_000)
    path = train_wordpiece((t for _, t in docs), out, 1024)
    info = write_indexed(docs, path, os.path.join(out, "train"), sentences=True)
    tok = MLMTokenizer(path)
    return out, tok, info


def test_tokenizing_in_process_leaves_torchs_threads_alone(mlm, tmp_path):
    """workers=1 tokenizes in the calling process (the trainer preparing the embedded corpus): it
    must not set torch's threads, which made the training after it 1.5x slower on 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        write_indexed(select_documents(embedded_documents(), 20_000), os.path.join(mlm[0], "tokenizer.json"),
                      str(tmp_path / "t"), sentences=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_configs_masking_reaches_the_corpus(mlm):
    """data.mask_prob / short_seq_prob / whole_word_masking and model.binary_head are what the
    training's corpora (sources._mlm_corpora) are built with: the same samples as MLMCorpus given
    them directly, and other samples than the defaults'."""
    from msg_megatron.config import load_config
    from msg_megatron.data.sources import _mlm_corpora

    cfg = load_config("configs/bert_demo_cpu.yaml", [f"model.seq_length={SEQ}", "train.seed=1234", "data.mask_prob=0.3",
                                                     "data.short_seq_prob=0.0", "data.whole_word_masking=true",
                                                     "model.binary_head=true"])
    made = _mlm_corpora(cfg, mlm[1])(os.path.join(mlm[0], "train"), "train", None, os.path.join(mlm[0], "cache"))
    direct = _corpus(mlm, masking_probability=0.3, short_sequence_probability=0.0, whole_word=True, pairs=True)
    assert made.identity == direct.identity and all(np.array_equal(made[k], direct[k]) for k in range(20))
    assert made.identity != _corpus(mlm).identity
    chosen = np.mean([made[k][3].sum() / made[k][4].sum() for k in range(200)])
    assert 0.25 < chosen <= 0.3, chosen  # twice the default 15% (megatron floors per sample)


def _corpus(mlm, **kw):
    out, tok, _ = mlm
    return MLMCorpus(os.path.join(out, "train"), tok, SEQ, 1234, os.path.join(out, "cache"), **kw)


def test_sentences_split_code_by_line_and_prose_at_sentence_ends():
    assert split_sentences("def f(x):\n    return x.y\n\nThe end. It works! Does it? yes.\n") == [
        "def f(x):", "return x.y", "The end.", "It works!", "Does it? yes."]


def test_wordpiece_tokenizer_has_berts_special_tokens_and_loads_in_transformers(mlm):
    from transformers import AutoTokenizer

    out, tok, info = mlm
    assert (tok.pad, tok.cls, tok.sep, tok.mask) == (0, 2, 3, 4) and tok.vocab_size == 1024
    assert info["sequences"] > info["documents"] > 10  # sentences, documents
    # tokenized by 2 worker processes: the same bytes
    two = os.path.join(out, "two")
    write_indexed(select_documents(embedded_documents(), 1_000_000), os.path.join(out, "tokenizer.json"), two,
                  workers=2, sentences=True)
    for ext in (".bin", ".idx"):
        with open(os.path.join(out, "train" + ext), "rb") as a, open(two + ext, "rb") as b:
            assert a.read() == b.read(), ext
    hf = AutoTokenizer.from_pretrained(out)
    text, other = "The sum of two values: return a + b.", "Another sentence follows."
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf(text, other)["input_ids"] == [tok.cls] + tok.encode(text) + [tok.sep] + tok.encode(other) + [tok.sep]
    assert hf.mask_token_id == tok.mask and hf.pad_token_id == tok.pad
    assert any(t.startswith("##") for t in tok.inv_vocab.values())  # pieces inside words, as BERT marks them


def test_wordpiece_vocabulary_is_the_same_in_another_process(mlm):
    """The same texts give the same tokenizer.json, byte for byte, in a fresh process (tokenizers'
    trainer alone gave a different vocabulary per process: its hash maps' order broke merge ties);
    the "##c" pieces given to the trainer up front are ordinary pieces, not special tokens."""
    import subprocess
    import sys

    out, tok, _ = mlm
    code = ("import sys; from msg_megatron.data.corpus import embedded_documents, select_documents; "
            "from msg_megatron.data.mlm_data import train_wordpiece; "
            "train_wordpiece((t for _, t in select_documents(embedded_documents(), 1_000_000)), sys.argv[1], 1024)")
    again = os.path.join(out, "again")
    subprocess.run([sys.executable, "-c", code, again], check=True, timeout=120)
    with open(os.path.join(out, "tokenizer.json"), "rb") as a, open(os.path.join(again, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert hf.encode("a##e", add_special_tokens=False).tokens[:2] == ["a", "#"]  # ("##e" in text: not one token)
    assert {t.content for t in hf.get_added_tokens_decoder().values()} == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


def test_masking_statistics_over_10k_samples(mlm):
    """megatron chooses min(15% of the target length, round(15% of the tokens)) positions per
    sample; over the corpus that is 14-15% of all tokens (specials included)."""
    c, tok = _corpus(mlm), mlm[1]
    chosen = tokens = masked = kept = 0
    for k in range(10_000):
        s = c.sample(k)
        tokens += int(s["padding_mask"].sum())
        pos = np.nonzero(s["loss_mask"])[0]
        chosen += len(pos)
        masked += int((s["text"][pos] == tok.mask).sum())
        kept += int(((s["text"][pos] == s["labels"][pos]) & (s["text"][pos] != tok.mask)).sum())
    assert abs(chosen / tokens - 0.15) < 0.01, chosen / tokens
    assert abs(masked / chosen - 0.8) < 0.01, masked / chosen
    assert abs(kept / chosen - 0.1) < 0.01, kept / chosen  # (a random token equal to the original counts as kept)
    assert abs(1 - (masked + kept) / chosen - 0.1) < 0.01


def _partial_words(c, tok, n):
    """Masked pieces whose word's other pieces are not all masked, over n samples. A word is a
    start piece and the `##` pieces after it ([CLS]/[SEP] belong to none; as megatron groups them,
    a `##` piece that truncation left after a [SEP] continues the word before it)."""
    bad = 0
    for k in range(n):
        s = c.sample(k)
        length = int(s["padding_mask"].sum())
        original = np.where(s["loss_mask"] == 1, s["labels"], s["text"])[:length]
        words = []
        for i, t in enumerate(original.tolist()):
            if t in (tok.cls, tok.sep):
                continue
            if tok.word_start(t) or not words:
                words.append([])
            words[-1].append(i)
        chosen = s["loss_mask"].astype(bool)
        bad += sum(int(chosen[w].any() and not chosen[w].all()) for w in words)
    return bad


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(mlm):
    tok = mlm[1]
    assert _partial_words(_corpus(mlm, whole_word=True), tok, 2000) == 0
    assert _partial_words(_corpus(mlm), tok, 2000) > 0  # token-level masking splits words


def test_samples_are_berts_sentence_pairs(mlm):
    c, tok = _corpus(mlm), mlm[1]
    for k in range(500):
        s = c.sample(k)
        n = int(s["padding_mask"].sum())
        assert 4 <= n <= SEQ and s["text"].shape == (SEQ,)
        original = np.where(s["loss_mask"] == 1, s["labels"], s["text"])
        assert original[0] == tok.cls and original[n - 1] == tok.sep
        types = s["types"][:n]
        assert (np.diff(types) >= 0).all() and set(types.tolist()) <= {0, 1}  # A then B
        if types[-1] == 1:  # [CLS] A [SEP] B [SEP]
            assert original[int(np.argmax(types)) - 1] == tok.sep
        assert (s["labels"][s["loss_mask"] == 0] == -1).all() and not s["loss_mask"][[0, n - 1]].any()
        assert not s["padding_mask"][n:].any()
    # the sentence-order head's pairs: B and A swapped half of the time
    pairs = _corpus(mlm, pairs=True)
    swapped = np.mean([pairs.sample(k)["is_random"] for k in range(2000)])
    assert abs(swapped - 0.5) < 0.04, swapped
    # a batch row (FIELDS): the label fills the last row; without pairs it is 0
    rows = [pairs[k] for k in range(50)]
    assert all(r.shape == (len(FIELDS), SEQ) and (r[-1] == int(pairs.sample(k)["is_random"])).all()
               for k, r in enumerate(rows))
    plain = _corpus(mlm)
    assert not any(plain[k][-1].any() for k in range(50))
    assert pairs.identity != _corpus(mlm).identity  # another sample stream: resuming across it is a data change


def test_a_sample_is_a_function_of_its_number(mlm):
    a = _corpus(mlm)
    n = a.n
    picks = [3, n - 1, n + 3, 2 * n + 7]  # epochs 0, 1, 2
    want = {k: a.sample(k) for k in picks}
    b = _corpus(mlm)  # another run (from the cache): straight to epoch 2, then back
    for k in reversed(picks):
        got = b.sample(k)
        for key in want[k]:
            assert np.array_equal(np.asarray(got[key]), np.asarray(want[k][key])), (k, key)
    assert not np.array_equal(a.sample(3)["text"], a.sample(n + 3)["text"])  # an epoch is a new order and masking
    other_seed = MLMCorpus(os.path.join(mlm[0], "train"), mlm[1], SEQ, 99, os.path.join(mlm[0], "cache"))
    assert not np.array_equal(other_seed.sample(3)["text"], want[3]["text"])


def test_a_tokenizer_without_berts_special_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["some words here"] * 10, trainers.WordPieceTrainer(vocab_size=50,
                                                                               special_tokens=["[UNK]", "[SEP]"]))
    tk.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"lacks the special tokens .*cls \('\[CLS\]'\), mask \('\[MASK\]'\), pad"):
        MLMTokenizer(str(tmp_path / "tokenizer.json"))
