"""Tiny random-weight transformer checkpoints for tests, built locally.

Nothing here touches the network: the tokenizer is trained with the
``tokenizers`` library on a small English word list and the models are
instantiated from ``transformers`` config classes with a fixed seed, then
saved with ``save_pretrained`` exactly as a hub checkpoint would be laid out
(decoders are saved from their ``*ForCausalLM`` class, BERT from
``BertForMaskedLM``, the Qwen3.5 multimodal wrapper from
``Qwen3_5ForConditionalGeneration``), so loading them exercises the same
code path as a real checkpoint.

Usage::

    path = build_tiny_model("qwen3_5", tmp_path_factory.mktemp("m"))
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from amygdala_dagster.readout.vectors import TrainedReadout

ARCHS: tuple[str, ...] = (
    "qwen3_5",
    "qwen3_5_vl",
    "qwen3",
    "qwen2",
    "llama",
    "mistral",
    "gemma",
    "gpt2",
    "gpt_neox",
    "bert",
)

DECODER_ARCHS: tuple[str, ...] = tuple(a for a in ARCHS if a != "bert")

NUM_LAYERS = 4
HIDDEN = 64
VOCAB_SIZE = 512
MAX_POSITIONS = 1024
SEED = 1234

# A few hundred words of plain English so the BPE learns real sub-words.
_CORPUS = """
The old journal entry spoke of warmth and quiet clarity after a long week of work.
I felt curious about the pattern that kept returning in the evening digests, the way
small frustrations gathered into tiredness and then dissolved when a friend called.
Memory is a river: it bends around the stones of what we cared about most. Today the
rain was soft, the tea was hot, and the code finally compiled without a single warning.
She laughed at the joke, then apologised for laughing, then laughed again. We walked
along the harbour and counted boats, arguing about whether the red one was a ferry.
Anxiety sits in the chest like a cat that will not move; patience is the only answer.
The report was late, the manager was kind about it, and the relief was enormous.
Learning a new language feels like opening windows in a house you thought you knew.
There is joy in finishing things, and a different, quieter joy in starting them.
He wrote three pages about loneliness and then deleted two of them before sleeping.
Gratitude for the morning light, for coffee, for the neighbour who waters the plants.
Sometimes the best plan is to rest, to stop pushing, and to let the problem settle.
Curiosity killed the cat, but satisfaction brought it back, or so the saying goes.
Anger flared when the server crashed again, then faded into a stubborn determination.
The children built a castle of sand and guarded it fiercely against the incoming tide.
A digest of the week: progress on the model, a difficult conversation, a good book.
Numbers one two three four five six seven eight nine ten eleven twelve hundred.
Questions remain about love, trust, fear, hope, wonder, sadness, calm and surprise.
"""


def _special_tokens(with_pad: bool) -> list[str]:
    tokens = ["<unk>", "<s>", "</s>"]
    if with_pad:
        tokens.insert(1, "<pad>")
    return tokens


def build_tokenizer(tmp_dir: str | os.PathLike[str], *, with_pad: bool = True,
                    add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer on a fixed English corpus and return it.

    ``with_pad=False`` builds a tokenizer without a padding token (like GPT-2's);
    ``add_bos`` prepends ``<s>`` to every encoded text (like Llama/Qwen chat
    tokenizers configured to add a BOS). The tokenizer files are also saved
    under ``tmp_dir/tokenizer``.
    """
    specials = _special_tokens(with_pad)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    words = _CORPUS.split()
    tok.train_from_iterator([" ".join(words[i:i + 12]) for i in range(0, len(words), 12)], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    kwargs = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, **kwargs)
    out = Path(tmp_dir) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def _bert_tokenizer(tmp_dir: Path) -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer: [CLS] text [SEP], with [PAD] and [UNK]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    words = _CORPUS.split()
    tok.train_from_iterator([" ".join(words[i:i + 12]) for i in range(0, len(words), 12)], trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_POSITIONS, unk_token="[UNK]",
        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    return fast


def _decoder_common(tok: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _qwen3_5_text_kwargs(tok: PreTrainedTokenizerFast) -> dict:
    kw = _decoder_common(tok)
    kw.update(
        head_dim=16,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_conv_kernel_dim=4,
        # Both kinds of layers, the hybrid layout of the real checkpoints.
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    )
    return kw


def _make_model(arch: str, tok: PreTrainedTokenizerFast):
    import transformers as tf

    if arch == "qwen3_5":
        return tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**_qwen3_5_text_kwargs(tok)))
    if arch == "qwen3_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=HIDDEN, num_position_embeddings=64, patch_size=4)
        cfg = tf.Qwen3_5Config(
            text_config=_qwen3_5_text_kwargs(tok), vision_config=vision,
            image_token_id=VOCAB_SIZE - 4, video_token_id=VOCAB_SIZE - 3,
            vision_start_token_id=VOCAB_SIZE - 2, vision_end_token_id=VOCAB_SIZE - 1,
        )
        return tf.Qwen3_5ForConditionalGeneration(cfg)
    if arch == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **_decoder_common(tok)))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_decoder_common(tok)))
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_common(tok)))
    if arch == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**_decoder_common(tok)))
    if arch == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=16, **_decoder_common(tok)))
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=NUM_LAYERS, n_head=4,
                            n_positions=MAX_POSITIONS, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
        return tf.GPT2LMHeadModel(cfg)
    if arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=NUM_LAYERS,
                               num_attention_heads=4, intermediate_size=2 * HIDDEN,
                               max_position_embeddings=MAX_POSITIONS, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)
        return tf.GPTNeoXForCausalLM(cfg)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=NUM_LAYERS,
                            num_attention_heads=4, intermediate_size=2 * HIDDEN,
                            max_position_embeddings=MAX_POSITIONS, pad_token_id=tok.pad_token_id)
        return tf.BertForMaskedLM(cfg)
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")


_CACHE: dict[tuple[str, str], str] = {}


_SHARED_DIR: str | None = None


def _shared_dir() -> str:
    global _SHARED_DIR
    if _SHARED_DIR is None or not Path(_SHARED_DIR).is_dir():
        _SHARED_DIR = tempfile.mkdtemp(prefix="amygdala-tiny-models-")
        atexit.register(shutil.rmtree, _SHARED_DIR, True)
    return _SHARED_DIR


def build_tiny_model(arch: str, tmp_dir: str | os.PathLike[str] | None = None) -> str:
    """Save a tiny random-weight ``arch`` model plus tokenizer; return its directory.

    Built once per (arch, tmp_dir) per process; with no ``tmp_dir`` one
    process-wide temporary directory (removed at exit) is shared by every
    caller. GPT-2 gets a tokenizer without a pad token (as the real one), BERT
    a [CLS]/[SEP] tokenizer; the others a BOS-prefixing tokenizer with
    ``<pad>``. Treat the directory as read-only; copy it to modify it.
    """
    if tmp_dir is None:
        tmp_dir = _shared_dir()
    key = (arch, str(Path(tmp_dir).resolve()))
    if key in _CACHE and Path(_CACHE[key]).is_dir():
        return _CACHE[key]
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    out = Path(tmp_dir) / f"tiny-{arch}"
    tok_dir = Path(tmp_dir) / f"tok-{arch}"
    if arch == "bert":
        tok = _bert_tokenizer(tok_dir)
    else:
        tok = build_tokenizer(tok_dir, with_pad=arch != "gpt2", add_bos=arch not in ("gpt2", "gpt_neox"))
    torch.manual_seed(SEED)
    model = _make_model(arch, tok)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _CACHE[key] = str(out)
    return str(out)


def random_readout(concepts: list[str], layers: list[int], hidden: int, seed: int = 0) -> TrainedReadout:
    """Unit vectors drawn at random for ``concepts`` at ``layers`` (the readout a trained pair would hold)."""
    rng = np.random.default_rng(seed)
    vectors = {}
    for layer in layers:
        m = rng.normal(size=(len(concepts), hidden))
        vectors[layer] = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    return TrainedReadout(concepts=list(concepts), layers=list(layers), vectors=vectors,
                          raw_norms={c: [1.0] * len(layers) for c in concepts}, counts={c: {} for c in concepts})
