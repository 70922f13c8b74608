"""Paged KV blocks: a pool with refcounts, and hash-based prefix caching with LRU reuse of freed blocks.

Counts blocks and hashes only; it never touches tensors. A block's key is SHA-256 over its parent's key and its
tokens (and, for the first block, the request's cache_salt): keys cannot be made to collide as Python's hash()
could, a lookup also compares the block's tokens and parent, and tenants with different salts never share."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from npu_infer.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    parent_hash: bytes | None = None      # what the cached contents were computed after
    token_ids: tuple[int, ...] = ()       # the cached contents' tokens, checked on every hit


def hash_block(parent_hash: bytes | None, token_ids: tuple[int, ...], salt: str | None = None) -> bytes:
    """A full block's identity: its tokens and everything before them (through the parent's key); the salt
    goes into the first block, so it separates whole prefixes."""
    h = hashlib.sha256(parent_hash if parent_hash is not None else b"npu_infer-root")
    h.update(array("q", token_ids).tobytes())
    if parent_hash is None and salt:
        h.update(b"salt:" + salt.encode("utf-8"))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = least recently freed); a cached block keeps its hash here.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block key -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0     # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> int:
        """Attach the longest cached prefix of a new request's prompt; return the tokens it covers.

        At least the last prompt token is always computed, so its logits exist to sample from."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self.prefix_queries += request.num_tokens
        parent = None
        hits: list[int] = []
        hashes: list[bytes] = []
        for i in range(max_blocks):
            tokens = tuple(request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hash = hash_block(parent, tokens, request.cache_salt)
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent_hash != parent:  # never trust a key alone
                break
            hits.append(block_id)
            hashes.append(block_hash)
            parent = block_hash
        for block_id in hits:
            self._take(block_id)
        request.block_ids = hits
        request.block_hashes = hashes
        num_tokens = len(hits) * self.block_size
        self.prefix_hits += num_tokens
        return num_tokens

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request enough blocks for num_new_tokens more computed tokens; False if the pool is short."""
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if needed > self.num_free_blocks:
            return False
        for _ in range(max(needed, 0)):
            block_id = next(iter(self.free_blocks))
            self._evict(block_id)
            self._take(block_id)
            request.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        parent = request.block_hashes[-1] if request.block_hashes else None
        for i in range(len(request.block_hashes), num_full):
            tokens = tuple(request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hash = hash_block(parent, tokens, request.cache_salt)
            request.block_hashes.append(block_hash)
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash, block.parent_hash, block.token_ids = block_hash, parent, tokens
                self.cached[block_hash] = block.block_id
            parent = block_hash

    def free(self, request: Request) -> None:
        """Return the request's blocks; tail blocks first, so they are evicted before shared prefixes."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        request.block_ids = []
        request.block_hashes = []

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.parent_hash, block.token_ids = None, None, ()
