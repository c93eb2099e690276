"""The optimizer: megatron-core's (distributed) optimizer around the model, AdamW moments, clipping.

Below checkpoint/ and growth/ in the layer order (docs/design.md): both read the optimizer's state.
"""
