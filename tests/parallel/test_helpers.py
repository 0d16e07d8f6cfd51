"""The DiT helpers of difforge.parallel cost nothing outside a parallel call: they return their inputs."""

from __future__ import annotations

import torch

from difforge import parallel


def test_helpers_are_no_ops_in_one_process() -> None:
    a, b = torch.randn(1, 5, 4), torch.randn(1, 3, 4)
    assert parallel.current() is None and not parallel.sharding()
    out = parallel.shard_tokens(a, b)
    assert out[0] is a and out[1] is b
    assert parallel.shard(a, 1) is a
    assert parallel.shard_parts(a, (2, 3), dim=1) is a
    assert parallel.gather_tokens(a, 5) is a
    assert parallel.all_reduce_sum(a) is a
    with parallel.keys_replicated():
        assert not parallel.sharding()

    calls = []

    @parallel.sequence_parallel
    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(parallel.sharding())
        return x

    assert forward(a) is a and calls == [False]
    assert forward._difforge_sequence_parallel  # type: ignore[attr-defined]
