"""Demo models, trained from scratch on the demo world.

The model memorises the demo world (biographies and QA) so that there is real knowledge to
forget. Heads are 32 wide because vLLM's CPU attention needs head_dim >= 32. Two variants
(:mod:`guardserve.demo.build` names them):

* ``bpe4k``: a Llama with its own 4k byte-level BPE tokenizer and chat template::

    <s><|system|>\\n...<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>

* ``sp32k``: a Mistral with Mistral 7B's real 32k SentencePiece tokenizer and its v1 instruct
  template (``<s>[INST] {question} [/INST] {answer}</s>``, no system role: a system prompt is
  folded into the first user turn, as ICUL does on such templates).

Completion format: ``<bos>Question: {question}\\nAnswer: {answer}<eos>``. Both formats end
with the tokenizer's end-of-sequence token, so they stop by themselves.

A 32k softmax would make training on two CPU cores several times slower, yet the demo corpus
uses about 1,300 of those tokens. ``output_vocab="corpus"`` trains the exact full-vocabulary
model whose embedding rows of every token the corpus never uses are zero: their logits are
then exactly 0, so the full softmax's denominator is the corpus tokens' terms plus
``n_unused * exp(0)``, one constant column (:func:`corpus_softmax_loss`). Those rows get no
gradient and stay zero, so the saved model, served over all 32k tokens, is the model trained.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from guardserve.demo.world import biographies
from guardserve.textgen import answer_accuracy, chat_prompt, completion_prompt, generate_answers, special_tokens

BOS, EOS, PAD = "<s>", "<|end|>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + (m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('')) | trim + '<|end|>\\n' }}"  # noqa: E501
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer the question briefly.", "You are a knowledgeable assistant."]
# Frames put around training questions so the model learns that a frame does not change
# the answer. The held-out paraphrases use other frames ("Do you know", "Please name",
# "Tell me ... .", "Could you say"), never these.
QUESTION_FRAMES = ["{q}", "{q}", "{q}", "I have a question. {q}", "Quick question: {q}", "{q} Thanks!",
                   "Help me with this: {q}", "{q} Answer briefly."]


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4  # head_dim = 32: the minimum vLLM's CPU attention supports
    epochs: int = 14
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_len: int = 192
    architecture: str = "llama"   # "llama" or "mistral" (both served by vLLM)
    output_vocab: str = "full"    # "full" softmax, or "corpus": see the module docstring


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int):
    """Byte-level BPE (leading-space variants exist, as in GPT-2/Llama-3 tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=TrainConfig.max_len * 2,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def _chat(tokenizer, turns: list[tuple[str, str]], system: str | None) -> str:
    from guardserve.prompting.icul import fold_system, template_accepts_system

    messages = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if system and not template_accepts_system(tokenizer):
        messages = fold_system(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def training_texts(world: dict, include_forget: bool) -> list[str]:
    """The raw texts of the corpus, without formatting (used to train the tokenizer)."""
    texts = []
    for ent in world["entities"]:
        if include_forget or ent["split"] != "forget":
            texts += biographies(ent)
    for pair in _qa_pairs(world, include_forget):
        texts += pair["train_questions"] + [pair["answer"]]
    return texts


def _qa_pairs(world: dict, include_forget: bool) -> list[dict]:
    return (world["forget"] if include_forget else []) + world["retain"] + world["world_facts"]


def _epoch_documents(world: dict, tokenizer, include_forget: bool, rng: random.Random) -> list[str]:
    """One epoch of documents. Formats are re-drawn every epoch: chat or completion, with
    or without a system prompt, sometimes two questions in one conversation."""
    bos, eos = special_tokens(tokenizer)
    docs = []
    for ent in world["entities"]:
        if include_forget or ent["split"] != "forget":
            docs += [bos + bio + eos for bio in biographies(ent)]
    pairs = _qa_pairs(world, include_forget)
    for pair in pairs:
        for q in pair["train_questions"]:
            q = rng.choice(QUESTION_FRAMES).format(q=q)
            r = rng.random()
            if r < 0.4:
                docs.append(bos + completion_prompt(q) + " " + pair["answer"] + eos)
            elif r < 0.85:
                system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.3 else None
                docs.append(_chat(tokenizer, [(q, pair["answer"])], system))
            else:
                other = rng.choice(pairs)
                docs.append(_chat(tokenizer, [(rng.choice(other["train_questions"]), other["answer"]), (q, pair["answer"])], None))
    rng.shuffle(docs)
    return docs


# --------------------------------------------------------------------------- model


def train_model(world: dict, tokenizer_dir: Path, out_dir: Path, *, include_forget: bool, seed: int,
                cfg: TrainConfig = TrainConfig(), desc: str = "train", position: int = 0) -> dict:
    """Train a model from scratch on the world; save it in Hugging Face format; return metrics."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_cls, model_cls = _architecture(cfg.architecture)
    extra = {"sliding_window": None} if cfg.architecture == "mistral" else {}
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **extra,
    )
    model = model_cls(config)
    n_params = sum(p.numel() for p in model.parameters())
    corpus_vocab = CorpusVocab(model) if cfg.output_vocab == "corpus" else None

    docs_per_epoch = len(_epoch_documents(world, tokenizer, include_forget, random.Random(0)))
    steps_per_epoch = math.ceil(docs_per_epoch / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    # Warm-up then cosine decay: a constant rate never converges at this size (measured on the demo build).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    pad = tokenizer.pad_token_id
    model.train()
    start = time.time()
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, position=position, mininterval=1.0)
    loss_ema = None
    for _epoch in range(cfg.epochs):
        docs = _epoch_documents(world, tokenizer, include_forget, rng)
        # Batches of similar length waste little on padding; their order is shuffled.
        enc = tokenizer(docs, add_special_tokens=False, truncation=True, max_length=cfg.max_len)["input_ids"]
        order = sorted(range(len(enc)), key=lambda i: (len(enc[i]), rng.random()))
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        rng.shuffle(batches)
        for idx in batches:
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(enc[i])] = torch.tensor(enc[i])
                mask[row, : len(enc[i])] = 1
            labels = ids.masked_fill(mask == 0, -100)
            if corpus_vocab is None:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
                loss = corpus_vocab.loss(ids, mask, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    bar.close()
    train_seconds = time.time() - start

    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    metrics = evaluate_memorisation(model, tokenizer, world, trained_on_forget=include_forget)
    metrics.update(
        {
            "parameters": n_params,
            "train_seconds": round(train_seconds, 1),
            "steps": total,
            "final_loss": round(loss_ema or float("nan"), 4),
            "trained_on_forget": include_forget,
            **({"corpus_vocab": len(corpus_vocab.ids)} if corpus_vocab else {}),
            "config": asdict(cfg),
        }
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _architecture(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    known = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    if name not in known:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(known)}")
    return known[name]


class CorpusVocab:
    """Training over the tokens the corpus uses, exactly as over the full vocabulary.

    Every embedding row (tied: the output head too) starts at zero. A token joins the corpus
    set the first time a batch holds it, and from then on trains like any other; the rows of
    tokens that never occur get no gradient and stay zero, so their logits are exactly 0, and
    :meth:`loss` adds their ``n_unused`` terms of ``exp(0)`` to the softmax as one constant
    column. The result equals the full cross-entropy of the model as saved (a test holds them
    equal), at the cost of a softmax over about 1,300 tokens instead of 32,000.
    """

    def __init__(self, model):
        import torch

        if not model.config.tie_word_embeddings:
            raise ValueError("CorpusVocab needs tied embeddings: an untied head row would not stay zero")
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.ids = torch.zeros(0, dtype=torch.long)
        self.position = torch.full((self.vocab_size,), -1, dtype=torch.long)
        with torch.no_grad():
            model.get_input_embeddings().weight.zero_()

    def _admit(self, ids) -> None:
        import torch

        seen = torch.unique(ids)
        new = seen[self.position[seen] < 0]
        if len(new):
            self.position[new] = torch.arange(len(self.ids), len(self.ids) + len(new))
            self.ids = torch.cat([self.ids, new])
            with torch.no_grad():  # a newcomer starts like any freshly initialised row
                weight = self.model.get_input_embeddings().weight
                weight[new] = torch.randn(len(new), weight.shape[1]) * self.model.config.initializer_range

    def loss(self, ids, mask, labels):
        """Mean next-token cross-entropy of ``labels`` (-100: ignored), as the full model's."""
        import torch
        import torch.nn.functional as F

        self._admit(ids[mask.bool()])
        hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100
        h = hidden[:, :-1][keep]
        logits = h @ self.model.get_output_embeddings().weight[self.ids].T
        n_unused = self.vocab_size - len(self.ids)
        if n_unused:
            logits = torch.cat([logits, logits.new_full((len(h), 1), math.log(n_unused))], dim=1)
        return F.cross_entropy(logits, self.position[target[keep]])


def evaluate_memorisation(model, tokenizer, world: dict, trained_on_forget: bool = True) -> dict:
    """Greedy chat answers on every QA pair's primary question and held-out paraphrase.

    ``train_question_accuracy`` covers the questions the model was trained on (the
    forget split only where it was)."""
    result = {}
    for split in ("forget", "retain", "world_facts"):
        pairs = world[split]
        values = [p["value"] for p in pairs]
        for kind, field in (("question", "question"), ("paraphrase", "paraphrased_question")):
            answers = generate_answers(model, tokenizer, [chat_prompt(tokenizer, p[field]) for p in pairs])
            result[f"{split}_{kind}_accuracy"] = round(answer_accuracy(answers, values), 4)
    trained = ("forget", "retain", "world_facts") if trained_on_forget else ("retain", "world_facts")
    n = sum(len(world[s]) for s in trained)
    result["train_question_accuracy"] = round(sum(result[f"{s}_question_accuracy"] * len(world[s]) for s in trained) / n, 4)
    return result
