"""Prune a causal LM with prunekit's public API and compare perplexity before and after.

    python examples/prune_llm.py                       # bundled SmolLM2-135M, Wanda 50%, ~6 min on 2 cores
    python examples/prune_llm.py path/to/model --importance sparsegpt --budget 2:4 --out pruned
"""
import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

import prunekit
from prunekit import data
from prunekit.evaluate import perplexity

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", nargs="?", help="Hugging Face directory or id (default: bundled SmolLM2)")
parser.add_argument("--budget", default="0.5")
parser.add_argument("--importance", default="wanda")
parser.add_argument("--allocator", default="uniform")
parser.add_argument("--calibration-windows", type=int, default=64)
parser.add_argument("--eval-windows", type=int, default=32)
parser.add_argument("--seq-len", type=int, default=512)
parser.add_argument("--out")
args = parser.parse_args()

if args.model:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
else:
    model, tokenizer = data.load_smollm2()

calibration = data.calibration_windows(tokenizer, args.calibration_windows, args.seq_len)
windows = data.eval_windows(tokenizer, args.eval_windows, args.seq_len)

dense = perplexity(model, windows)
report = prunekit.prune(model, args.budget, importance=args.importance, allocator=args.allocator,
                        calibration=calibration)
pruned = perplexity(model, windows)

print(report)
print(f"\n{'':24}{'dense':>10}{'pruned':>10}")
print(f"{'perplexity':24}{dense:10.3f}{pruned:10.3f}")
print(f"{'sparsity of targets':24}{0:10.1%}{report.sparsity:10.1%}")
print(f"{'pruning seconds':24}{'':>10}{report.seconds['total']:10.1f}")
if args.out:
    prunekit.save_pruned(model, args.out, report, tokenizer)
    print(f"saved to {args.out}")
