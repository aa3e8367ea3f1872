"""The tokens that end a chat turn, and the control tokens that must never start one, read from a Hugging
Face tokenizer: one rule for where a reply ends (the persona eval, `--loss-on replies`) and what a sampler
bans (the persona eval's chat sampler; `taille chat` and `taille serve` read the same rule from the GGUF's
vocabulary, taille.chat.engine.control_ids)."""

from __future__ import annotations

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
               "<|endoftext|>", "</s>", "<eos>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<EOT>",
               "_<EOT>", "[EOT]", "[EOS]",
               "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
               # fill-in-the-middle pad, repo and file separators, which llama.cpp also ends a reply at
               "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
               "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>")
"""Tokens that end a reply besides the tokenizer's eos: the common names llama.cpp's vocabulary loader
counts as end of generation (llama-vocab.cpp as vendored by llama-cpp-python 0.3.36; it takes only the first
FIM pad, repo and separator name it finds, and a few model-specific names are left out), so the eval stops
where `taille chat` stops and its chat sampler bans the control tokens `taille chat` bans (control_ids;
tests/chat checks both on the real SmolLM2, whose `<reponame>` llama.cpp takes as a FIM separator)."""


def stop_ids(tokenizer) -> list[int]:
    """The tokenizer's eos and any end-of-turn token it knows."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab[t] for t in END_OF_TURN if t in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


def control_ids(tokenizer) -> list[int]:
    """The tokenizer's special tokens that do not end a reply (`<|im_start|>`, padding...): what llama.cpp
    marks as control tokens in the GGUF, and what `taille chat` and `taille serve` ban
    (taille.chat.engine.banned)."""
    stops = set(stop_ids(tokenizer)) | {tokenizer.unk_token_id}  # llama.cpp marks unk UNKNOWN, not control
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    return sorted(i for i in special - stops if i is not None)
