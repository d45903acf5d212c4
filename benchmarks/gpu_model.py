"""A whole model on the GPU: a Llama of TinyLlama-1.1B's shape (random weights: the embedded default's files do not
travel to the GPU machine), pruned in 32x32 blocks at 70% and converted, against the same masked model run dense.

    python benchmarks/gpu_model.py                # writes benchmarks/results/kernels_cuda_model.{json,md}
    python benchmarks/gpu_model.py --tiny --device cpu   # a smoke run of the same steps on a 2-layer model

Steps, all in one process: build the model in bf16 on the GPU (seeded); prunekit.prune(model, Budget(0.7,
granularity="block"), importance="magnitude"); a deep copy converted by prunekit.kernels.convert (backend "auto",
measured in graph mode for 1 row and the prefill's rows: layers where no sparse path wins stay dense). Then, for the
masked dense model and the converted one:
- prefill: the forward pass of a batch of prompts (4 x 512 tokens), median of 5 after a warm-up;
- greedy decoding of 64 tokens after a 128-token prompt with a static KV cache, eager (each step a plain forward)
  and as CUDA-graph replays of one captured decode step (what serving stacks do), tokens per second;
- the generated tokens of the converted model against the masked dense model's, in each mode;
- each bf16 model's decode logits against the masked model in float32, teacher-forced on the same tokens (where the
  greedy tokens of two bf16 models part at a near-tie, this says whether the kernels are as exact as cuBLAS);
- last, the converted model's prefill again with keep_dense=True on every converted layer (where auto runs a layer
  dense, it keeps the dense weight instead of rebuilding it per call), and what its layers hold either way.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import machine, versions  # noqa: E402

import prunekit  # noqa: E402
from prunekit.kernels import SPARSE_MODULES, convert, dispatch  # noqa: E402
from prunekit.kernels.convert import stored_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(shape: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def prefill_seconds(model, batch: torch.Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        model(batch)  # warm-up: the dispatch measures this batch size
        times = []
        for _ in range(repeats):
            sync(batch.device)
            start = time.perf_counter()
            model(batch)
            sync(batch.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class Decoder:
    """Greedy decoding with a static KV cache; `graph=True` captures one decode step as a CUDA graph and replays it,
    with the token and position in fixed buffers (no host synchronisation until the end)."""

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int, graph: bool):
        from transformers import StaticCache

        self.model, self.prompt, self.new_tokens, self.graph = model, prompt, new_tokens, graph
        self.device = prompt.device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 1)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits = None
        self._graph = None

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, past_key_values=self.cache, cache_position=self.pos,
                         position_ids=self.pos.view(1, 1), use_cache=True)
        return out.logits[:, -1]

    def _prefill(self) -> torch.Tensor:
        self.cache.reset()
        n = self.prompt.shape[1]
        positions = torch.arange(n, device=self.device)
        out = self.model(input_ids=self.prompt, past_key_values=self.cache, cache_position=positions,
                         position_ids=positions.view(1, -1), use_cache=True)
        return out.logits[:, -1].argmax(-1)

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.logits = self._step()

    def run(self, forced: list[int] | None = None) -> tuple[list[int], float, torch.Tensor]:
        """(new tokens, decode seconds for the tokens after the first, each step's logits [new tokens - 1, vocab]).
        forced: feed these tokens instead of the model's own choices (teacher forcing), so that two models' logits
        are compared at the same positions after the same history."""
        forced_ids = None if forced is None else torch.tensor(forced, device=self.device)
        with torch.no_grad():
            token = self._prefill() if forced is None else forced_ids[:1]
            self.ids.copy_(token.view(1, 1))
            self.pos.fill_(self.prompt.shape[1])
            if self.graph and self._graph is None:
                self._capture()  # its warm-up steps wrote this position's cache entry, which each step rewrites
            tokens, logits_seen = [token.view(1)], []
            sync(self.device)
            start = time.perf_counter()
            for _ in range(self.new_tokens - 1):
                if self.graph:
                    self._graph.replay()
                    logits = self.logits
                else:
                    logits = self._step()
                token = logits.argmax(-1) if forced is None else forced_ids[len(tokens):len(tokens) + 1]
                tokens.append(token.view(1))
                logits_seen.append(logits[0].float())  # a copy on the device, so the timing stays host-sync free
                self.ids.copy_(token.view(1, 1))
                self.pos.add_(1)
            sync(self.device)
            seconds = time.perf_counter() - start
        return torch.cat(tokens).tolist(), seconds, torch.stack(logits_seen) if logits_seen else None


def decode(model, prompt: torch.Tensor, new_tokens: int, graph: bool) -> dict:
    decoder = Decoder(model, prompt, new_tokens, graph)
    try:
        decoder.run()  # warm-up (and, graphed, the capture)
        tokens, seconds, logits = decoder.run()
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the other rows still say something
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": (new_tokens - 1) / seconds, "logits": logits}


def against_fp32(dense, sparse, prompt: torch.Tensor, tokens: list[int], device: torch.device) -> dict:
    """Each bf16 model's decode logits against the masked model in float32, teacher-forced on the dense model's
    tokens: greedy tokens of two bf16 models part at near-ties of random weights' flat logits (any two summation
    orders do), so the test of the kernels is whether the converted model is as close to exact as cuBLAS is."""
    reference = copy.deepcopy(dense).float()
    with dispatch.mode("eager"):
        exact = Decoder(reference, prompt, len(tokens), graph=False).run(tokens)[2]
    del reference
    runs = {"masked dense, eager": (dense, "eager"), "converted, eager": (sparse, "eager")}
    if device.type == "cuda":
        runs["converted, graph"] = (sparse, "graph")
    out = {}
    for name, (model, mode) in runs.items():
        with dispatch.mode(mode):
            logits = Decoder(model, prompt, len(tokens), graph=mode == "graph").run(tokens)[2]
        out[name] = {"max_logit_error": float((logits - exact).abs().max()),
                     "mean_logit_error": float((logits - exact).abs().mean()),
                     "argmax_equal": int((logits.argmax(-1) == exact.argmax(-1)).sum()), "of": len(logits)}
    out["logit_scale"] = float(exact.abs().max())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a smoke run of the steps")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="results prefix (default benchmarks/results/kernels_cuda_model)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    shape = TINY if args.tiny else TINYLLAMA
    dense = build(shape, device)
    params = sum(p.numel() for p in dense.parameters())
    print(f"model: {params / 1e9:.2f}B parameters on {device}", flush=True)
    clock = time.perf_counter()
    prunekit.prune(dense, prunekit.Budget(args.sparsity, granularity="block"), importance="magnitude",
                   progress=False)
    prune_seconds = time.perf_counter() - clock
    sparse = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, shape["vocab_size"], (4, 64 if args.tiny else 512), generator=g).to(device)
    prompt = torch.randint(0, shape["vocab_size"], (1, 16 if args.tiny else 128), generator=g).to(device)
    graph_mode = "graph" if device.type == "cuda" else "eager"
    clock = time.perf_counter()
    with dispatch.mode(graph_mode):
        report = convert(sparse, rows=(1, batch.numel()))
    convert_seconds = time.perf_counter() - clock
    print(report, flush=True)
    doc = {"command": "python " + shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "machine": machine(device.type), "versions": versions(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": {"shape": shape, "parameters": params, "dtype": "bfloat16"},
           "sparsity": args.sparsity, "block": 32, "prune_seconds": round(prune_seconds, 1),
           "convert_seconds": round(convert_seconds, 1),
           "converted": {"layers": report.converted, "of": len(report), "bytes": report.summary()
                         if hasattr(report, "summary") else None,
                         "choices": sorted({str(c.choices) for c in report})},
           "prefill": {"batch": list(batch.shape)}, "decode": {"prompt": prompt.shape[1], "new_tokens": args.new_tokens}}
    for name, model in (("dense", dense), ("sparse", sparse)):
        with dispatch.mode("eager"):
            doc["prefill"][name] = prefill_seconds(model, batch)
        for mode in ("eager", "graph") if device.type == "cuda" else ("eager",):
            with dispatch.mode(mode):
                doc["decode"][f"{name} {mode}"] = decode(model, prompt, args.new_tokens, graph=mode == "graph")
        print(name, {k: v.get("tokens_per_second", v.get("error")) for k, v in doc["decode"].items()
                     if k.startswith(name)}, f"prefill {doc['prefill'][name] * 1e3:.1f} ms", flush=True)
    choices = {}  # what auto ran, per mode and batch-size bucket, over the model's distinct layer problems
    for problem, choice in dispatch.decisions().items():
        key = f"{problem.mode}, {problem.rows} rows"
        choices.setdefault(key, {}).setdefault(choice.winner, 0)
        choices[key][choice.winner] += 1
    doc["choices"] = choices
    for mode in ("eager", "graph"):
        a, b = doc["decode"].get(f"dense {mode}", {}), doc["decode"].get(f"sparse {mode}", {})
        if "tokens" in a and "tokens" in b:
            same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
            first = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
            equal = {"equal": a["tokens"] == b["tokens"], "same": same, "of": len(a["tokens"]),
                     "first_difference": first}
            if first:  # the same prefix so far: how close was the dense model's choice, how far apart the logits
                la, lb = a["logits"][first - 1], b["logits"][first - 1]
                top = la.topk(2).values
                equal["dense_top2_margin"] = float(top[0] - top[1])
                equal["max_logit_difference"] = float((la - lb).abs().max())
                equal["logit_scale"] = float(la.abs().max())
            doc["decode"][f"tokens equal {mode}"] = equal
            doc["decode"][f"speedup {mode}"] = b["tokens_per_second"] / a["tokens_per_second"]
    if "tokens" in doc["decode"].get("dense eager", {}):
        doc["against_fp32"] = against_fp32(dense, sparse, prompt, doc["decode"]["dense eager"]["tokens"], device)
    layers = [m for m in sparse.modules() if isinstance(m, SPARSE_MODULES)]
    held = doc["converted"]["held"] = {"dense": sum(m.out_features * m.in_features * 2 for m in layers),
                                       "lean": sum(stored_bytes(m) for m in layers)}
    for layer in layers:
        layer.keep_dense = True
    with dispatch.mode("eager"):
        doc["prefill"]["sparse kept"] = prefill_seconds(sparse, batch)
    held["kept"] = sum(stored_bytes(m) for m in layers)
    print(f"keep_dense: prefill {doc['prefill']['sparse kept'] * 1e3:.1f} ms; layers hold {held}", flush=True)
    for run in doc["decode"].values():
        if isinstance(run, dict):
            run.pop("logits", None)
    doc["prefill"]["speedup"] = doc["prefill"]["dense"] / doc["prefill"]["sparse"]
    doc["prefill"]["speedup kept"] = doc["prefill"]["dense"] / doc["prefill"]["sparse kept"]
    doc["seconds"] = round(time.perf_counter() - started, 1)
    out = args.out or RESULTS / "kernels_cuda_model"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    m, d, p = doc["machine"], doc["decode"], doc["prefill"]
    lines = [f"# A {doc['model']['parameters'] / 1e9:.2f}B Llama, {doc['sparsity']:.0%} of 32x32 blocks pruned, on "
             f"{m.get('gpu', m['cpu'])}", "", f"Command: `{doc['command']}`  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ", f"Date: {doc['date']}",
             "", f"Pruned (magnitude, block granularity) in {doc['prune_seconds']} s; converted in "
             f"{doc['convert_seconds']} s: {doc['converted']['layers']} of {doc['converted']['of']} layers sparse "
             f"(choices per rows bucket: {', '.join(doc['converted']['choices'])}).", "",
             "Auto's choices (per mode and rows bucket, over the distinct layer problems): " + "; ".join(
                 f"{k}: {v}" for k, v in sorted(doc.get("choices", {}).items())) + ".", "",
             "| | masked dense | converted | speedup | tokens equal |", "|---|---|---|---|---|",
             f"| prefill {p['batch'][0]} x {p['batch'][1]} tokens (ms) | {p['dense'] * 1e3:.1f} | "
             f"{p['sparse'] * 1e3:.1f} | {p['speedup']:.2f}x | |"]
    if "sparse kept" in p:
        lines.append(f"| prefill, keep_dense=True (ms) | {p['dense'] * 1e3:.1f} | {p['sparse kept'] * 1e3:.1f} | "
                     f"{p['speedup kept']:.2f}x | |")
    for mode in ("eager", "graph"):
        a, b = d.get(f"dense {mode}"), d.get(f"sparse {mode}")
        if a is None:
            continue
        cell = lambda r: f"{r['tokens_per_second']:.1f}" if "tokens_per_second" in r else r.get("error", "")
        eq = d.get(f"tokens equal {mode}", {})
        same = (f"{eq['same']} of {eq['of']}" + ("" if eq["equal"] else f" (first difference at {eq['first_difference']}"
                + (f"; there the dense model's top two logits were {eq['dense_top2_margin']:.3g} apart and the two "
                   f"models' logits differed by up to {eq['max_logit_difference']:.3g} of {eq['logit_scale']:.3g}"
                   if "dense_top2_margin" in eq else "") + ")") if eq else "")
        sp = f"{d[f'speedup {mode}']:.2f}x" if f"speedup {mode}" in d else ""
        lines.append(f"| decode, {mode} (tokens/s) | {cell(a)} | {cell(b)} | {sp} | {same} |")
    held = doc["converted"].get("held")
    if held:
        lines += ["", f"The converted layers hold {held['lean'] / held['dense']:.2f}x their dense bytes after prefill "
                  f"and decode ({held['kept'] / held['dense']:.2f}x with keep_dense=True, after its prefill)."]
    exact = doc.get("against_fp32")
    if exact:
        lines += ["", "Against the masked model in float32, teacher-forced on the dense model's tokens (decode logits; "
                  f"largest |logit| {exact['logit_scale']:.3g}):", "",
                  "| bf16 model | max logit error | mean logit error | argmax as float32's |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['max_logit_error']:.3g} | {r['mean_logit_error']:.3g} | {r['argmax_equal']} of {r['of']} |"
                  for name, r in exact.items() if isinstance(r, dict)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
