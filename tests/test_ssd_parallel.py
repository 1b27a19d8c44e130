"""SSD reads with several requests in flight (gpu/ssd_parallel.py), on CPU with tiny files: every point
reads what it says, threads really overlap, and GPUDirect Storage reports why it is unavailable."""
import threading
import time

import pytest

from gpu import ssd_parallel as sp


def test_parallel_reads_cover_every_size_and_depth_and_count_their_bytes(tmp_path):
    res = sp.parallel_reads(tmp_path, sizes=(64 << 10, 256 << 10), depths=(1, 3), file_bytes=4 << 20,
                            bytes_per_point=1 << 20)
    assert [(r["chunk_bytes"], r["depth"]) for r in res["rows"]] == [(64 << 10, 1), (64 << 10, 3),
                                                                     (256 << 10, 1), (256 << 10, 3)]
    for r in res["rows"]:
        assert r["requests"] == (1 << 20) // r["chunk_bytes"]  # 16 or 4 requests of about 1 MiB in all
        assert r["bytes"] == r["requests"] * r["chunk_bytes"] and r["gbps"] > 0
    assert res["sequential"]["bytes"] == 4 << 20 and res["method"] in ("o_direct", "buffered+fadvise")
    assert not list(tmp_path.glob("*.bin"))  # the file is removed


def test_a_point_has_at_least_one_request_per_thread(tmp_path):
    res = sp.parallel_reads(tmp_path, sizes=(256 << 10,), depths=(8,), file_bytes=4 << 20, bytes_per_point=1)
    assert res["rows"][0]["requests"] == 8


def test_threads_start_together_and_overlap():
    # four sleeps of 0.05 s on four threads take about 0.05 s, not 0.2 s
    dt = sp._timed_threads(4, lambda j: time.sleep(0.05))
    assert 0.045 < dt < 0.15


def test_an_error_in_a_reader_thread_is_raised_to_the_caller():
    def work(j):
        if j == 1:
            raise OSError("short read")
    with pytest.raises(OSError, match="short read"):
        sp._timed_threads(3, work)


def test_layer_reads_in_flight_read_every_layer_once(tmp_path, monkeypatch):
    from gpu.kvstore import DiskStore
    seen = []
    lock = threading.Lock()
    orig = DiskStore.read_layer

    def spy(self, f, layer, tokens, buf):
        with lock:
            seen.append((layer, tokens))
        return orig(self, f, layer, tokens, buf)

    monkeypatch.setattr(DiskStore, "read_layer", spy)
    res = sp.layer_reads_in_flight(tmp_path, token_bytes=4096, layers=6, hist_tokens=(8, 32), depths=(1, 4), reps=1)
    assert [(r["hist_tokens"], r["depth"]) for r in res["rows"]] == [(8, 1), (8, 4), (32, 1), (32, 4)]
    assert all(r["bytes"] == 6 * r["hist_tokens"] * 4096 for r in res["rows"])
    for h in (8, 32):  # each (history, depth) point reads the six layers once
        assert sorted(l for l, t in seen if t == h) == sorted(list(range(6)) * 2)


def test_gds_probe_says_why_it_is_unavailable_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the probe runs for real in bench/gpu_ssd_parallel.py")
    out = sp.gds_probe(tmp_path)
    assert out == {"available": False, "reason": "no CUDA device", "rows": []}
