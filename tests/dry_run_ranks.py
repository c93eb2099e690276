"""A pooled task for tests/test_dry_run.py: the real trainer on CPU/gloo at a config's layout trains
one step (AdamW allocates its moments), grows online to the next stage and trains one more; after
each step every rank reports the bytes of its real tensors and its checkpoint pieces with the dry
run's own counters. Returns (on every rank) [{rank: {...}}, ...] per stage."""


def step_grow_step(args: list) -> list:
    import torch.distributed as dist

    from msg_megatron.config import load_config
    from msg_megatron.dry_run import checkpoint_pieces, memory_of
    from msg_megatron.training.trainer import Trainer

    trainer = Trainer(load_config(args[0], args[1:]), log_enabled=False)
    stages = []
    for stage in (0, 1):
        if stage:
            trainer.grow(1)
        trainer.train_step()
        mine = dict(memory_of(trainer.model, trainer.optimizer),
                    pieces=sorted(checkpoint_pieces(trainer.model, trainer.optimizer)))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        stages.append({str(r): m for r, m in enumerate(everyone)})
    if trainer.lock is not None:
        trainer.lock.release()
    return stages
