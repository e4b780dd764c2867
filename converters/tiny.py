# SPDX-License-Identifier: Apache-2.0
"""Tiny random-weight models with a byte-level tokenizer: the demo's default input and the
tests' fixtures. They are real Hugging Face folders that transformers and vLLM load."""

from __future__ import annotations

import os

import torch

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str, arch: str = "llama", hidden_size: int = 128,
                     intermediate_size: int = 256, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                     tie_word_embeddings: bool | None = None) -> str:
    """Write a random-weight model folder (config, safetensors, tokenizer) and return its path.
    The output layer is tied to the embedding in Gemma 3 and untied otherwise, unless
    ``tie_word_embeddings`` says."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHITECTURES[arch])
    tokenizer = byte_tokenizer()
    extra = dict(tie_word_embeddings=False)
    if arch == "gemma3":
        # Sliding and full attention in turn, with a window shorter than the tests' samples, so
        # that the two kinds of layer see different masks and rotary tables; the output layer
        # tied to the embedding, as in the released Gemma 3 models.
        head_dim = hidden_size // num_heads
        extra = dict(tie_word_embeddings=True, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                     sliding_window=16, pad_token_id=tokenizer.pad_token_id,
                     layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)])
    if tie_word_embeddings is not None:
        extra["tie_word_embeddings"] = tie_word_embeddings
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
