"""Megatron-LM checkpoints in and out, against megatron-core's own GPTModel (no reference by hand).

- Import: megatron's GPTModel (Llama-style: RMSNorm, SwiGLU, RoPE, GQA, untied; GPT-2-style:
  LayerNorm, erf GELU, learned positions, tied, biases), trained 2 AdamW steps and saved as
  Megatron-LM saves it (tests/megatron_lm_reference.py) with its distributed optimizer's fully
  reshardable state or its plain optimizer's: our logits equal megatron's within 1e-5 (fp32; seen
  ~2e-7), the moments and step carried exactly. A checkpoint megatron wrote at TP=2 x PP=2 imports
  on four ranks at TP=2 x PP=2 (each holding its shard) and gives megatron's logits.
- Export: a model grown under TP=2 (units interleaved by rank) and trained past its ramp exports
  for TP=2; megatron's GPTModel loads it at TP=1 and TP=2 as Megatron-LM does
  (model, distributed optimizer, scheduler): logits within 1e-5 of ours, moments equal ours.
- Round trip Megatron-LM -> here -> msg-grow -> Megatron-LM: the function is kept at each step.
- Refusals name the argument (MoE, qk-layernorm, rotary_percent, ...) or the optimizer format, with the fix.
"""
import json
import os

import pytest
import torch

import megatron_lm_reference as R
from conftest import launch, off_schedule, pooled, run_cli
from train_runs import LLAMA, trained

pytestmark = pytest.mark.slow

TOKENS = (torch.arange(48).reshape(2, 24) * 7) % 100


def _quiet(stderr: str) -> str:
    return "\n".join(x for x in stderr.splitlines() if "warn" not in x.lower())[-3000:]


def _ours(ckpt, tokens=TOKENS):
    """Our model of checkpoint `ckpt`, loaded in this process (TP = PP = 1): logits and the checkpoint."""
    from msg_megatron.checkpoint.dist import load_checkpoint, read_meta
    from msg_megatron.config import Shape, config_from_dict
    from msg_megatron.model import build_model

    meta = read_meta(str(ckpt))
    model = build_model(config_from_dict(meta["config"]).model, Shape(*meta["shape"]), perform_init=False)
    load_checkpoint(meta["path"], model, None)
    model.eval()
    with torch.no_grad():
        return model(tokens), meta


def _megatron_run(tmp, style, distributed=True, sharding="fully_reshardable", singleton=False, **over):
    """megatron's GPTModel trained 2 steps, saved as Megatron-LM does; (save dir, logits, AdamW state)."""
    args = R.megatron_args(style, **over)
    model = R.build_gpt(args)
    ddp, opt = R.optimizer_for(model, args, distributed=distributed)
    R.train_steps(ddp, opt, args)
    R.save_like_megatron_lm(str(tmp / "mlm"), model, args, 10, opt, sharding=sharding, singleton=singleton)
    state = R.adam_state(opt, model) if distributed else None
    return tmp / "mlm", R.logits(model, TOKENS), state


@pytest.mark.parametrize("style,distributed,singleton", [("llama", True, False), ("gpt2", False, False),
                                                         ("llama", True, True)])
def test_import_equals_megatron(tmp_path, style, distributed, singleton):
    """(singleton: Megatron-LM's singleton_local_shards layout: per-layer keys, SwiGLU's halves apart)"""
    save, want, moments = _megatron_run(tmp_path, style, distributed, singleton=singleton)
    if singleton:
        from msg_megatron.checkpoint.megatron_lm import MegatronCheckpoint

        keys = MegatronCheckpoint(str(save)).index
        assert "decoder.layers.1.mlp.linear_fc1.weight_w" in keys and "decoder.layers.mlp.linear_fc1.weight" not in keys
    r = run_cli(["msg_megatron.import_megatron", "--load", str(save), "--save", str(tmp_path / "ours"), "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["optimizer"] and out["step"] == 10 and out["iteration"] == 10
    got, meta = _ours(tmp_path / "ours")
    assert (got - want).abs().max() <= 1e-5
    assert meta["config"]["model"]["activation"] == ("swiglu" if style == "llama" else "gelu_erf")
    if moments is None:
        return
    from msg_megatron.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(str(tmp_path / "ours"))
    steps = reader.load(["layers.1.mlp.linear_fc1.weight"], "step")
    assert float(steps["layers.1.mlp.linear_fc1.weight"][0]) == 2.0  # AdamW's step, not the iteration
    layer = reader.layer(1, "exp_avg_sq")
    assert torch.equal(layer["mlp.linear_fc1.weight"], moments["decoder.layers.1.mlp.linear_fc1.weight"][1])
    emb = reader.load(["embedding.weight"], "exp_avg")["embedding.weight"]
    assert torch.equal(emb, moments["embedding.word_embeddings.weight"][0])


def test_import_of_a_tp2_pp2_checkpoint_on_four_ranks(tmp_path):
    """megatron writes at TP=2 x PP=2 (4 ranks); four ranks import it at TP=2 x PP=2, each filling
    its shard; the reference is megatron's own GPTModel at TP=1 loading the same checkpoint (its reshard)."""
    pooled(4, R.save_on_ranks, str(tmp_path / "mlm"), "llama", 2, 2, layout=(2, 2))
    r = launch(4, ["msg_megatron.import_megatron", "--load", str(tmp_path / "mlm"), "--save",
                   str(tmp_path / "ours"), "--tensor", "2", "--pipeline", "2", "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["optimizer"] and out["step"] == 0 and out["layout"] == {"tensor": 2, "pipeline": 2}
    want, _, _ = R.loaded_logits(str(tmp_path / "mlm"), TOKENS)
    got, meta = _ours(tmp_path / "ours")
    assert (meta["config"]["parallel"]["tensor"], meta["config"]["parallel"]["pipeline"]) == (2, 2)
    assert (got - want).abs().max() <= 1e-5


def test_grown_model_exports_to_megatron(tmp_path, tiny_data):
    """Heads and FFN grown under TP=2 (each rank appends its new units: the saved unit ids are not in
    order) and trained past the ramp (test_parallel_resume's run, trained once per session; every
    dimension grows in test_round_trip_through_growth); exported for TP=2, megatron loads it at TP=1
    with its distributed optimizer and at TP=2 (two ranks): logits within 1e-5 of ours, moments equal."""
    from msg_megatron.checkpoint.reader import CheckpointReader

    run = trained((2, 1), LLAMA + ["train.eval_iters=2"], [[32, 64, 2, 2], [32, 128, 4, 2]], save_at=8)
    r = run_cli(["msg_megatron.export_megatron", "--load", str(run / "ck"), "--out", str(tmp_path / "mlm"),
                 "--tensor", "2", "--json"])
    assert r.returncode == 0, _quiet(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["optimizer"] and out["iteration"] == 8 and "--tensor-model-parallel-size 2" in out["megatron_flags"]
    tokens = TOKENS % 500
    ours, _ = _ours(run / "ck", tokens)
    got, moments, _ = R.loaded_logits(str(tmp_path / "mlm"), tokens, optimizer=True)
    assert (got - ours).abs().max() <= 1e-5
    reader = CheckpointReader(str(run / "ck"))
    for i in range(2):
        mine = reader.layer(i, "exp_avg")
        for name in ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
            assert torch.equal(moments[f"decoder.layers.{i}.{name}"][0], mine[name]), (i, name)
    two = pooled(2, R.tp_loaded_logits, str(tmp_path / "mlm"), tokens, layout=(2, 1))
    assert (two[0] - ours).abs().max() <= 1e-5


def test_round_trip_through_growth(tmp_path, tiny_data):
    """checkpoint.init_from=<Megatron-LM dir> starts a run from its weights; Megatron-LM ->
    msg-import-megatron -> msg-grow (validation loss unchanged) -> train past the
    ramp -> msg-export-megatron -> megatron's GPTModel: equal logits; the untouched run's moments
    come back unchanged when exported without growing."""
    save, want, moments = _megatron_run(tmp_path, "llama")
    data = ["data.corpus=synthetic", "train.eval_iters=1", "growth.ramp_steps=2"]  # (the sections args do not set)
    r = run_cli(["msg_megatron.import_megatron", "--load", str(save), "--save", str(tmp_path / "a"), *data])
    assert r.returncode == 0, _quiet(r.stderr)
    # checkpoint.init_from takes the Megatron-LM directory itself (lr 1e-12: Adam's steps ~ lr, the model stays)
    from msg_megatron.checkpoint.dist import read_meta
    from msg_megatron.config import config_from_dict
    from msg_megatron.config.loading import apply_overrides
    from msg_megatron.training.trainer import Trainer

    cfg = apply_overrides(read_meta(str(tmp_path / "a"))["config"], [
        f"checkpoint.init_from={save}", f"checkpoint.save={tmp_path}/i", f"logging.run_dir={tmp_path}/irun",
        "train.steps=1", "train.lr=1e-12", "train.min_lr=0", "train.eval_interval=0", "logging.wandb=disabled"])
    assert Trainer(config_from_dict(cfg)).run()["step"] == 1
    assert (_ours(tmp_path / "i")[0] - want).abs().max() <= 1e-5
    # straight back: Megatron-LM -> here -> Megatron-LM is exact (weights and moments)
    r = run_cli(["msg_megatron.export_megatron", "--load", str(tmp_path / "a"), "--out", str(tmp_path / "back")])
    assert r.returncode == 0, _quiet(r.stderr)
    back, state, _ = R.loaded_logits(str(tmp_path / "back"), TOKENS, optimizer=True)
    assert torch.equal(back, want)
    assert all(torch.equal(state[k][j], moments[k][j]) for k in moments for j in (0, 1))
    # grow every dimension: the validation loss before and after agree
    more = off_schedule(tmp_path / "a", "96,160,6,6")
    r = run_cli(["msg_megatron.grow", "--load", str(tmp_path / "a"), "--shape", "96,160,6,6", "--save",
                 str(tmp_path / "g"), "--json", *more])
    assert r.returncode == 0, _quiet(r.stderr)
    assert json.loads(r.stdout.strip().splitlines()[-1])["rel_diff"] <= 1e-5
    # mid-ramp: refused, naming the step it can be exported at; nothing written
    r = run_cli(["msg_megatron.export_megatron", "--load", str(tmp_path / "g"), "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and "mid-ramp" in r.stderr and "to step 13" in r.stderr, r.stderr[-800:]
    assert not os.path.exists(tmp_path / "x")
    # train through the ramp here, export, and megatron's GPTModel gives our logits
    cfg = apply_overrides(read_meta(str(tmp_path / "g"))["config"], [
        f"checkpoint.load={tmp_path}/g", f"checkpoint.save={tmp_path}/b", f"logging.run_dir={tmp_path}/run",
        "train.steps=13", "train.eval_interval=0", "logging.wandb=disabled"])
    assert Trainer(config_from_dict(cfg)).run()["step"] == 13
    r = run_cli(["msg_megatron.export_megatron", "--load", str(tmp_path / "b"), "--out", str(tmp_path / "c")])
    assert r.returncode == 0, _quiet(r.stderr)
    ours, _ = _ours(tmp_path / "b")
    got, _, _ = R.loaded_logits(str(tmp_path / "c"), TOKENS)
    assert (got - ours).abs().max() <= 1e-5


def _weights_checkpoint(path, layers: int) -> None:
    """A step-0 checkpoint (weights only) of a GPT of `layers` layers of ~3.1M parameters (12 MB) each."""
    from msg_megatron.checkpoint.dist import save_checkpoint
    from msg_megatron.config import load_config
    from msg_megatron.model import build_model

    cfg = load_config(None, ["model.hidden_size=512", "model.ffn_hidden_size=2048", "model.num_attention_heads=8",
                             f"model.num_layers={layers}", "model.vocab_size=512", "model.seq_length=32",
                             "growth.stages=[]"])
    model = build_model(cfg.model, cfg.model.shape, seed=1)
    save_checkpoint(str(path), model, None, {"step": 0, "stage": 0, "consumed_samples": 0}, cfg.to_dict())


def _export_peaks_mb(*jobs) -> list:
    """msg-export-megatron of each (checkpoint, out) in fresh processes, side by side: each one's peak
    resident memory above what it held once its modules were imported (MB; the kernel's high-water
    mark, reset after the imports)."""
    import subprocess
    import sys

    code = ("import re, sys, torch, megatron.core.dist_checkpointing; from msg_megatron.export_megatron import main\n"
            "kib = lambda k: int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "open('/proc/self/clear_refs', 'w').write('5'); base = kib('VmRSS')\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('PEAK', kib('VmHWM') - base)")
    procs = [subprocess.Popen([sys.executable, "-c", code, "--load", str(ck), "--out", str(out), "--no-optimizer"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for ck, out in jobs]
    peaks = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, _quiet(err)
        peaks.append(int(out.split("PEAK")[-1]) / 1024)
    return peaks


def test_export_holds_one_layer_at_a_time(tmp_path):
    """Measured bound: exporting 24 layers peaks no higher than exporting 2 of the same width plus a
    quarter of the 22 more layers' bytes (a whole-model export: +22 x 12 MB = +264 MB; seen: +14 MB)."""
    _weights_checkpoint(tmp_path / "deep", 24)
    _weights_checkpoint(tmp_path / "shallow", 2)
    deep, shallow = _export_peaks_mb((tmp_path / "deep", tmp_path / "d"), (tmp_path / "shallow", tmp_path / "s"))
    layer_mb = (512 * 1536 + 512 * 512 + 2 * 512 * 2048 + 4 * 512) * 4 / 2**20
    assert deep - shallow <= 0.25 * 22 * layer_mb, (deep, shallow, layer_mb)
