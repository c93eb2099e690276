"""Hugging Face export/import against `transformers` itself.

- A Llama-style and a GPT-2-style model, grown under TP=2 x PP=2 (rank-interleaved heads and FFN
  units, the tied output copy on the last stage) and trained past the end of the ramp, export to a
  folder that AutoModelForCausalLM loads with no custom code: its logits equal ours (loaded on one
  process) within 1e-4 absolute on logits of magnitude ~1-10 (observed ~1e-6: fp32 reduction order);
  `generate` runs; the tokenizer encodes text to the sentencepiece ids.
- import -> export is bit-identical; an HF model made by transformers imports under TP=2 x PP=2
  (each rank reads only its shards) and exports back to the same tensors bitwise.
- A mid-ramp checkpoint is refused; unsupported architectures get messages naming the flags.
"""
import glob
import json
import math
import os
import sysconfig

import pytest
import torch

from conftest import launch, run_cli
from train_runs import write_config

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it

transformers = pytest.importorskip("transformers")

ARCHS = {  # (extra config, stages): every dimension grows; both end past the ramp (3 steps)
    "llama": (["model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope"],
              [[32, 64, 2, 2], [48, 128, 4, 4]]),  # heads x head_dim (32) != hidden (48): head_dim exported
    "gpt2": (["model.tie_embeddings=false"], [[32, 64, 4, 2], [48, 128, 6, 4]]),
}


def _quiet(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if "warn" not in line.lower())[-3000:]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def grown(request, tmp_path_factory, tiny_data):
    """A checkpoint trained 10 steps at TP=2 x PP=2 with a growth at step 4, and its HF export."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"hf-{arch}")
    extra, stages = ARCHS[arch]
    cfg = tmp / "cfg.yaml"
    write_config(cfg, extra + ["train.steps=10"], stages)
    r = launch(4, ["msg_megatron.pretrain", str(cfg), "parallel.tensor=2", "parallel.pipeline=2",
                   f"logging.run_dir={tmp}/run", f"checkpoint.save={tmp}/ck"], timeout=400)
    assert r.returncode == 0, _quiet(r.stderr)
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp / "ck"), "--out", str(tmp / "hf"), "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    return arch, tmp, json.loads(r.stdout.strip().splitlines()[-1])


def _our_model(ckpt):
    from msg_megatron.checkpoint.dist import load_checkpoint, read_meta
    from msg_megatron.config import Shape, config_from_dict
    from msg_megatron.model import build_model

    meta = read_meta(str(ckpt))
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg.model, Shape(*meta["shape"]), perform_init=False)
    load_checkpoint(meta["path"], model, restore_rng=False)
    return model.eval(), cfg


@pytest.mark.timeout(600)
def test_exported_model_has_our_logits(grown):
    arch, tmp, res = grown
    assert res["architecture"] == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    model, cfg = _our_model(tmp / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == res["architecture"]
    tokens = torch.randint(0, cfg.model.vocab_size, (3, cfg.model.seq_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape
    assert ours.abs().max() > 0.5  # a trained model, not zeros
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    out = hf.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    with torch.no_grad():  # greedy continuation agrees with our argmax on the same prefix
        assert int(model(out[:, :5])[0, -1].argmax()) == int(out[0, 5])


def _texts():
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:25]
    return [open(f, encoding="utf-8", errors="replace").read()[:20000] for f in files] + [
        "héllo wörld 日本語 😀  \t\n  x</s><s>  12345", "", " ", "a  b   c\n\n\tdef f(x):\n    return x"]


@pytest.mark.timeout(600)
def test_exported_tokenizer_encodes_like_sentencepiece(grown):
    _, tmp, _ = grown
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp / "hf" / "tokenizer.model"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp / "hf"))
    for text in _texts():
        ids = tok.encode(text)
        assert ids == sp.encode(text), text[:80]
        assert tok.decode(ids) == text


def import_then_export(src, tmp_path) -> dict:
    """msg-import-hf of the export `src`, then msg-export-hf of that: the same tensors bitwise and the
    same config.json (but the step); returns the import's JSON (its logits check: <= 1e-4)."""
    r = run_cli(["msg_megatron.hf.import_hf", "--hf", str(src), "--save", str(tmp_path / "ck"), "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["max_abs_logit_diff"] <= 1e-4
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")])
    assert r.returncode == 0, _quiet(r.stderr)
    _assert_same_tensors(src, tmp_path / "hf")
    a, b = (json.load(open(d / "config.json")) for d in (src, tmp_path / "hf"))
    a["msg_megatron"].pop("step"), b["msg_megatron"].pop("step")
    assert a == b
    return res


@pytest.mark.timeout(600)
def test_import_then_export_is_bit_identical(grown, tmp_path):
    _, tmp, _ = grown
    import_then_export(tmp / "hf", tmp_path)


def _assert_same_tensors(dir_a, dir_b):
    from safetensors.torch import load_file

    def read(d):
        out = {}
        for f in sorted(glob.glob(str(d / "*.safetensors"))):
            out.update(load_file(f))
        return out

    a, b = read(dir_a), read(dir_b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_model_imports_sharded_and_round_trips(tmp_path, arch):
    """A model written by transformers (no msg-megatron metadata) imports under TP=2 x PP=2 and
    exports back to the same tensors; imported on one process, its logits equal transformers'."""
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                       max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True,
                                       mlp_bias=True, rope_theta=500000.0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=200, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(str(tmp_path / "src"))
    r = launch(4, ["msg_megatron.hf.import_hf", "--hf", str(tmp_path / "src"), "--save",
                   str(tmp_path / "ck4"), "--tensor", "2", "--pipeline", "2", "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp_path / "ck4"), "--out", str(tmp_path / "back")])
    assert r.returncode == 0, _quiet(r.stderr)
    _assert_same_tensors(tmp_path / "src", tmp_path / "back")
    r = run_cli(["msg_megatron.hf.import_hf", "--hf", str(tmp_path / "src"), "--save", str(tmp_path / "ck1"), "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    assert json.loads(r.stdout.strip().splitlines()[-1])["max_abs_logit_diff"] <= 1e-5


@pytest.mark.timeout(300)
def test_mid_ramp_export_is_refused(tmp_path, tiny_data):
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, ["growth.ramp_steps=20"], [[32, 64, 2, 2], [32, 128, 4, 2]])
    # grown at step 4 with a 20-step ramp: masks at 1 from step 24 on, in the checkpoint saved after
    # step 24, i.e. step_000025; saved after 8, 16, 24 steps and at the end (25)
    r = run_cli(["msg_megatron.pretrain", str(cfg), "train.steps=25", "train.save_interval=8", "checkpoint.keep=4",
                 f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ck"])
    assert r.returncode == 0, _quiet(r.stderr)
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp_path / "ck" / "step_000008"), "--out", str(tmp_path / "hf")])
    assert r.returncode == 2 and "mid-ramp" in r.stderr and "Train 17 more steps (to step 25" in r.stderr, r.stderr
    assert not (tmp_path / "hf").exists() and not glob.glob(str(tmp_path / "hf.tmp-*"))
    # the count is right: step 24's checkpoint is still refused (1 more step), step 25's exports
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp_path / "ck" / "step_000024"), "--out", str(tmp_path / "a")])
    assert r.returncode == 2 and "Train 1 more step (to step 25" in r.stderr, r.stderr
    r = run_cli(["msg_megatron.hf.export", "--load", str(tmp_path / "ck" / "step_000025"), "--out", str(tmp_path / "b")])
    assert r.returncode == 0, _quiet(r.stderr)


@pytest.mark.timeout(300)
def test_growth_run_starts_from_an_imported_model(grown, tmp_path):
    """checkpoint.init_from: the imported model is stage 0 of a new growth run (and a wrong
    architecture or first shape is refused by name)."""
    arch, tmp, res = grown
    r = run_cli(["msg_megatron.hf.import_hf", "--hf", str(tmp / "hf"), "--save", str(tmp_path / "imp"), "--no-verify"])
    assert r.returncode == 0, _quiet(r.stderr)
    extra, _ = ARCHS[arch]
    h, f, a, n = res["shape"]
    cfg = tmp_path / "cfg.yaml"
    write_config(cfg, extra + ["train.steps=6"], [[h, f, a, n], [h, 2 * f, a, n]])
    tok = str(tmp_path / "imp" / "step_000000" / "tokenizer.model")
    args = ["msg_megatron.pretrain", str(cfg), f"checkpoint.init_from={tmp_path}/imp", f"data.tokenizer_model={tok}"]
    r = run_cli(args + [f"logging.run_dir={tmp_path}/run"])
    assert r.returncode == 0, _quiet(r.stderr)
    assert "[init] weights of" in r.stdout
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        recs = [json.loads(x) for x in fh]
    first = [x for x in recs if "loss" in x][0]["loss"]
    assert first < math.log(512) - 0.3  # the trained weights, not a fresh init (~ln 512)
    growth = [x for x in recs if x.get("event") == "growth"][0]
    assert abs(growth["probe_loss_after"] - growth["probe_loss_before"]) <= 1e-5 * growth["probe_loss_before"]
    r = run_cli(args + [f"logging.run_dir={tmp_path}/bad", "growth.stages.0.shape=[16, 64, 2, 2]"])
    assert r.returncode == 2 and "growth.stages[0]" in r.stderr, _quiet(r.stderr)


def test_unsupported_architectures_are_named():
    from msg_megatron.config import ModelConfig, Shape
    from msg_megatron.hf.import_hf import model_config_from_hf
    from msg_megatron.hf.layout import UnsupportedArchitecture, architecture

    with pytest.raises(UnsupportedArchitecture, match="model.norm=layernorm model.activation=swiglu"):
        architecture(ModelConfig(activation="swiglu"), Shape(256, 1024, 4, 4))
    with pytest.raises(UnsupportedArchitecture, match="heads x head_dim == hidden"):
        architecture(ModelConfig(kv_channels=32), Shape(256, 1024, 4, 4))
    llama = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3}
    with pytest.raises(UnsupportedArchitecture, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        model_config_from_hf(llama)  # (grouped-query attention itself imports: tests/test_gqa.py)
    with pytest.raises(UnsupportedArchitecture, match="model_type `t5` is not supported"):
        model_config_from_hf({"model_type": "t5"})


def test_exports_and_prepared_data_follow_the_umask(grown, tiny_data):
    """safetensors writes 0600 and mkdtemp 0700: both are set to what the umask gives (a cluster
    group can read an export and a prepared dataset)."""
    from msg_megatron.permissions import current_umask

    _, tmp, _ = grown
    mask = current_umask()
    for f in os.listdir(tmp / "hf"):
        assert os.stat(tmp / "hf" / f).st_mode & 0o777 == 0o666 & ~mask, f
    assert os.stat(tmp / "hf").st_mode & 0o777 == 0o777 & ~mask
    assert os.stat(tiny_data).st_mode & 0o777 == 0o777 & ~mask
