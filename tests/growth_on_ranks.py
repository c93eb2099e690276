"""A pooled task for tests/test_parallel.py: build a tiny model at the current TP layout, grow it,
and return the canonical gathered weights and the losses on a fixed batch before and after (rank 0),
and every rank's own local tensors (for the cross-rank RNG checks)."""
import torch


def grow_and_gather(spec: dict) -> dict:
    """`spec`: {"model": ModelConfig fields, "old": shape, "new": shape, optional "seed", "init",
    "init_std", "depth_init"}; runs inside initialize_parallel at the caller's layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from msg_megatron.config import ModelConfig, Shape
    from msg_megatron.growth.operators import grow_model
    from msg_megatron.model import build_model
    from tp_gather import canonical_state_dict

    mcfg = ModelConfig(**spec["model"])
    old, new = Shape(*spec["old"]), Shape(*spec["new"])
    model = build_model(mcfg, old, seed=spec.get("seed", 7))
    tokens = torch.randint(0, mcfg.vocab_size, (2, mcfg.seq_length + 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(tokens[:, :-1], tokens[:, 1:]).mean().item()
        logits_before = model(tokens[:, :-1])
    sd_before = canonical_state_dict(model)
    grown, _ = grow_model(model, new, step=5, init=spec.get("init", "normal"), init_std=spec.get("init_std", 0.02),
                          depth_init=spec.get("depth_init", "interpolate"), seed=11)
    with torch.no_grad():
        after = grown(tokens[:, :-1], tokens[:, 1:]).mean().item()
        logits_after = grown(tokens[:, :-1])
    sd_after = canonical_state_dict(grown)
    out = {"tp_rank": ps.get_tensor_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
           "local": {k: v for k, v in grown.state_dict().items() if not k.endswith("_extra_state")},
           "sharded": sorted(n for n, p in grown.named_parameters() if getattr(p, "tensor_model_parallel", False))}
    if dist.get_rank() == 0:
        out.update(before=before, after=after, logits_before=logits_before, logits_after=logits_after,
                   sd_before=sd_before, sd_after=sd_after)
    return out
