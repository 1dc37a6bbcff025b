"""The re-edit cache's building blocks on plain values."""

import torch

from sega.reedit import LRUCache, clone_generator


def test_lru_cache_keeps_the_most_recently_used_entries():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"] and len(cache) == 2 and cache.get("b") is None
    off = LRUCache(0)
    off.put("a", 1)
    assert len(off) == 0 and off.get("a") is None


def test_a_cloned_generator_continues_the_same_stream_independently():
    g = torch.Generator().manual_seed(3)
    torch.randn(2, generator=g)
    clone = clone_generator(g)
    assert torch.equal(torch.randn(4, generator=clone), torch.randn(4, generator=g))
    assert clone_generator(None) is None
