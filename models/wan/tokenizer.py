"""A small word-level tokenizer that behaves like the umT5 tokenizer where Wan relies on it.

The release ships google/umt5-xxl's SentencePiece tokenizer (256k pieces). Small checkpoints in
the same layout (tests, the embedded default model) need a tokenizer that loads the same way
(`AutoTokenizer.from_pretrained(folder, local_files_only=True)`) and keeps the conventions Wan's
encoder depends on (docs/wan-model.md): pad id 0, EOS id 1 appended to every sequence, unknown id 2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def build_word_tokenizer(words: Iterable[str], out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over `words`, save it to `out_dir` and return it.

    Ids: `<pad>`=0, `</s>`=1, `<unk>`=2, then the words in first-seen order from 3 on. Text is
    NFKC-normalised and lowercased, split on whitespace, and every punctuation character becomes
    its own token; `</s>` is appended by the post-processor (as umT5 does with special tokens on).
    Each entry of `words` must be a single such token (a word or one punctuation character), otherwise
    it could never be produced and a `ValueError` names it. Duplicates (after lowercasing) are dropped.
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])

    vocab: dict[str, int] = {PAD: PAD_ID, EOS: EOS_ID, UNK: UNK_ID}
    for word in words:
        token = normalizer.normalize_str(word)
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(token)]
        if pieces != [token]:
            raise ValueError(
                f"vocabulary entry {word!r} splits into {pieces} under the whitespace/punctuation pre-tokenizer; "
                "pass single words or single punctuation characters"
            )
        vocab.setdefault(token, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, EOS_ID)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    logger.info("word tokenizer with %d entries written to %s", len(vocab), out_dir)
    return fast
