"""Real tokenizers without a model download: Mistral's, as ``mistral_common`` ships them.

Everything else in the demo runs on a tokenizer guardserve trained itself. These are the
tokenizers of real models, so that tokenizer-sensitive parts (the logit filter, chat
templates, ICUL) are tested against what production models use:

* :func:`sp32k_tokenizer`: Mistral 7B v0.1's 32k SentencePiece BPE (``tokenizer.model.v1``:
  ``▁`` for spaces, digits split, byte fallback for whatever the vocabulary lacks) as a
  ``LlamaTokenizerFast``, with a Mistral-Instruct v1 chat template that refuses a system
  message, as the real one does.
* :func:`tekken_tokenizer`: Mistral's 131k tiktoken-style ``tekken_240911.json``, converted
  by transformers' own ``convert_tekken_tokenizer``, with the chat template mistral_common
  generates for it (which does accept a system message).

Conversion takes seconds, so the result is saved under ``$GUARDSERVE_HOME/tokenizers/`` and
read back from there afterwards.

>>> tok = sp32k_tokenizer()                                     # doctest: +SKIP
>>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)  # doctest: +SKIP
'<s>[INST] Hi [/INST]'
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from guardserve import config

# Bumped whenever the conversion below changes, so a cached copy is rebuilt.
_VERSION = "1"

# Mistral-Instruct v1 (mistral_common's ``InstructTokenizerV1``): ``<s>[INST] {user} [/INST]
# {assistant}</s>[INST] ...``. The space before the answer is the SentencePiece dummy prefix
# mistral_common gives every message it encodes on its own, so the template's text tokenises
# to exactly mistral_common's ids. Roles alternate user/assistant, starting with the user; any
# other role, a system message included, raises, as the v1 template on the Hugging Face hub does.
SP32K_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('System messages are not supported by this chat template (Mistral v1): "
    "roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set content = message['content'] if message['content'] is string "
    "else message['content'] | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content | trim + eos_token }}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported') }}"
    "{% endif %}"
    "{% endfor %}"
)

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def mistral_common_file(name: str) -> Path:
    """A tokenizer file shipped inside the installed ``mistral_common`` package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in this mistral_common ({mistral_common.__version__}): {path}")
    return path


def cache_dir(name: str) -> Path:
    """Where the converted tokenizer ``name`` is kept: ``$GUARDSERVE_HOME/tokenizers/<name>-v<n>``."""
    return config.home() / "tokenizers" / f"{name}-v{_VERSION}"


def _convert_sp32k():
    """``tokenizer.model.v1`` -> ``LlamaTokenizerFast``.

    transformers' ``SentencePieceExtractor`` reads the vocabulary; the merges are ordered by
    SentencePiece's piece scores (``generate_merges`` with the scores), as SentencePiece's BPE
    applies them. Ordered by piece id instead (what ``LlamaTokenizerFast.from_pretrained`` on
    the ``.model`` does in transformers 5), runs of spaces come out differently, because
    Mistral scores its whitespace pieces ``▁▁``, ``▁▁▁``, ... last; and ``LlamaConverter``
    itself fails on a BPE model in transformers 5 (it passes the scores where
    ``SentencePieceExtractor.extract`` expects the model class).
    """
    from transformers import LlamaTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor
    from transformers.tokenization_utils_base import generate_merges

    proto = SentencePieceExtractor(str(mistral_common_file("tokenizer.model.v1"))).proto
    if proto.trainer_spec.model_type != 2 or not proto.trainer_spec.byte_fallback:
        raise ValueError("expected Mistral's SentencePiece BPE model with byte fallback")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, dict(pieces))
    # The pad token: none in the vocabulary. ``<unk>`` and not ``</s>``: with byte fallback
    # no text ever encodes to ``<unk>``, so masking padding (labels -100 where the id is the
    # pad id) never masks a real token; with ``</s>`` it would also mask every end of answer,
    # and a model fine-tuned that way would not learn to stop.
    tok = LlamaTokenizerFast(
        vocab=vocab,
        merges=merges,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        # "always": the dummy prefix ``▁`` on every text segment, after special tokens too,
        # as mistral_common encodes each message on its own (``</s>[INST]`` -> ``▁[``).
        legacy=True,
        add_prefix_space=True,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        padding_side="left",
    )
    # ``legacy`` is not among the arguments transformers writes to tokenizer_config.json;
    # without it a reloaded copy would prepend ``▁`` to the first segment only.
    tok.init_kwargs["legacy"] = True
    tok.chat_template = SP32K_CHAT_TEMPLATE
    return tok


def _convert_tekken():
    """``tekken_240911.json`` -> transformers' own tekken conversion (byte-level BPE) with the
    chat template mistral_common generates for it."""
    from transformers.integrations.mistral import convert_tekken_tokenizer

    return convert_tekken_tokenizer(str(mistral_common_file("tekken_240911.json")))


def _cached(name: str, convert, out_dir: str | os.PathLike | None):
    from transformers import AutoTokenizer

    with _lock:
        path = cache_dir(name)
        tok = _loaded.get(str(path))
        if tok is None:
            if not (path / "tokenizer_config.json").is_file():
                fresh = convert()
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
                try:
                    fresh.save_pretrained(tmp)
                    try:
                        tmp.rename(path)  # atomic: another process sees all of it or nothing
                    except OSError:
                        if not (path / "tokenizer_config.json").is_file():
                            raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            # Read back from disk even right after converting: what a server loading the saved
            # directory gets is what is used and tested here.
            tok = AutoTokenizer.from_pretrained(str(path))
            _loaded[str(path)] = tok
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def sp32k_tokenizer(out_dir: str | os.PathLike | None = None):
    """Mistral's 32k SentencePiece tokenizer (``tokenizer.model.v1``) as a Hugging Face
    ``LlamaTokenizerFast`` with the v1 instruct chat template (:data:`SP32K_CHAT_TEMPLATE`).

    ``pad_token`` is ``<unk>`` (see :func:`_convert_sp32k`). Saved to ``out_dir`` with
    ``save_pretrained`` when given. The same object is returned on every call: do not modify it.
    """
    return _cached("mistral-sp32k", _convert_sp32k, out_dir)


def tekken_tokenizer(out_dir: str | os.PathLike | None = None):
    """Mistral's 131k tekken tokenizer (``tekken_240911.json``), converted by transformers'
    ``convert_tekken_tokenizer``, with mistral_common's chat template for it."""
    return _cached("mistral-tekken131k", _convert_tekken, out_dir)
