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
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM"),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM"),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM"),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM"),
    # Phi-3 and Phi-4: q/k/v and gate/up fused into one layer each.
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    # Gemma 3 of 4B and more: the gemma3 decoder with a SigLIP vision tower, which reads images.
    "gemma3_mm": ("Gemma3TextConfig", "Gemma3ForConditionalGeneration"),
}
# Gemma 3's image tokens, and the newline runs its vLLM processor looks up by text.
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer(image_tokens: bool = False):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus BOS/EOS (and, with
    ``image_tokens``, newline runs and Gemma 3's image tokens after them)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    extra = {}
    if image_tokens:
        tok.add_tokens([AddedToken(t, normalized=False) for t in NEWLINES])
        tok.add_special_tokens([AddedToken(t, normalized=False) for t in IMAGE_TOKENS.values()])
        extra["extra_special_tokens"] = IMAGE_TOKENS
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", **extra)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str, arch: str = "llama", hidden_size: int = 128,
                     intermediate_size: int = 256, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                     tie_word_embeddings: bool | None = None) -> str:
    """Write a random-weight model folder (config, safetensors, tokenizer) and return its path.
    The output layer is tied to the embedding in Gemma 2 and 3 and untied otherwise, unless
    ``tie_word_embeddings`` says."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHITECTURES[arch])
    image_text = arch == "gemma3_mm"
    tokenizer = byte_tokenizer(image_tokens=image_text)
    extra = dict(tie_word_embeddings=False)
    if arch.startswith("gemma"):
        # Sliding and full attention in turn, with a window shorter than the tests' samples, so
        # that the two kinds of layer see different masks and rotary tables; the output layer
        # tied to the embedding, as in the released Gemma 2 and 3 models.
        head_dim = hidden_size // num_heads
        extra = dict(tie_word_embeddings=True, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                     sliding_window=16, pad_token_id=tokenizer.pad_token_id,
                     layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)])
    if arch == "granite":
        # Granite scales the embedding, the residual branches and attention by its own factors.
        # Granite 3's (12, 0.22) would let the embedding drown this random model's branches, so
        # these keep them about as large as a Llama's; the logits' divisor stays 1.
        extra.update(embedding_multiplier=0.5, residual_multiplier=0.5,
                     attention_multiplier=1.0 / (hidden_size // num_heads))
    if arch == "phi3":
        extra["pad_token_id"] = tokenizer.pad_token_id  # its default (32000) is past this vocabulary
    if tie_word_embeddings is not None:
        extra["tie_word_embeddings"] = tie_word_embeddings
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **extra)
    if image_text:
        config = _image_text_config(config, tokenizer)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    if image_text:
        # transformers starts the projector from zeros, which would make every image look the same.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if image_text:
        _save_image_parts(out_dir, tokenizer)
    return out_dir


def _image_text_config(text, tokenizer):
    """Gemma 3's image-text config around the decoder's: a 2-layer SigLIP tower on 64x64 images
    of 16x16 patches, pooled to 4 tokens per image."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=64, patch_size=16, vision_use_head=False)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in IMAGE_TOKENS.items()}
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                        image_token_index=ids["image_token"], tie_word_embeddings=text.tie_word_embeddings)


def _save_image_parts(out_dir: str, tokenizer) -> None:
    """The image processor, and the vision tower's weights under the names of the released
    checkpoints (``vision_tower.vision_model.*``, which this transformers saves without
    ``vision_model``)."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Processor

    try:  # transformers 5: the torchvision-free image processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil as processor_cls
    except ImportError:  # transformers 4's own is torchvision-free
        from transformers import Gemma3ImageProcessor as processor_cls

    Gemma3Processor(image_processor=processor_cls(size={"height": 64, "width": 64}),
                    tokenizer=tokenizer, image_seq_length=4).save_pretrained(out_dir)
    path = os.path.join(out_dir, "model.safetensors")
    tower = "vision_tower."
    sd = {(f"{tower}vision_model.{k[len(tower):]}" if k.startswith(tower) and ".vision_model." not in k else k): v
          for k, v in load_file(path).items()}
    save_file(sd, path, metadata={"format": "pt"})
