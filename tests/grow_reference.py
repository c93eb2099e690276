"""The whole-model offline growth msg-grow did before it streamed, as the reference its streamed
result must equal tensor for tensor: load the whole model and optimizer at the target layout, grow
both in process (grow_model + grow_optimizer, as Trainer.grow), save. Runs on every rank of a layout
(tests/test_stream_grow.py: in the test's process for one rank, on the gloo pool for more)."""


def grow_whole_model(ckpt: str, shape_text: str, out: str, tp: int, pp: int, depth_init: str,
                     overrides: tuple = ()) -> None:
    from msg_megatron.checkpoint.dist import load_checkpoint, read_meta, save_checkpoint
    from msg_megatron.config import Shape, config_from_dict
    from msg_megatron.grow import parse_shape
    from msg_megatron.growth.axes import GrowthPlan
    from msg_megatron.growth.off_schedule import grown_config
    from msg_megatron.growth.operators import grow_model, growth_seed
    from msg_megatron.growth.optimizer_state import grow_optimizer
    from msg_megatron.model import build_model
    from msg_megatron.optim.optimizer import build_optimizer
    from msg_megatron.parallel import initialize_parallel

    meta = read_meta(ckpt)
    cfg = config_from_dict(meta["config"])
    shape = parse_shape(shape_text)
    initialize_parallel(tp, pp, cfg.train.seed)
    old = Shape(*meta["shape"])
    model = build_model(cfg.model, old, perform_init=False)
    optimizer = build_optimizer(model, cfg.train, cfg.parallel)
    load_checkpoint(meta["path"], model, optimizer)
    optimizer.release_for_growth()
    plan = GrowthPlan(model, shape)
    g = cfg.growth
    new_model, name_map = grow_model(model, shape, step=meta["state"]["step"], plan=plan, init=g.init,
                                     init_std=g.init_std, depth_init=depth_init, operator=g.operator,
                                     seed=growth_seed(cfg.train.seed, meta["state"]["stage"] + 1))
    new_opt = grow_optimizer(optimizer, model, new_model, name_map, plan, cfg.train, cfg.parallel)
    state = dict(meta["state"], stage=meta["state"]["stage"] + 1)
    # (the config msg-grow records: its schedule, at this layout)
    v = cfg.parallel.virtual_pipeline if pp > 1 and shape.layers % (pp * cfg.parallel.virtual_pipeline) == 0 else 1
    saved_cfg = grown_config(meta["config"], meta["state"]["stage"], meta["state"]["step"], shape, list(overrides),
                             dict(tensor=tp, pipeline=pp, virtual_pipeline=v))
    save_checkpoint(out, new_model, new_opt, state, saved_cfg)
