"""Reference pipeline for `duet bench`: the same bundle, pipelines and sampler as the Rust
runtime, written the way a Python user would, with the `onnxruntime` package and numpy.

Captioning: vision encoder, then KV-cache greedy decoding (feeding `present_*` back as
`past_*`) until EOS. Generation: text encoder, then deterministic DDIM with classifier-free
guidance as one batch of 2 (the prompt and the empty caption), v- or epsilon-prediction and
x0 clipping exactly as `duet-diffusion` does. The noise comes from numpy, so images differ from
Rust's pixel for pixel while the work is identical; captions of the same image must match.

Prints one JSON object with the fields of `duet_runtime::bench::ProviderBench`.

    python3 benchmarks/python/bench.py --bundle B --image-raw IMG.rgb|- [--runs 10] [--steps 10,20,50]
"""

import argparse
import json
import re
import resource
import sys
import time

import numpy as np
import onnxruntime as ort


def stats(samples):
    s = sorted(samples)
    rank = lambda q: s[min(max(int(np.ceil(q * len(s))), 1), len(s)) - 1]
    return {"median_ms": rank(0.5), "p90_ms": rank(0.9), "runs": len(s)}


def timed(warmup, runs, f):
    for _ in range(warmup):
        f()
    out = []
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        f()
        out.append((time.perf_counter() - t) * 1e3)
    return stats(out)


THREADS = None  # --threads: onnxruntime's intra-op pool size (None: its default)


def session(path):
    options = ort.SessionOptions()
    if THREADS is not None:
        options.intra_op_num_threads = THREADS
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class Captioner:
    def __init__(self, bundle, manifest, vocab):
        t = time.perf_counter()
        self.vision = session(f"{bundle}/vision_encoder.onnx")
        self.decoder = session(f"{bundle}/caption_decoder.onnx")
        self.load_ms = (time.perf_counter() - t) * 1e3
        self.m, self.tok, self.img = manifest["model"], manifest["tokenizer"], manifest["image"]
        self.past = [i.name for i in self.decoder.get_inputs() if i.name.startswith("past_")]
        self.present = ["present_" + n[len("past_"):] for n in self.past]
        self.inverse = {i: w for w, i in vocab.items()}

    def pixels(self, rgb):
        x = rgb.astype(np.float32) / 255.0
        x = (x - np.array(self.img["mean"], np.float32)) / np.array(self.img["std"], np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def caption(self, rgb):
        b = rgb.shape[0]
        tokens = self.vision.run(["patch_tokens"], {"pixels": self.pixels(rgb)})[0]
        heads, hd = self.m["n_heads"], self.m["d_model"] // self.m["n_heads"]
        past = {n: np.zeros((b, heads, 0, hd), np.float32) for n in self.past}
        current = np.full((b, 1), self.tok["bos_id"], np.int64)
        done, out = [False] * b, [[] for _ in range(b)]
        for step in range(min(self.m["max_len"], self.tok["max_len"]) - 1):
            feed = {
                "input_ids": current,
                "position_ids": np.full((b, 1), step, np.int64),
                "attn_bias": np.zeros((b, 1, 1, step + 1), np.float32),
                "image_tokens": tokens,
                **past,
            }
            res = self.decoder.run(["logits"] + self.present, feed)
            nxt = res[0][:, 0].argmax(-1)
            for i in range(b):
                if done[i]:
                    nxt[i] = self.tok["pad_id"]
                elif nxt[i] == self.tok["eos_id"]:
                    done[i], nxt[i] = True, self.tok["pad_id"]
                else:
                    out[i].append(int(nxt[i]))
            if all(done):
                break
            past = dict(zip(self.past, res[1:]))
            current = nxt.reshape(b, 1).astype(np.int64)
        return [" ".join(self.inverse[t] for t in ids) for ids in out]


class Generator:
    def __init__(self, bundle, manifest, vocab):
        t = time.perf_counter()
        self.text = session(f"{bundle}/text_encoder.onnx")
        self.denoiser = session(f"{bundle}/denoiser.onnx")
        self.load_ms = (time.perf_counter() - t) * 1e3
        self.m, self.tok, self.vocab = manifest["model"], manifest["tokenizer"], vocab
        d = manifest["diffusion"]
        self.ab = np.array(d["alphas_cumprod"], np.float64)
        self.v = d["prediction"] == "v"
        self.guidance = d["default_guidance"]

    def ids(self, prompt):
        # The bundle's tokenizer: lowercase, split on \w+ | [^\w\s]+, word-level vocabulary.
        words = re.findall(r"\w+|[^\w\s]+", prompt.lower())
        return [self.tok["bos_id"]] + [self.vocab[w] for w in words] + [self.tok["eos_id"]]

    def timesteps(self, steps):
        t = len(self.ab)
        stride = t / steps
        return [max(int(round(t - i * stride)) - 1, 0) for i in range(steps)]

    def generate(self, prompts, steps, rng):
        n, L = len(prompts), self.tok["max_len"]
        seqs = [self.ids(p) for p in prompts] + [[self.tok["bos_id"], self.tok["eos_id"]]] * n
        ids = np.full((2 * n, L), self.tok["pad_id"], np.int64)
        mask = np.zeros((2 * n, L), np.float32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1.0
        longest = max(len(s) for s in seqs)
        tokens = self.text.run(["text_tokens"], {"input_ids": ids, "attn_mask": mask})[0]
        tokens = np.ascontiguousarray(tokens[:, :longest])
        mask = np.ascontiguousarray(mask[:, :longest])
        size, c = self.m["image_size"], self.m["channels"]
        x = rng.standard_normal((n, c, size, size)).astype(np.float32)
        ts = self.timesteps(steps)
        for i, t in enumerate(ts):
            out = self.denoiser.run(
                ["prediction"],
                {
                    "x": np.concatenate([x, x]),
                    "timestep": np.full((2 * n,), t, np.float32),
                    "text_tokens": tokens,
                    "text_mask": mask,
                },
            )[0]
            cond, uncond = out[:n], out[n:]
            pred = cond + (self.guidance - 1.0) * (cond - uncond)
            ab = self.ab[t]
            ab_next = self.ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
            a, s = np.sqrt(ab), np.sqrt(1.0 - ab)
            x0 = (a * x - s * pred) if self.v else (x - s * pred) / a
            x0 = np.clip(x0, -1.0, 1.0).astype(np.float32)
            eps = ((x - a * x0) / s).astype(np.float32)
            x = (np.sqrt(ab_next) * x0 + np.sqrt(max(1.0 - ab_next, 0.0)) * eps).astype(np.float32)
        return x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", required=True)
    p.add_argument("--image-raw", required=True)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--steps", default="10,20,50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-steps", type=int, default=20)
    p.add_argument("--prompt", default="a large red circle at the top left")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    global THREADS
    THREADS = a.threads
    manifest = json.load(open(f"{a.bundle}/manifest.json"))
    vocab = json.load(open(f"{a.bundle}/tokenizer.json"))["model"]["vocab"]
    size = manifest["image"]["size"]
    # "-": the raw RGB bytes on stdin (how `duet bench` passes them, leaving no file behind).
    if a.image_raw == "-":
        rgb = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape(1, size, size, 3)
    else:
        rgb = np.fromfile(a.image_raw, np.uint8).reshape(1, size, size, 3)

    cap = Captioner(a.bundle, manifest, vocab)
    caption = cap.caption(rgb)[0]
    caption_b1 = timed(2, a.runs, lambda: cap.caption(rgb))
    many = np.repeat(rgb, a.batch, axis=0)
    batch = timed(1, (a.runs + 1) // 2, lambda: cap.caption(many))
    result = {
        "provider": "python-ort-cpu",
        "placement": ["every graph: onnxruntime CPUExecutionProvider (Python package)"],
        "load_caption_ms": cap.load_ms,
        "load_generate_ms": None,
        "caption_b1": caption_b1,
        "caption_batch_per_s": a.batch / (batch["median_ms"] * 1e-3),
        "caption": caption,
        "generate_b1": [],
        "generate_batch_per_s": None,
        "denoiser_call": None,
        "denoiser_flops": None,
        "peak_rss_mib": None,
    }
    if "diffusion" in manifest:
        gen = Generator(a.bundle, manifest, vocab)
        result["load_generate_ms"] = gen.load_ms
        rng = np.random.default_rng(0)
        for steps in [int(s) for s in a.steps.split(",")]:
            runs = (a.runs + 1) // 2 if steps >= 50 else a.runs
            s = timed(1, runs, lambda: gen.generate([a.prompt], steps, rng))
            result["generate_b1"].append([steps, s])
        s = timed(0, 2, lambda: gen.generate([a.prompt] * a.batch, a.batch_steps, rng))
        result["generate_batch_per_s"] = a.batch / (s["median_ms"] * 1e-3)
        m = manifest["model"]
        longest = len(gen.ids(a.prompt))
        feed = {
            "x": rng.standard_normal((2, m["channels"], m["image_size"], m["image_size"])).astype(np.float32),
            "timestep": np.full((2,), 500.0, np.float32),
            "text_tokens": rng.standard_normal((2, longest, m["d_model"])).astype(np.float32),
            "text_mask": np.ones((2, longest), np.float32),
        }
        result["denoiser_call"] = timed(2, a.runs * 3, lambda: gen.denoiser.run(["prediction"], feed))
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
