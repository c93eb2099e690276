"""BERT (model.family=bert) to and from Hugging Face `transformers`, checked against transformers itself.

- A BERT grown in every dimension at TP=2 and trained past the end of its ramp exports to a folder
  that AutoModelForMaskedLM loads with no custom code: its MLM logits equal ours (loaded on one
  process) within 1e-4 absolute (observed ~1e-6: fp32 reduction order), token types and padding
  included; AutoTokenizer loads the WordPiece tokenizer.json and gives our ids with [CLS]/[SEP].
- import -> export is bit-identical.
- BertForMaskedLM and BertForPreTraining folders written by transformers (erf GELU, Google's
  hidden_act=gelu; and the tanh form) import (the first under TP=2 x PP=2) and export back to the
  same tensors bitwise (BertForPreTraining's pooler and NSP classifier as model.binary_head's
  sentence-order head); imported on one process, their logits equal transformers' within 1e-5.
"""
import json

import pytest
import torch

from conftest import launch, run_cli
from test_bert_train import BERT
from test_hf import _assert_same_tensors, _our_model, _quiet, import_then_export

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

# grown in every dimension by step 8, ramp over by step 11, saved at step 12 (masks at 1)
RUN = [a for a in BERT if not a.startswith(("growth.stages=", "train.steps=", "train.save_interval=",
                                            "train.eval_interval="))] + [
    "train.steps=12", "train.save_interval=12", "train.eval_interval=0", "growth.ramp_steps=3",
    "growth.stages=[{step: 0, shape: [32, 64, 2, 2]}, {step: 8, shape: [64, 128, 4, 3]}]"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("bert-hf")
    r = launch(2, ["msg_megatron.pretrain", *RUN, "parallel.tensor=2", f"logging.run_dir={tmp}/run",
                   f"checkpoint.save={tmp}/ck"], timeout=500)
    assert r.returncode == 0, _quiet(r.stderr)
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp / "ck"), "--out", str(tmp / "hf"), "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    return tmp, json.loads(r.stdout.strip().splitlines()[-1])


def _inputs(vocab: int, seq: int, seed: int = 1):
    tokens = torch.randint(5, vocab, (3, seq), generator=torch.Generator().manual_seed(seed))
    types = torch.zeros_like(tokens)
    types[:, seq // 2:] = 1
    keep = torch.ones_like(tokens)
    keep[1, seq - 9:] = 0  # the second sample is shorter: its last 9 positions are padding
    tokens[1, seq - 9:] = 0
    return tokens, types, keep


@pytest.mark.timeout(900)
def test_exported_bert_has_our_mlm_logits(exported):
    tmp, res = exported
    assert res["architecture"] == "BertForMaskedLM" and res["shape"] == [64, 128, 4, 3] and res["tokenizer"]
    model, cfg = _our_model(tmp / "ck")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    tokens, types, keep = _inputs(cfg.model.vocab_size, cfg.model.seq_length)
    with torch.no_grad():
        ours = model(tokens, types=types, padding_mask=keep)
        theirs = hf(input_ids=tokens, token_type_ids=types, attention_mask=keep).logits
    assert ours.shape == theirs.shape and ours.abs().max() > 0.5  # a trained model, not zeros
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    conf = json.load(open(tmp / "hf" / "config.json"))
    assert conf["hidden_act"] == "gelu_pytorch_tanh" and conf["pad_token_id"] == 0
    assert not (tmp / "hf" / "generation_config.json").exists()


@pytest.mark.timeout(900)
def test_exported_wordpiece_tokenizer_loads_in_auto_tokenizer(exported):
    from msg_megatron.data.mlm_data import MLMTokenizer

    tmp, _ = exported
    ours = MLMTokenizer(str(tmp / "hf" / "tokenizer.json"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp / "hf"))
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id) == \
        (ours.cls, ours.sep, ours.mask, ours.pad)
    a, b = "The quick brown fox jumps over the lazy dog.", "It was not amused, and said so."
    assert tok(a).input_ids == [ours.cls] + ours.hf.encode(a) + [ours.sep]
    pair = tok(a, b)
    assert pair.input_ids == [ours.cls] + ours.hf.encode(a) + [ours.sep] + ours.hf.encode(b) + [ours.sep]
    assert pair.token_type_ids == [0] * (len(ours.hf.encode(a)) + 2) + [1] * (len(ours.hf.encode(b)) + 1)


@pytest.mark.timeout(900)
def test_msg_eval_of_a_bert(exported, tmp_path):
    """msg-eval on the BERT checkpoint: lm-eval tasks refused with the reason; the masked-LM accuracy
    of the validation batches equals our model's argmax by hand at their masked positions; --text gives
    the pseudo-log-likelihood, equal within 1e-4 to transformers' BertForMaskedLM on the export, each
    token masked in turn."""
    from msg_megatron.data.sources import open_data
    from msg_megatron.data.batches import model_inputs
    from msg_megatron.data.tokenizer import find_tokenizer, load_tokenizer

    tmp, _ = exported
    r = run_cli(["msg_megatron.eval", "--load", str(tmp / "ck"), "--tasks", "msg_zen"])
    assert r.returncode == 2 and "is a BERT" in r.stderr and "pseudo-log-likelihood" in r.stderr, r.stderr[-800:]
    r = run_cli(["msg_megatron.eval", "--load", str(tmp / "ck"), "--iters", "2", "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    model, cfg = _our_model(tmp / "ck")
    valid = open_data(cfg, log=lambda *_: None, train=False).valid
    right = total = 0
    with torch.no_grad():
        for batch in valid.sequential(cfg.train.micro_batch_size, 2):
            x = model_inputs(batch)
            logits = model(x.tokens, types=x.extra["types"], padding_mask=x.extra["padding_mask"])
            logits = logits[0] if isinstance(logits, tuple) else logits
            m = x.loss_mask.bool()
            right += int((logits.argmax(-1)[m] == x.labels[m]).sum())
            total += int(m.sum())
    assert total > 0 and got["mlm_accuracy"] == right / total and got["val_loss"] > 0

    text = "The quick brown fox jumps over the lazy dog. It was not amused, and said so. " * 3
    (tmp_path / "t.txt").write_text(text)
    r = run_cli(["msg_megatron.eval", "--load", str(tmp / "ck"), "--text", str(tmp_path / "t.txt"), "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    pll = json.loads(r.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(find_tokenizer(pll["checkpoint"]))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp / "hf"), dtype=torch.float32).eval()
    ids, span, want = tok.encode(text), cfg.model.seq_length - 2, 0.0
    with torch.no_grad():
        for start in range(0, len(ids), span):
            window = torch.tensor([tok.cls] + ids[start:start + span] + [tok.sep])
            for j in range(1, len(window) - 1):
                masked = window.clone()
                masked[j] = tok.mask
                want += float(torch.log_softmax(hf(input_ids=masked[None]).logits[0, j].double(), -1)[window[j]])
    assert pll["tokens"] == len(ids) and abs(pll["pll"] - want) <= 1e-4 * max(1.0, abs(want) / 100), (pll, want)


@pytest.mark.timeout(900)
def test_bert_import_then_export_is_bit_identical(exported, tmp_path):
    tmp, _ = exported
    assert import_then_export(tmp / "hf", tmp_path)["architecture"] == "BertForMaskedLM"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("head, act", [("BertForMaskedLM", "gelu"), ("BertForPreTraining", "gelu_new")])
def test_transformers_bert_imports_sharded_and_round_trips(tmp_path, head, act):
    """A BERT written by transformers (no msg-megatron metadata) imports (under TP=2 x PP=2) and exports
    back to the same tensors bitwise; on one process its logits equal transformers' (1e-5).
    BertForPreTraining's pooler and next-sentence classifier become the sentence-order head
    (model.binary_head): its logits are compared too."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_act=act, type_vocab_size=3)
    model = getattr(transformers, head)(cfg)
    with torch.no_grad():  # norms and biases away from their init (1 and 0), so a swapped name shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(str(tmp_path / "src"))
    if head == "BertForMaskedLM":  # (the sharded read once: the other head reads the same tensors)
        r = launch(4, ["msg_megatron.hf.import_hf", "--hf", str(tmp_path / "src"), "--save",
                       str(tmp_path / "ck4"), "--tensor", "2", "--pipeline", "2", "--json"])
    else:
        r = run_cli(["msg_megatron.hf.import_hf", "--hf", str(tmp_path / "src"), "--save", str(tmp_path / "ck4"),
                     "--no-verify"])
    assert r.returncode == 0, _quiet(r.stderr)
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp_path / "ck4"), "--out", str(tmp_path / "back")])
    assert r.returncode == 0, _quiet(r.stderr)
    _assert_same_tensors(tmp_path / "src", tmp_path / "back")
    back = json.load(open(tmp_path / "back" / "config.json"))
    assert back["architectures"] == [head] and back["msg_megatron"]["model"]["binary_head"] == (head != "BertForMaskedLM")
    assert back["hidden_act"] == {"gelu": "gelu", "gelu_new": "gelu_pytorch_tanh"}[act]
    assert back["type_vocab_size"] == 3 and back["layer_norm_eps"] == 1e-12
    r = run_cli(["msg_megatron.hf.import_hf", "--hf", str(tmp_path / "src"), "--save", str(tmp_path / "ck1"), "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    assert json.loads(r.stdout.strip().splitlines()[-1])["max_abs_logit_diff"] <= 1e-5


@pytest.mark.parametrize("change, words", [
    ({"hidden_act": "relu"}, "hidden_act=relu: only GELU"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type=relative_key"),
    ({"is_decoder": True}, "a BERT decoder"),
    ({"num_attention_heads": 5}, "not a multiple of num_attention_heads=5"),
])
def test_bert_configs_without_a_counterpart_are_named(change, words):
    from msg_megatron.hf.import_hf import model_config_from_hf
    from msg_megatron.hf.layout import UnsupportedArchitecture

    conf = dict({"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4}, **change)
    with pytest.raises(UnsupportedArchitecture, match=words):
        model_config_from_hf(conf)
    with pytest.raises(UnsupportedArchitecture, match="--seq-length must be 512"):
        model_config_from_hf(dict(conf, **{"hidden_act": "gelu", "num_attention_heads": 4, "is_decoder": False,
                                           "position_embedding_type": "absolute"}), seq_length=128)
