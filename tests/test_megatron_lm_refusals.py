"""What msg-import-megatron / msg-export-megatron refuse, each before anything is written, naming
the argument or the format and the fix; and the args <-> model section mapping both ways."""
import argparse
import os

import pytest
import torch

import megatron_lm_reference as R
from conftest import run_cli
from msg_megatron.checkpoint.megatron_args import NotExpressible, args_for_export, model_from_args


@pytest.mark.parametrize("style", sorted(R.STYLES))
def test_args_map_to_the_model_section_and_back(style):
    args = R.megatron_args(style)
    mcfg, shape = model_from_args(args)
    assert shape.as_tuple() == (64, 96, 4, 4) and mcfg.vocab_size == 100 and mcfg.make_vocab_size_divisible_by == 16
    want = {"llama": ("rmsnorm", "swiglu", "rope", 2, False, False), "gpt2": ("layernorm", "gelu_erf", "learned",
                                                                           None, True, True)}[style]
    assert (mcfg.norm, mcfg.activation, mcfg.position_embedding, mcfg.num_query_groups, mcfg.tie_embeddings,
            mcfg.add_bias_linear) == want
    back = args_for_export(mcfg, shape, 112, 16, 1, 1, 10, 0, {}, True)
    assert model_from_args(back) == (mcfg, shape)
    tanh = argparse.Namespace(**dict(vars(args), openai_gelu=True, swiglu=False))  # (--openai-gelu: the tanh form)
    assert model_from_args(tanh)[0].activation == "gelu"


def test_what_the_model_cannot_express_is_named():
    args = R.megatron_args("llama", num_experts=8, qk_layernorm=True, rotary_percent=0.5, multi_latent_attention=True,
                           apply_residual_connection_post_layernorm=True, position_embedding_type="yarn")
    with pytest.raises(NotExpressible) as e:
        model_from_args(args)
    for name in ("num_experts=8", "qk_layernorm=True", "rotary_percent=0.5", "multi_latent_attention=True",
                 "apply_residual_connection_post_layernorm=True", "position_embedding_type='yarn'"):
        assert name in str(e.value), (name, str(e.value))


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    """A GPT-2-style megatron GPTModel trained a step, saved as Megatron-LM does with the default
    distributed-optimizer format (dp_reshardable), and with qk_layernorm in its args."""
    tmp = tmp_path_factory.mktemp("mlm")
    args = R.megatron_args("gpt2")
    model = R.build_gpt(args)
    ddp, opt = R.optimizer_for(model, args)
    R.train_steps(ddp, opt, args, steps=1)
    R.save_like_megatron_lm(str(tmp / "dp"), model, args, 10, opt, sharding="dp_reshardable")
    R.save_like_megatron_lm(str(tmp / "qk"), model, argparse.Namespace(**dict(vars(args), qk_layernorm=True)), 10)
    return tmp


def _import(load, save, *more):
    return run_cli(["msg_megatron.import_megatron", "--load", str(load), "--save", str(save), *more])


def test_refusals_name_the_problem_and_write_nothing(mlm, tmp_path, tiny_data):
    from msg_megatron.data.tokenizer import find_tokenizer

    r = _import(mlm / "dp", tmp_path / "o", "--no-optimizer", "--tokenizer", find_tokenizer(tiny_data))
    assert r.returncode == 2 and "the tokenizer has 512 tokens but the checkpoint only 112 embedding rows" in \
        r.stderr, r.stderr[-600:]
    r = _import(mlm / "qk", tmp_path / "o")
    assert r.returncode == 2 and "qk_layernorm=True (layer norms on queries and keys)" in r.stderr, r.stderr[-600:]
    r = _import(mlm / "dp", tmp_path / "o")
    assert r.returncode == 2 and "`dp_reshardable` format" in r.stderr and "--dist-ckpt-optim-fully-reshardable" \
        in r.stderr and "--no-optimizer" in r.stderr, r.stderr[-600:]
    r = _import(mlm / "dp", tmp_path / "o", "--iteration", "20")
    assert r.returncode == 2 and "no iteration 20" in r.stderr and "iter_0000010" in r.stderr, r.stderr[-600:]
    r = _import(mlm / "dp", tmp_path / "o", "model.hidden_size=128")
    assert r.returncode == 2 and "come from the checkpoint" in r.stderr, r.stderr[-600:]
    assert not os.path.exists(tmp_path / "o")
    # the weights alone import, at step 0
    r = _import(mlm / "dp", tmp_path / "o", "--no-optimizer", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"optimizer": false' in r.stdout and '"step": 0' in r.stdout


def test_a_crafted_common_pt_is_not_unpickled(mlm, tmp_path):
    """common.pt is read by torch's weights-only unpickler: a global outside Megatron-LM's is refused."""
    import shutil

    shutil.copytree(mlm / "dp", tmp_path / "bad")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"args": Evil(), "iteration": 10}, tmp_path / "bad" / "iter_0000010" / "common.pt")
    r = _import(tmp_path / "bad", tmp_path / "o")
    assert r.returncode == 2 and "refusing to unpickle" in r.stderr and "system" in r.stderr, r.stderr[-600:]
    assert not os.path.exists(tmp_path / "pwned") and not os.path.exists(tmp_path / "o")
    os.remove(tmp_path / "bad" / "iter_0000010" / "metadata.json")  # (Megatron-LM writes it last)
    r = _import(tmp_path / "bad", tmp_path / "o")
    assert r.returncode == 2 and "no metadata.json" in r.stderr, r.stderr[-600:]


@pytest.mark.slow  # (a short training run)
def test_export_refusals(tmp_path):
    from conftest import tiny_checkpoint

    ck = tiny_checkpoint(tmp_path)  # (32, 64, 2, 2), vocabulary 256, trained 2 steps
    out = tmp_path / "mlm"

    def export(*more):
        return run_cli(["msg_megatron.export_megatron", "--load", str(ck), "--out", str(out), *more])

    r = export("--tensor", "3")
    assert r.returncode == 2 and "--tensor 3 must divide the heads (2)" in r.stderr, r.stderr[-600:]
    os.makedirs(out / "keep")
    r = export("--force")
    assert r.returncode == 2 and "not an earlier Megatron-LM export" in r.stderr and os.path.isdir(out / "keep")
    os.rmdir(out / "keep")
    r = export("--tensor", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"make_vocab_size_divisible_by": 128' in r.stdout  # (256 rows = 128 x TP 2: Megatron-LM's own padding)
    assert sorted(os.listdir(out)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    r = export("--force", "--no-optimizer")  # (an earlier export is replaced)
    assert r.returncode == 0, r.stderr[-2000:]
    args = R.checkpoint_args(str(out))
    assert args.no_save_optim and args.no_save_rng and (args.num_layers, args.hidden_size) == (2, 32)
