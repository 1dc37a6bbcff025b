"""The pipelines' caches (text embeddings, inversions) on plain values."""

from sega.caching import LRUCache


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
