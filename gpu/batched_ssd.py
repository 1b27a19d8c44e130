"""The SSD tier of the batched executor (`gpu.batched`): sessions' KV in files, DRAM bypassed.

What the simulator charges for it (`sim.engine.ChunkedReplica` under `policy.kind: attentionstore` with
`host.dram_bytes: 0`, so every saved history lives on the SSD, and `policy.scheduler_aware_fetch: false`,
so nothing is staged into DRAM ahead of a turn; `gpu.batched_validate.SIM_OVERRIDES["ssd"]`):

* a finished turn's new KV is written to the SSD after the step, one write request per layer, queued
  behind the writes before it (the `ssd_write` link; `sim.kvstore.KVStore.save_to_host`);
* an admitted request's history beyond its HBM prefix hit is read back during the admitting step,
  SSD -> DRAM -> HBM layer by layer, one read request per layer, the slower stage pacing each layer
  (`CostModel.history_load_layer_s`), inside the layer-wise preload pipeline with a read buffer of N
  layers (CachedAttention §3.2) or every layer before the compute (load first); the step waits for
  the reads already queued on the disk, and reads slow down while writes are in flight
  (`sim.tiers.SharedDeviceLink`, the profile's `ssd.contention`).

The executor does the same: a writer thread drains a FIFO of saves (each layer's new blocks copied from
HBM into a pinned bounce buffer on its own stream, then one `pwrite` per layer: the profile's write
pattern), and per step with SSD hits a reader thread reads each layer's blocks of every loading request
(one `pread` per request and layer, one request in flight: the profile's read table was measured so,
and run 22 found more in flight gains at most 1.36x on the lent machines' disk) into slot `layer % N` of
a pinned staging buffer, from which the load stream copies them into the requests' blocks, gated per
layer as the DRAM tier's loads are. A slot is read into again only once its previous layer's copy has
ended. A session's file is read only after its last write has landed.

Files: one per session (`gpu.kvstore.DiskStore`, O_DIRECT where every offset and length is 4 KiB
aligned, as with 16-token blocks of LLaMA-shaped models in bf16; buffered I/O with the page cache
dropped after each write otherwise). Layer l's blocks start at l x stride; block j of a layer holds its
K then its V (`[2, block_tokens, kv_heads, head_dim]`), so a layer's blocks [j0, j0 + n) are one range.
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from gpu.kvstore import DiskStore, aligned_host_bytes, unpin


class SsdTier:
    """Session files, the writer thread and the pinned staging buffers of one executor's SSD tier."""

    def __init__(self, root, layers: int, block_tokens: int, kv_heads: int, head_dim: int, dtype, device,
                 read_buffer_layers: int, poison: bool = False, staging_blocks: int = 64):
        self.L, self.bt, self.N = layers, block_tokens, read_buffer_layers
        self.block_shape = (2, block_tokens, kv_heads, head_dim)   # one layer of one block: K then V
        self.dtype, self.dev = dtype, torch.device(device)
        self.cuda = self.dev.type == "cuda"
        self.block_bytes = 2 * block_tokens * kv_heads * head_dim * dtype.itemsize
        self.disk = DiskStore(root, layers, self.block_bytes // block_tokens)
        self.poison = poison
        self.files: dict = {}      # session -> DiskFile
        self.cap: dict = {}        # session -> capacity in blocks
        self.saved: dict = {}      # session -> whole blocks whose write is issued
        self.written: dict = {}    # session -> threading.Event set once its last write is on disk
        # pinned staging: N read slots of `rblocks` blocks, two write bounce slots of `wblocks` blocks,
        # grown (never shrunk) when a load or a save needs more; old buffers are kept until close()
        # (unpinning synchronises the device)
        self._old: list = []
        self.rblocks = self.wblocks = 0
        self.rbuf = self.wbuf = None
        self._grow_read(staging_blocks)
        self._grow_write(staging_blocks)
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.write_stream = torch.cuda.Stream(self.dev) if self.cuda else None
        self.load = None           # the step's SsdLoad, joined by take_io
        self.io = _io()
        self.write_busy_ms = 0.0   # the writer's time per save, summed (its own thread's clock)
        self.writer = threading.Thread(target=self._write_loop, daemon=True)
        self.writer.start()

    @property
    def direct(self) -> bool:
        return self.disk.direct

    # ---- staging ---------------------------------------------------------------------------------
    def _buf(self, slots: int, blocks: int) -> torch.Tensor:
        raw = aligned_host_bytes(slots * blocks * self.block_bytes, self.cuda)
        return raw[:slots * blocks * self.block_bytes].view(self.dtype).view((slots, blocks) + self.block_shape)

    def _grow_read(self, blocks: int) -> None:
        if blocks > self.rblocks:
            if self.rbuf is not None:
                self._old.append(self.rbuf)
            self.rblocks = max(blocks, 2 * self.rblocks)
            self.rbuf = self._buf(self.N, self.rblocks)

    def _grow_write(self, blocks: int) -> None:
        if blocks > self.wblocks:
            if self.wbuf is not None:
                self._old.append(self.wbuf)
            self.wblocks = max(blocks, 2 * self.wblocks)
            self.wbuf = self._buf(2, self.wblocks)

    # ---- sessions --------------------------------------------------------------------------------
    def open_session(self, session, capacity_tokens: int) -> None:
        nb = -(-capacity_tokens // self.bt)
        self.files[session] = self.disk.create(str(session), nb * self.bt)
        self.cap[session] = nb
        self.saved[session] = 0
        done = threading.Event()
        done.set()
        self.written[session] = done

    def external_tokens(self, session, hit_tokens: int) -> int:
        """Tokens of the session's history on the SSD beyond its HBM hit (whole blocks)."""
        if session not in self.saved:
            return 0
        return max(self.saved[session] * self.bt - hit_tokens, 0)

    def save(self, session, kv_blocks, first_block: int, ready=None) -> int:
        """Queue the write of `kv_blocks` (`[layers, n, 2, block_tokens, kv_heads, head_dim]` on the
        executor's device, gathered on its main stream before the blocks could be reused; `ready`: a CUDA
        event after the gather) as the session's blocks [first_block, first_block + n). Returns tokens."""
        self._raise()
        n = int(kv_blocks.shape[1])
        if first_block + n > self.cap[session]:
            raise ValueError(f"session {session!r}: blocks up to {first_block + n} saved, file holds {self.cap[session]}")
        done = threading.Event()
        self.jobs.put((self.files[session], first_block, kv_blocks, ready, done))
        self.written[session] = done
        self.saved[session] = first_block + n
        self.io["ssd_write_bytes"] += n * self.L * self.block_bytes
        self.io["ssd_write_tokens"] += n * self.bt
        return n * self.bt

    def _write_loop(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.dev)   # this thread's events and copies on the executor's GPU
        while True:
            job = self.jobs.get()
            if job is None:
                self.jobs.task_done()
                return
            f, j0, kv, ready, done = job
            try:
                if self.error is None:
                    self._write(f, j0, kv, ready)
            except BaseException as exc:  # noqa: BLE001 - surfaced by the next save, load or drain
                self.error = exc
            finally:
                done.set()
                self.jobs.task_done()

    def _write(self, f, j0: int, kv: torch.Tensor, ready) -> None:
        n = int(kv.shape[1])
        self._grow_write(n)
        buf = self.wbuf
        stream = self.write_stream

        def d2h(li):
            dst = buf[li % 2, :n]
            if stream is None:
                dst.copy_(kv[li])
                return None
            with torch.cuda.stream(stream):
                dst.copy_(kv[li], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            return ev
        if stream is not None and ready is not None:
            stream.wait_event(ready)
        t0 = time.perf_counter()
        ev = d2h(0)
        for li in range(self.L):
            # the next layer's copy out of HBM overlaps this layer's write (the other bounce slot,
            # whose write has returned)
            nxt = d2h(li + 1) if li + 1 < self.L else None
            if ev is not None:
                ev.synchronize()
            self.disk.write_layer(f, li, j0 * self.bt, buf[li % 2, :n])
            ev = nxt
        self.disk.finish_writes(f)
        self.write_busy_ms += (time.perf_counter() - t0) * 1e3

    # ---- a step's loads ----------------------------------------------------------------------------
    def start_load(self, srcs, idx, k, v, ev_load, ev_comp, load_stream, layerwise: bool, main=None):
        """Begin reading `srcs` [(session, first block, blocks)] for one step; returns `issue(li)`, which
        waits for layer li's reads and copies them into the blocks `idx` of `k[li]`, `v[li]` (on CUDA on
        `load_stream`, recording `ev_load[li]` / `ev_load[L + li]` around the copy, after layer li - N's
        compute event when layer-wise)."""
        self._raise()
        self.join()
        total = sum(nb for _, _, nb in srcs)
        self._grow_read(total)
        if self.poison:   # a layer read short, or a slot copied before its read, turns logits to NaN
            self.rbuf.fill_(float("nan"))
        load = SsdLoad(self, [(self.files[s], j0, nb, self.written[s]) for s, j0, nb in srcs], total)
        self.load = load
        L, N, bt = self.L, self.N, self.bt
        self.io["ssd_read_bytes"] += total * L * self.block_bytes
        self.io["ssd_read_tokens"] += total * bt
        dstage = None
        if self.cuda:
            load_stream.wait_stream(main)   # blocks written by earlier steps (and their save gathers) are done
            with torch.cuda.stream(load_stream):
                dstage = torch.empty((N, total) + self.block_shape, device=self.dev, dtype=self.dtype)
                if self.poison:
                    dstage.fill_(float("nan"))

        def issue(li):
            src = load.slot(li)
            slot = li % N
            if dstage is None:
                k[li].index_copy_(0, idx, src[:, 0])
                v[li].index_copy_(0, idx, src[:, 1])
                load.copied(li, None)
                return
            with torch.cuda.stream(load_stream):
                if layerwise and li >= N:
                    load_stream.wait_event(ev_comp[li - N])
                ev_load[li].record(load_stream)
                dstage[slot].copy_(src, non_blocking=True)
                k[li].index_copy_(0, idx, dstage[slot, :, 0])
                v[li].index_copy_(0, idx, dstage[slot, :, 1])
                ev_load[L + li].record(load_stream)
            load.copied(li, ev_load[L + li])
        return issue

    def join(self) -> None:
        """Wait for the last step's reader and add its times to the counters."""
        load, self.load = self.load, None
        if load is None:
            return
        load.thread.join()
        if load.error is not None:
            raise load.error
        self.io["ssd_read_ms"] += load.span_ms
        self.io["ssd_wait_ms"] += load.wait_ms

    def take_io(self) -> dict:
        """What was read and written since the last call: bytes and tokens read by the steps' loads
        (`ssd_read_ms`: first read's start to the last read's end, host clock, the wait for a session's
        write to land included, `ssd_wait_ms`) and issued to be written by saves."""
        self.join()
        out, self.io = self.io, _io()
        return out

    # ---- the end of a run ------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait until every queued write is on disk."""
        self.join()
        self.jobs.join()
        self._raise()

    def reset(self) -> None:
        """Forget every session: writes drained, files closed and removed."""
        self.drain()
        self.disk.close()
        self.files.clear()
        self.cap.clear()
        self.saved.clear()
        self.written.clear()
        self.io = _io()

    def close(self) -> None:
        self.reset()
        self.jobs.put(None)
        self.writer.join()
        for b in [self.rbuf, self.wbuf] + self._old:
            unpin(b)

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"SSD tier write failed: {self.error!r}") from self.error


def _io() -> dict:
    return {"ssd_read_bytes": 0, "ssd_read_tokens": 0, "ssd_read_ms": 0.0, "ssd_wait_ms": 0.0,
            "ssd_write_bytes": 0, "ssd_write_tokens": 0}


class SsdLoad:
    """One step's reads: a thread reads layer after layer into the staging slots, one request in flight."""

    def __init__(self, tier: SsdTier, srcs, total: int):
        self.tier, self.srcs, self.total = tier, srcs, total
        L = tier.L
        self.ready = [threading.Event() for _ in range(L)]
        self._copied = [threading.Event() for _ in range(L)]
        self.copy_ev = [None] * L
        self.error: BaseException | None = None
        self.span_ms = self.wait_ms = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        tier = self.tier
        N, bt, buf = tier.N, tier.bt, tier.rbuf
        try:
            t0 = time.perf_counter()
            for _, _, _, written in self.srcs:   # each session's last write must be on disk
                written.wait()
            tier._raise()
            self.wait_ms = (time.perf_counter() - t0) * 1e3
            for li in range(tier.L):
                slot = li % N
                if li >= N:   # the slot's previous layer must have been copied out
                    self._copied[li - N].wait()
                    if self.copy_ev[li - N] is not None:
                        self.copy_ev[li - N].synchronize()
                off = 0
                for f, j0, nb, _ in self.srcs:
                    tier.disk.read_layer(f, li, nb * bt, buf[slot, off:off + nb], first_token=j0 * bt)
                    off += nb
                self.ready[li].set()
            self.span_ms = (time.perf_counter() - t0) * 1e3
        except BaseException as exc:  # noqa: BLE001 - raised in the serving thread by slot()
            self.error = exc
            for e in self.ready:
                e.set()

    def slot(self, li: int) -> torch.Tensor:
        """Layer li's blocks of every loading request, in `srcs` order, once read."""
        self.ready[li].wait()
        if self.error is not None:
            raise self.error
        return self.tier.rbuf[li % self.tier.N, :self.total]

    def copied(self, li: int, event) -> None:
        """Layer li's copy out of its slot is issued (ends at CUDA `event`; None: done)."""
        self.copy_ev[li] = event
        self._copied[li].set()
