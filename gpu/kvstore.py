"""Where a session's history KV lives between turns: HBM, host DRAM (pinned) or files on local disk.

CachedAttention §3.1 keeps every session's KV in a hierarchy (HBM, DRAM, SSD); between turns a
session's KV sits in one tier and is moved to HBM layer by layer when its next turn runs. These stores
hold the bytes; `gpu.executor` decides when they move.

Each store keeps a session's KV in the model's per-layer layout `[layers, capacity, 2, kv_heads,
head_dim]`, so the history of one layer, tokens [0, h), is one contiguous range: one copy per layer.
"""
from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

ALIGN = 4096  # O_DIRECT needs buffer address, file offset and length aligned to the logical block size


# data_ptr of each page-locked range -> the finalizer that unregisters it (run once: by `unpin`, or when the
# memory's owner is collected)
_PINNED: dict[int, weakref.finalize] = {}


def pin(t: torch.Tensor, owner) -> bool:
    """Page-lock an existing host tensor in place (cudaHostRegister).

    torch's pinned allocator rounds every allocation up to a power of two, which would double the host
    memory of a large arena; registering plain memory pins exactly what is used. Returns False on CPU-only
    builds, where "pinned" has no meaning and copies are synchronous anyway.

    `owner` is the object whose collection frees the memory (the mmap under `t`): if `unpin` was not called
    by then, the registration is undone then. A range unmapped while registered stays registered in the
    driver, and the next mmap that reuses the address fails to register (an executor created after another
    was dropped without closing, as in a test session). The owner, not `t`, decides: views of `t` keep the
    memory alive after `t`'s own Python object is gone.
    """
    if not torch.cuda.is_available():
        return False
    ptr = t.data_ptr()
    rc = torch.cuda.cudart().cudaHostRegister(ptr, t.numel() * t.element_size(), 0)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister of {t.numel() * t.element_size()} bytes failed: {rc}")
    _PINNED[ptr] = weakref.finalize(owner, _unregister, ptr)
    return True


def _unregister(ptr: int) -> None:
    _PINNED.pop(ptr, None)
    # copies in flight may still read the range: let them finish before it stops being page-locked
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(ptr)


def unpin(t: torch.Tensor) -> None:
    """Undo `pin` for the memory under `t` (the tensor pinned or any view of it) before it is unmapped
    (unmapping registered memory is undefined); a second call, or a call on unpinned memory, does nothing."""
    done = _PINNED.get(t.untyped_storage().data_ptr())
    if done is not None:
        done()   # a weakref.finalize runs its function once, whether called here or at collection


def aligned_host_bytes(nbytes: int, pinned: bool) -> torch.Tensor:
    """A uint8 host tensor of `nbytes` whose first byte is ALIGN-aligned (an mmap is page aligned).

    torch.frombuffer holds the mapping for as long as any view of the tensor lives."""
    nbytes = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
    buf = mmap.mmap(-1, nbytes)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    if pinned:
        pin(t, owner=buf)
    return t


def layer_view(raw: torch.Tensor, layers: int, capacity: int, kv_shape: tuple[int, int], dtype) -> torch.Tensor:
    """View raw bytes as [layers, capacity, 2, kv_heads, head_dim] of `dtype`."""
    heads, dim = kv_shape
    n = layers * capacity * 2 * heads * dim
    return raw[: n * torch.empty((), dtype=dtype).element_size()].view(dtype).view(layers, capacity, 2, heads, dim)


class HostArena:
    """Host-DRAM tier: one pinned arena, carved into per-session stores.

    Pinning happens once, before serving starts: page-locking is slow (and on some VMs host memory is
    only committed as it is touched), so doing it per turn would put it into measured TTFTs.
    """

    def __init__(self, total_bytes: int, pinned: bool):
        self.raw = aligned_host_bytes(total_bytes, pinned)
        self.used = 0

    def release(self) -> None:
        unpin(self.raw)

    def reserve(self, layers: int, capacity: int, kv_shape, dtype) -> torch.Tensor:
        heads, dim = kv_shape
        nbytes = layers * capacity * 2 * heads * dim * torch.empty((), dtype=dtype).element_size()
        nbytes = -(-nbytes // ALIGN) * ALIGN
        if self.used + nbytes > self.raw.numel():
            raise MemoryError(f"host arena full: {self.used} + {nbytes} > {self.raw.numel()} bytes")
        view = layer_view(self.raw[self.used:self.used + nbytes], layers, capacity, kv_shape, dtype)
        self.used += nbytes
        return view


@dataclass
class DiskFile:
    """One session's KV in one file: layer l's tokens start at l * layer_stride_bytes."""
    path: Path
    fd: int
    layer_stride_bytes: int
    token_bytes: int
    direct: bool


class DiskStore:
    """SSD tier: a file per session under `root`.

    Reads must be cold (the disk, not the page cache): with O_DIRECT when every offset and length is
    block aligned (true for LLaMA-2 7B/13B: 16 KiB and 20 KiB per token per layer), otherwise buffered
    I/O followed by fsync + posix_fadvise(DONTNEED) after each write so the next read misses the cache.
    """

    def __init__(self, root, layers: int, token_bytes: int, use_direct: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.layers = layers
        self.token_bytes = token_bytes
        self.direct = bool(use_direct and hasattr(os, "O_DIRECT") and token_bytes % ALIGN == 0)
        self.files: dict[str, DiskFile] = {}

    def create(self, sid: str, capacity: int) -> DiskFile:
        stride = -(-capacity * self.token_bytes // ALIGN) * ALIGN
        path = self.root / f"{abs(hash(sid)) & 0xFFFFFFFF:08x}_{len(self.files)}.kv"
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0)
        fd = os.open(path, flags, 0o600)
        os.ftruncate(fd, stride * self.layers)
        f = DiskFile(path, fd, stride, self.token_bytes, self.direct)
        self.files[sid] = f
        return f

    def write_layer(self, f: DiskFile, layer: int, first_token: int, buf: torch.Tensor) -> None:
        """Write `buf` (host, contiguous, whole tokens) at token `first_token` of `layer`."""
        full_io(os.pwritev, f.fd, buf, f.layer_stride_bytes * layer + first_token * f.token_bytes)

    def finish_writes(self, f: DiskFile) -> None:
        if not f.direct:
            os.fsync(f.fd)
            os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_layer(self, f: DiskFile, layer: int, tokens: int, buf: torch.Tensor, first_token: int = 0) -> None:
        """Read tokens [first_token, first_token + tokens) of `layer` into `buf` (host, contiguous, >= tokens *
        token_bytes)."""
        full_io(os.preadv, f.fd, buf, f.layer_stride_bytes * layer + first_token * f.token_bytes,
                nbytes=tokens * f.token_bytes)

    def close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
            f.path.unlink(missing_ok=True)
        self.files.clear()


def full_io(op, fd: int, buf: torch.Tensor, offset: int, nbytes: int | None = None) -> None:
    """pread/pwrite until all bytes moved (one syscall moves at most ~2 GiB)."""
    mv = memoryview(buf.reshape(-1).view(torch.uint8).numpy()).cast("B")
    if nbytes is not None:
        mv = mv[:nbytes]
    done = 0
    while done < len(mv):
        step = mv[done:done + (1 << 30)]
        got = op(fd, [step], offset + done)
        if got <= 0:
            raise OSError(f"{op.__name__} moved {got} bytes at offset {offset + done}")
        done += got
