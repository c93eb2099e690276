"""Our sentencepiece BPE model as a `tokenizers` tokenizer.json that AutoTokenizer loads.

Written directly (not through transformers' slow->fast converter, which assumes Llama's dummy
prefix and normaliser): sentencepiece BPE merges the adjacent pair whose concatenation is the
highest-scoring piece, which a `tokenizers` BPE reproduces with merges ranked by the merged piece's
score; our model uses identity normalisation with spaces written as U+2581, no dummy prefix and
byte fallback, so the json has exactly that normaliser/decoder. The test suite checks that both
encode real text to the same ids and decode it back unchanged.
"""
from __future__ import annotations

import json
import os
import shutil

import sentencepiece as spm

from ..data.tokenizer import load_tokenizer

SPACE = "\u2581"


def tokenizer_json(model_path: str) -> dict:
    sp = spm.SentencePieceProcessor(model_file=model_path)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {p: i for p, i in vocab.items()
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for piece, pid in normal.items():
        for j in range(1, len(piece)):
            left, right = piece[:j], piece[j:]
            if left in normal and right in normal:
                merges.append((-sp.get_score(pid), pid, normal[left], normal[right], left, right))
    merges.sort()
    specials = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    unk = sp.id_to_piece(sp.unk_id())
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in specials],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[m[4], m[5]] for m in merges]},
    }


# A GPT export states the tokens training used. Documents were separated by the end-of-document token
# only (data/tokenize_files.py appends EOD to each, never a BOS), so a document starts after EOD: the
# export's BOS is EOD (as GPT-2's <|endoftext|>), not the tokenizer's own <s>, which the model never
# saw, and which lm-evaluation-harness would put before every document it scores (its prefix token is
# the BOS when there is one). Its pad token is the tokenizer's own if it has one, else EOD (padding is
# masked out; transformers' batching and lm-eval need one). A BERT keeps its tokens as trained.
def special_ids(path: str, family: str = "gpt") -> dict:
    """{"bos", "eos", "pad"} ids the export states (see above; None where it has none)."""
    tok = load_tokenizer(path)
    if family == "bert":
        return {"bos": tok.bos, "eos": tok.eod, "pad": tok.pad}
    return {"bos": tok.eod, "eos": tok.eod, "pad": tok.eod if tok.pad is None else tok.pad}


def write_tokenizer(path: str, out_dir: str, model_max_length: int, family: str = "gpt") -> None:
    """The files AutoTokenizer loads, for our sentencepiece model or a Hugging Face tokenizer.json."""
    if path.endswith(".json"):
        write_hf_tokenizer(path, out_dir, model_max_length, family)
    else:
        write_sentencepiece_tokenizer(path, out_dir, model_max_length)


def write_hf_tokenizer(path: str, out_dir: str, model_max_length: int, family: str = "gpt") -> None:
    """tokenizer.json as trained, with a tokenizer_config.json naming its special tokens (the one
    beside it, if any, kept: chat template and the like) and special_tokens_map.json."""
    tok = load_tokenizer(path)
    shutil.copyfile(path, os.path.join(out_dir, "tokenizer.json"))
    config = {}
    if os.path.isfile(tok.config_path):
        with open(tok.config_path, encoding="utf-8") as f:
            config = json.load(f)
    ids = special_ids(path, family)
    special = {k: tok.token_name(v) for k, v in (("bos_token", ids["bos"]), ("eos_token", tok.eod),
                                                 ("pad_token", ids["pad"]), ("cls_token", tok.cls),
                                                 ("sep_token", tok.sep), ("mask_token", tok.mask)) if v is not None}
    config.update(special, model_max_length=model_max_length)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("clean_up_tokenization_spaces", False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=1, ensure_ascii=False)


def write_sentencepiece_tokenizer(model_path: str, out_dir: str, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (+ the sentencepiece model)."""
    sp = spm.SentencePieceProcessor(model_file=model_path)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(model_path), f, ensure_ascii=False)
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    eod = sp.id_to_piece(sp.eos_id())  # (BOS and pad: EOD, see special_ids)
    special = {"bos_token": eod, "eos_token": eod, "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": eod}
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length,
                  add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
                  # the text "</s>" is ordinary text to sentencepiece: keep it so in transformers
                  split_special_tokens=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=1)
