"""Real-GPU side of kvsim: microbenchmarks, calibration into the cost model schema, executor, validation."""
