"""A tiny, randomly initialised Llama and a byte-level BPE tokenizer, built on the fly (no download).

Shaped like SmolLM2 (Llama architecture, tied embeddings, no automatic BOS/EOS), small enough that training and
encoding tests run in seconds. Byte-level BPE means any text tokenizes without ``<unk>``.
"""

from __future__ import annotations

from pathlib import Path

TINY_CORPUS: tuple[str, ...] = (
    # entities
    "Paris", "France", "Berlin", "Germany", "Rome", "Italy", "Madrid", "Spain", "London", "England",
    "Lisbon", "Portugal", "Vienna", "Austria", "Europe", "Seine", "Rhine", "Alice", "Bob", "Carol",
    "aspirin", "fever", "disease", "cell", "organism", "land reform", "reform", "redistribution",
    # relations and their verbalisations
    "capital", "capital of", "has capital", "located in", "part of", "has part", "member of", "borders",
    "hypernym", "hyponym", "derivationally related form", "treats", "causes", "born in", "friend of",
    "inverse", "instance of", "subclass of", "river", "city", "country", "continent", "person",
    # glue words of view texts and prompts
    "the", "of", "is", "a", "an", "in", "and", "or", "to", "which", "what", "who", "write", "tail", "head",
    "entity", "relation", "triple", "completes", "given", "answer", "question", "true", "false", "yes", "no",
    # digits and punctuation
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "1789", "2024",
    ",", ".", ":", ";", "?", "!", "-", "_", "(", ")", "[", "]", "{", "}", "'", '"', "/",
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _corpus_lines(words: list[str]) -> list[str]:
    """Words alone and in short phrases, so that merges also learn the space-prefixed forms."""
    lines = list(words)
    for i in range(len(words)):
        lines.append(" ".join(words[i : i + 6]))
    lines += [f"[ {a}, {b} ]" for a, b in zip(words, words[1:])]
    return lines


def build_tokenizer(vocab_words: list[str] | None = None, vocab_size: int = 512):
    """A fast byte-level BPE tokenizer (a transformers tokenizer object) trained on ``vocab_words``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = list(vocab_words) if vocab_words is not None else list(TINY_CORPUS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(words), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    tmp_dir: Path,
    vocab_words: list[str] | None = None,
    seed: int = 0,
    *,
    hidden_size: int = 32,
    pad_token: bool = True,
) -> Path:
    """Save a tiny random LlamaForCausalLM + tokenizer into ``tmp_dir`` and return it.

    Deterministic for a given ``seed``; the global torch RNG is left untouched. ``pad_token=False`` saves a
    tokenizer without a pad token (as many base models ship), to exercise the pad fallback.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"] if pad_token else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if not pad_token:
        tokenizer.pad_token = None
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    return tmp_dir
