#!/usr/bin/env python3
# python benchmarks/python/iobinding.py shipped/duet-small/denoiser.onnx  (docs/BENCHMARKS.md)
# Denoiser call at one guided step's shape: plain run() vs IoBinding with pre-allocated inputs
# and output (the sampler loop's pattern: same shapes every step), one intra-op thread.
import sys, time, numpy as np, onnxruntime as ort
path = sys.argv[1]
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {"x": rng.standard_normal((2, 3, 32, 32), dtype=np.float32),
         "timestep": np.array([500, 500], np.float32),
         "text_tokens": rng.standard_normal((2, 12, 128), dtype=np.float32),
         "text_mask": np.ones((2, 12), np.float32)}
def plain():
    return s.run(["prediction"], feeds)[0]
io = s.io_binding()
ins = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
out = ort.OrtValue.ortvalue_from_shape_and_type([2, 3, 32, 32], np.float32)
for k, v in ins.items(): io.bind_ortvalue_input(k, v)
io.bind_ortvalue_output("prediction", out)
def bound():
    s.run_with_iobinding(io)
    return out.numpy()
assert np.array_equal(plain(), bound())
res = {}
for rnd in range(3):
    for name, f in [("run", plain), ("iobinding", bound)]:
        for _ in range(20): f()
        t = []
        for _ in range(300):
            t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
        res.setdefault(name, []).append(np.median(t) * 1e3)
for k, v in res.items(): print(k, " ".join(f"{x:.3f}" for x in v), "ms (3 rounds, median of 300)")
