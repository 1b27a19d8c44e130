"""kvsim: discrete-event simulator of multi-turn KV-cache reuse across HBM, DRAM and SSD."""
