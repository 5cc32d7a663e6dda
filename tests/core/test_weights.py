"""Weight streaming: bucketed export packs the same tensors, in the same order, under the size cap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bridgecore.weights import ALIGN, WeightBucket, buckets


def _pairs() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(24, 40, generator=g)
    return [
        ("a.bf16", torch.randn(7, 5, generator=g).to(torch.bfloat16)),
        ("b.fp32", torch.randn(33, generator=g)),
        ("c.transposed", wide.t()),  # not contiguous
        ("d.empty", torch.empty(0, 4, dtype=torch.float16)),
        ("e.int64", torch.arange(9, dtype=torch.int64).view(3, 3)),
        ("f.big", torch.randn(300, 10, generator=g)),  # 12000 bytes: more than the cap below
        ("g.bool", torch.tensor([True, False, True])),
        ("h.scalar", torch.tensor(3.5, dtype=torch.float64)),
    ]


def _split_back(bucketed: list[WeightBucket]) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor.clone()) for bucket in bucketed for name, tensor in bucket.tensors()]


@pytest.mark.parametrize("cap", [64, 1000, 4096, 1 << 20])
def test_buckets_split_back_exactly_and_respect_the_cap(cap: int) -> None:
    pairs = _pairs()
    bucketed = list(buckets(iter(pairs), cap))
    back = _split_back(bucketed)
    assert [n for n, _ in back] == [n for n, _ in pairs]
    for (name, got), (_, want) in zip(back, pairs, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
    for bucket in bucketed:
        assert bucket.buffer.dtype == torch.uint8 and bucket.buffer.dim() == 1
        assert bucket.buffer.numel() == bucket.nbytes
        assert all(e.offset % ALIGN == 0 for e in bucket.entries)
        # over the cap only as a lone tensor larger than the cap
        assert bucket.nbytes <= cap or len(bucket.entries) == 1
    if cap == 1 << 20:
        assert len(bucketed) == 1
    # each bucket is full: the next bucket's first tensor would not have fitted
    for this, following in zip(bucketed, bucketed[1:], strict=False):
        first = following.entries[0]
        assert -(-this.nbytes // ALIGN) * ALIGN + first.nbytes > cap


def test_callers_buffer_holds_each_bucket_until_the_next() -> None:
    pairs = _pairs()
    buffer = torch.zeros(1000, dtype=torch.uint8)
    seen, inside = [], []
    for bucket in buckets(iter(pairs), 1000, buffer=buffer):
        inside.append(bucket.buffer.data_ptr() == buffer.data_ptr())
        seen += [(name, tensor.clone()) for name, tensor in bucket.tensors()]
    # every bucket in the caller's buffer but the two lone tensors larger than it
    assert inside == [True, False, True, False, True]
    for (name, got), (_, want) in zip(seen, pairs, strict=True):
        assert torch.equal(got, want), name


def test_bucket_size_and_buffer_are_checked() -> None:
    with pytest.raises(ValueError, match="bucket_size"):
        list(buckets(iter(_pairs()), 0))
    with pytest.raises(ValueError, match="buffer must be"):
        list(buckets(iter(_pairs()), 1000, buffer=torch.zeros(999, dtype=torch.uint8)))


def test_export_hf_weights_bucketed_equals_unbucketed(llama_dir: Path) -> None:
    import bridgecore_llama_example
    from bridgecore import AutoBridge, export_hf_weights
    from bridgecore.megatron import parallel
    from bridgecore.plugins import Plugins

    plugins = Plugins(load_entry_points=False)
    plugins.register(bridgecore_llama_example, name="llama_example")
    bridge = AutoBridge.from_hf_pretrained(llama_dir, plugins=plugins)
    try:
        model = bridge.to_megatron_model()
        plain = [(name, tensor.clone()) for name, tensor in export_hf_weights(bridge, model)]
        cap = 40_000
        bucketed = list(export_hf_weights(bridge, model, bucket_size=cap, device="cpu"))
        assert len(bucketed) > 1 and all(isinstance(b, WeightBucket) for b in bucketed)
        assert all(b.nbytes <= cap or len(b.entries) == 1 for b in bucketed)
        back = _split_back(bucketed)
        assert [n for n, _ in back] == [n for n, _ in plain]
        for (name, got), (_, want) in zip(back, plain, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want), name
        on_cpu = list(export_hf_weights(bridge, model, device="cpu"))
        assert [n for n, _ in on_cpu] == [n for n, _ in plain]
        assert all(t.device.type == "cpu" and torch.equal(t, w) for (_, t), (_, w) in zip(on_cpu, plain, strict=True))
    finally:
        parallel.leave()  # the model's one-process group, which later tests in this process must not find
