"""Run under torchrun by tests/test_dry_run.py: the real trainer on CPU/gloo at a config's layout
trains one step (AdamW allocates its moments), grows online to the next stage and trains one more;
after each step every rank reports the bytes of its real tensors and its checkpoint pieces with the
dry run's own counters, and rank 0 prints them as one JSON line: [{rank: {...}}, ...] per stage.

    torchrun --nproc_per_node N tests/dry_run_worker.py CONFIG [overrides...]
"""
import json
import sys

import torch.distributed as dist


def main():
    from msg_megatron.config import load_config
    from msg_megatron.dry_run import checkpoint_pieces, memory_of
    from msg_megatron.training.trainer import Trainer

    trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]), log_enabled=False)
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
    if dist.get_rank() == 0:
        print(json.dumps(stages))


if __name__ == "__main__":
    main()
