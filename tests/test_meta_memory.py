"""meta_memory.PeakMetaBytes against hand-counted bytes: new storages, views (no bytes), aliases
held only by a Parameter, storages freed by `resize_(0)` or by dropping the last reference."""
import torch

from msg_megatron.meta_memory import PeakMetaBytes


def test_peak_counts_storages_not_views_and_sees_frees():
    keep = torch.empty(1000, device="meta")  # 4000 B before the block
    with PeakMetaBytes() as m:
        a = torch.empty(250, device="meta")  # +1000
        v = a[10:20].view(2, 5)  # a view: no bytes
        p = torch.nn.Parameter(torch.empty(500, device="meta"))  # +2000, held only through the Parameter
        keep.untyped_storage().resize_(0)  # -4000 (how megatron frees a buffer)
        b = torch.empty(100, device="meta")  # +400: live 1000 + 2000 + 400 = 3400
        del a, v, b
        c = torch.empty(2000, device="meta")  # +8000 with a, b freed: live 2000 + 8000 = 10000
        del c
    assert m.start >= 4000
    base = m.start - 4000  # (other meta tensors alive in the test process)
    assert m.peak - base == max(4000 + 1000 + 2000, 10000), (m.start, m.peak)
    assert m.end - base == 2000 and p.numel() == 500


def test_a_storage_freed_and_its_address_reused_is_counted_again():
    with PeakMetaBytes() as m:
        for _ in range(50):  # each new one exists before the name lets go of the last: two, never 50
            t = torch.empty(256, device="meta")
        del t
    assert m.peak - m.start == 2 * 1024 and m.end == m.start
