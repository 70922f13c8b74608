"""Block manager and scheduler on their own: refcounts, prefix hashing, LRU reuse, preemption order."""
from __future__ import annotations

from npu_infer.engine.block_manager import BlockManager, hash_block
from npu_infer.engine.request import Request
from npu_infer.engine.scheduler import Scheduler
from npu_infer.sampling import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def compute_all(bm: BlockManager, r: Request) -> None:
    assert bm.allocate(r, r.num_tokens - r.num_computed_tokens)
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)


def test_shared_prefix_is_found_and_refcounted():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = req("a", list(range(10)))
    compute_all(bm, a)
    b = req("b", list(range(8)) + [99, 98, 97])
    assert bm.find_cached_prefix(b) == 8
    assert b.block_ids == a.block_ids[:2]
    assert [bm.blocks[i].ref_count for i in b.block_ids] == [2, 2]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = req("a", list(range(8)))
    compute_all(bm, a)
    bm.free(a)
    again = req("b", list(range(8)))
    assert bm.find_cached_prefix(again) == 4  # 8 tokens: only the first block, the last token must be computed


def test_freed_cached_blocks_survive_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = req("a", [1, 2, 3, 4, 5])
    compute_all(bm, a)
    bm.free(a)  # blocks keep their hashes while free
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    b = req("b", [1, 2, 3, 4, 6])
    assert bm.find_cached_prefix(b) == 4
    bm.free(b)
    c = req("c", [7, 8, 9, 10, 11, 12, 13, 14])  # needs all 4 blocks: evicts the cached ones
    assert bm.allocate(c, 8)
    assert bm.cached == {} and bm.num_free_blocks == 0
    bm.free(c)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = req("a", [1, 2, 3, 4, 5])
    compute_all(bm, a)
    assert bm.find_cached_prefix(req("b", [1, 2, 3, 4, 5])) == 0


def test_scheduler_budget_chunks_and_caps():
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    s = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    for i in range(3):
        s.add(req(str(i), list(range(7))))
    out = s.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("0", 7), ("1", 3)]  # budget 10, cap 2
    assert len(s.waiting) == 1


def test_scheduler_preempts_newest_and_frees_its_blocks():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = req("a", list(range(8))), req("b", list(range(8)))
    s.add(a), s.add(b)
    out = s.schedule()
    assert len(out.scheduled) == 2 and bm.num_free_blocks == 0
    for r, n in out.scheduled:
        r.num_computed_tokens += n
        r.token_ids.append(1)  # each sampled a token: a needs a third block now
    out = s.schedule()
    assert out.preempted == [b] and [r for r, _ in out.scheduled] == [a]
    assert b.num_computed_tokens == 0 and not b.block_ids and s.waiting[0] is b


def test_finishing_queued_requests_keeps_the_rest_in_order():
    """finish() takes a request out of the waiting queue by id (O(1)), wherever it stands."""
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    s = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    queued = [req(str(i), [1, 2, 3]) for i in range(6)]
    for r in queued:
        s.add(r)
    for i in (0, 3, 5):
        s.finish(queued[i], "abort")
    assert [r.request_id for r in s.waiting] == ["1", "2", "4"]
    assert [r.request_id for r, _ in s.schedule().scheduled] == ["1"]
    s.finish(queued[1], "abort")  # a running one
    assert not s.running and [r.request_id for r in s.waiting] == ["2", "4"] and bm.num_free_blocks == 64


def test_prefix_cache_keys_are_sha256_and_salted():
    first = hash_block(None, (1, 2, 3, 4))
    assert isinstance(first, bytes) and len(first) == 32
    assert hash_block(None, (1, 2, 3, 4), "tenant-a") not in (first, hash_block(None, (1, 2, 3, 4), "tenant-b"))
    assert hash_block(first, (5, 6, 7, 8)) != hash_block(None, (5, 6, 7, 8))


def test_requests_with_different_salts_never_share_blocks():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = req("a", list(range(9)))
    a.cache_salt = "tenant-a"
    compute_all(bm, a)
    bm.free(a)
    for salt, expected in (("tenant-b", 0), (None, 0), ("tenant-a", 8)):
        r = req("r", list(range(9)))
        r.cache_salt = salt
        assert bm.find_cached_prefix(r) == expected, salt
        bm.free(r)


def test_a_lookup_checks_the_blocks_tokens_not_only_the_key():
    """Even if two prefixes' keys collided, a hit needs the block's own tokens and parent."""
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = req("a", list(range(9)))
    compute_all(bm, a)
    bm.free(a)
    forged = hash_block(None, (9, 9, 9, 9))
    bm.cached[forged] = bm.cached[hash_block(None, (0, 1, 2, 3))]  # a collision, planted
    assert bm.find_cached_prefix(req("b", [9, 9, 9, 9, 9])) == 0
