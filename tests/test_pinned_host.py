"""Page-locked host buffers (`gpu.kvstore.pin`): every registration is undone exactly once, by `unpin` or when
the buffer is collected, before its mmap is unmapped. Checked on CPU against a recording stand-in for the CUDA
runtime (what the driver would be told, in order)."""
import gc

import pytest
import torch

from gpu import kvstore


class Runtime:
    def __init__(self):
        self.calls = []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append(("register", ptr, nbytes))
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


@pytest.fixture
def runtime(monkeypatch):
    rt = Runtime()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return rt


def test_a_dropped_buffer_is_unregistered_once_its_last_view_is_gone(runtime):
    t = kvstore.aligned_host_bytes(5000, pinned=True)
    ptr = t.data_ptr()
    view = t[:100].view(torch.int32)   # what the stores hand out: views of the raw bytes
    assert runtime.calls == [("register", ptr, 8192)]   # rounded up to two 4 KiB pages
    del t
    gc.collect()
    assert runtime.calls == [("register", ptr, 8192)]   # the view still reads the pinned range
    del view
    gc.collect()
    assert runtime.calls == [("register", ptr, 8192), ("unregister", ptr)]


def test_unpin_through_a_view_unregisters_once_and_collection_after_it_adds_nothing(runtime):
    t = kvstore.aligned_host_bytes(4096, pinned=True)
    ptr = t.data_ptr()
    view = t[:64].view(torch.bfloat16).view(2, 16)
    del t
    gc.collect()
    kvstore.unpin(view)      # the stores keep only views: the raw tensor's own object is long gone
    kvstore.unpin(view)
    del view
    gc.collect()
    assert runtime.calls == [("register", ptr, 4096), ("unregister", ptr)]


def test_an_unpinned_buffer_is_never_registered(runtime):
    t = kvstore.aligned_host_bytes(4096, pinned=False)
    kvstore.unpin(t)
    del t
    gc.collect()
    assert runtime.calls == []
