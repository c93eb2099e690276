"""Grouped-query attention (model.num_query_groups) against plain references.

- A GQA model (4 heads in 2 groups of 2) equals `transformers`' Llama with num_key_value_heads=2
  on the same weights: logits within 1e-4 absolute (observed ~1e-6, fp32 summation order), the
  loss within 1e-5 relative; exported through a checkpoint and msg-export-hf as a user would.
- Grown by one group (4 -> 6 heads, 2 -> 3 groups, with hidden, ffn and a layer), with huge new
  weights (N(0, 100^2)), its logits are unchanged within 1e-5 relative: a new group's output is
  masked (eq. 23-24 per group); the head mask has one entry per group.
- The parameter count and FLOPs formulas count the smaller key/value projections.
- Grouping is fixed: what cannot be grown (heads not a multiple of the group size, a checkpoint
  with another group size, groups not dividing over TP, GQA as GPT-2) is refused with the numbers.
"""
import json

import pytest
import torch
from conftest import assert_refused, rel_err

from msg_megatron.config import Shape, load_config
from msg_megatron.growth.operators import grow_model
from msg_megatron.model import build_model
from msg_megatron.model.gpt import padded_vocab_size
from msg_megatron.model.masks import open_masks
from msg_megatron.training.sizes import count_params, kv_cache_bytes

LLAMA = ["model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope", "model.vocab_size=97",
         "model.kv_channels=8", "model.seq_length=16", "model.tie_embeddings=false"]
OLD, NEW = Shape(32, 64, 4, 2), Shape(48, 96, 6, 3)
TOKENS = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))


def _cfg(*extra):
    return load_config(None, LLAMA + ["model.hidden_size=48", "model.ffn_hidden_size=96", "model.num_attention_heads=6",
                                      "model.num_query_groups=3", "model.num_layers=3"] + list(extra))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(TOKENS[:, :-1])


def _huge(name, shape, gen):
    return torch.randn(shape, generator=gen) * 100.0


def test_grown_by_one_group_keeps_its_logits():
    cfg = _cfg()
    model = build_model(cfg.model, OLD)
    attn = model.layers[0].self_attention
    assert (attn.num_groups, attn.per_group) == (2, 2)
    assert attn.linear_qkv.weight.shape == ((4 + 2 * 2) * 8, 32)  # 4 query heads, 2 key and 2 value heads
    assert attn.head_mask.numel() == 2  # one entry per group
    before = _logits(model)
    grown, _ = grow_model(model, NEW, step=3, init=_huge)
    g_attn = grown.layers[0].self_attention
    assert (g_attn.num_groups, g_attn.per_group) == (3, 2)
    assert g_attn.head_mask.tolist() == [1.0, 1.0, 0.0]  # the new group is masked
    assert rel_err(before, _logits(grown)) <= 1e-5
    vocab = padded_vocab_size(cfg.model)
    for shape, m in ((OLD, model), (NEW, grown)):
        assert count_params(cfg.model, shape, vocab) == sum(p.numel() for p in m.parameters())


def test_flops_and_kv_cache_count_the_groups():
    from msg_megatron.training.flops import flops_per_token

    cfg, mha = _cfg(), _cfg("model.num_query_groups=6")
    vocab = padded_vocab_size(cfg.model)
    d, h = 8, NEW.hidden
    # the K and V projections of 3 groups instead of 6 heads: 2 x 3 x 8 fewer rows, fwd + bwd
    saved = flops_per_token(mha.model, NEW, vocab) - flops_per_token(cfg.model, NEW, vocab)
    assert saved == 3 * 2 * h * (2 * 3 * d) * NEW.layers
    assert kv_cache_bytes(cfg.model, NEW) * 2 == kv_cache_bytes(mha.model, NEW) == 2 * 6 * d * 3 * 16 * 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The grown GQA model with its masks open (past the ramp), saved and exported to HF."""
    from msg_megatron.checkpoint.dist import save_checkpoint
    from msg_megatron.hf.export import export

    tmp = tmp_path_factory.mktemp("gqa")
    cfg = _cfg()
    model = build_model(cfg.model, OLD)
    grown, _ = grow_model(model, NEW, step=3, init="normal", init_std=0.2)
    open_masks(grown)
    save_checkpoint(str(tmp / "ck"), grown, None, {"step": 0, "stage": 0, "consumed_samples": 0}, cfg.to_dict())
    res = export(str(tmp / "ck"), str(tmp / "hf"), log=lambda *_: None)
    return grown, cfg, tmp, res


def test_gqa_exports_to_transformers_with_the_same_logits_and_loss(exported):
    transformers = pytest.importorskip("transformers")
    model, cfg, tmp, res = exported
    hf_cfg = json.loads((tmp / "hf" / "config.json").read_text())
    assert res["architecture"] == "LlamaForCausalLM"
    assert (hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"]) == (6, 3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"), dtype=torch.float32).eval()
    ours = _logits(model)
    with torch.no_grad():
        theirs = hf(TOKENS[:, :-1]).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    with torch.no_grad():
        our_loss = model(TOKENS[:, :-1], TOKENS[:, 1:]).mean()
        their_loss = hf(TOKENS, labels=TOKENS).loss  # (transformers shifts the labels itself; causal: the
        # first 16 positions see what ours see)
    assert abs(float(our_loss) - float(their_loss)) <= 1e-5 * float(their_loss)


def test_gqa_imports_back_bitwise(exported, tmp_path):
    """A transformers-made GQA Llama (our export without our own config block) imports with
    num_key_value_heads as the groups, to the same tensors bitwise and transformers' logits."""
    import shutil

    from msg_megatron.checkpoint.dist import load_checkpoint, read_meta
    from msg_megatron.hf.import_hf import import_hf

    model, cfg, tmp, _ = exported
    folder = tmp_path / "hf"
    shutil.copytree(tmp / "hf", folder)
    hf_cfg = json.loads((folder / "config.json").read_text())
    del hf_cfg["msg_megatron"]
    (folder / "config.json").write_text(json.dumps(hf_cfg))
    res = import_hf(str(folder), str(tmp_path / "ck"), seq_length=16)
    assert res["max_abs_logit_diff"] <= 1e-4
    meta = read_meta(str(tmp_path / "ck"))
    saved = meta["config"]["model"]
    assert (saved["num_query_groups"], saved["num_attention_heads"]) == (3, 6)
    from msg_megatron.config import config_from_dict

    back = build_model(config_from_dict(meta["config"]).model, NEW, perform_init=False)
    load_checkpoint(meta["path"], back, restore_rng=False)
    want = {k: v for k, v in model.state_dict().items() if not k.endswith(("_extra_state",))}
    got = back.state_dict()
    for name, t in want.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("overrides, words", [
    (["model.num_query_groups=4"], ["model.num_attention_heads=6", "model.num_query_groups=4"]),
    # a stage with 3 heads cannot hold whole groups of 2
    (["train.steps=8", "growth.stages=[{step: 0, shape: [32, 64, 3, 2]}, {step: 4, shape: [48, 96, 6, 3]}]"],
     ["growth.stages[0]", "heads=3", "2 query heads per group"]),
    # 3 groups over 2 tensor-parallel ranks
    (["parallel.tensor=2", "model.num_attention_heads=12", "model.num_query_groups=3"],
     ["3 query groups", "parallel.tensor=2"]),
])
def test_bad_group_settings_are_refused(overrides, words):
    assert_refused(overrides, words, make=_cfg)


def test_gpt2_export_of_gqa_is_refused():
    from msg_megatron.hf.layout import UnsupportedArchitecture, architecture

    cfg = load_config(None, ["model.num_attention_heads=4", "model.num_query_groups=2", "model.hidden_size=32",
                             "model.kv_channels=8"])
    with pytest.raises(UnsupportedArchitecture, match="multi-head attention only.*2 query groups for 4 heads"):
        architecture(cfg.model, cfg.model.shape)


def test_group_size_cannot_change_through_init_from(exported, tmp_path):
    """The group count grows with the heads; the heads per group never change (no masked,
    function-preserving regrouping): a checkpoint with another group size is refused."""
    from msg_megatron.checkpoint.dist import CheckpointError
    from msg_megatron.training.starts import init_from

    _, _, tmp, _ = exported
    cfg = _cfg("model.num_attention_heads=12", "model.num_query_groups=3", "model.hidden_size=48",
               "model.num_layers=3")  # 4 heads per group; the checkpoint has 2
    with pytest.raises(CheckpointError, match="2 query heads per key/value head.*set model.num_query_groups to 6"):
        init_from(cfg, [(0, NEW)], str(tmp / "ck"), log=lambda *_: None)
