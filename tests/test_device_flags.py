"""``--device`` / ``--dtype`` on ``guardserve unlearn``, ``guardserve sae train|select`` and
``guardserve eval``: ``auto`` resolves to CUDA + bfloat16 where CUDA is present and to CPU +
float32 here, impossible choices are one-line usage errors, and the loaders take what was
resolved (eval: the teacher-forced scorer's model, and the dtype of its vLLM engine).
No GPU is needed: CUDA's presence is passed in."""

from __future__ import annotations

import pytest

from guardserve.cli import build_parser, main
from guardserve.unlearn.trainer import UnlearnConfig, resolve_device_dtype


def test_auto_resolution():
    assert resolve_device_dtype("auto", "auto", cuda_available=False) == ("cpu", "float32")
    assert resolve_device_dtype("auto", "auto", cuda_available=True) == ("cuda", "bfloat16")
    assert resolve_device_dtype("cpu", "auto", cuda_available=True) == ("cpu", "float32")
    assert resolve_device_dtype("cuda", "float16", cuda_available=True) == ("cuda", "float16")
    assert resolve_device_dtype("cpu", "bfloat16", cuda_available=False) == ("cpu", "bfloat16")


def test_impossible_choices_are_refused():
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        resolve_device_dtype("cuda", "auto", cuda_available=False)
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_device_dtype("cpu", "float16", cuda_available=True)
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_device_dtype("auto", "float16", cuda_available=False)
    with pytest.raises(ValueError, match="--dtype 'int8'"):
        resolve_device_dtype("cpu", "int8")


def test_cpu_float32_is_the_default_here():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto picks it")
    assert resolve_device_dtype() == ("cpu", "float32")
    cfg = UnlearnConfig()
    assert (cfg.device, cfg.dtype) == ("cpu", "float32")  # the library default does not depend on the machine


@pytest.mark.parametrize("argv", [
    ["unlearn", "--method", "SHRED", "--out", "x"],
    ["sae", "train"],
    ["sae", "select"],
    ["eval"],
])
def test_parsing(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    assert (args.device, args.dtype) == ("auto", "auto")
    args = parser.parse_args([*argv, "--device", "cpu", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cpu", "bfloat16")
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--dtype", "float64"])
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--device", "tpu"])


@pytest.mark.parametrize("argv", [
    ["unlearn", "--method", "SHRED", "--out", "nowhere"],
    ["sae", "train", "--model", "nowhere"],
    ["sae", "select", "--model", "nowhere"],
    ["eval", "--out", "nowhere", "--model", "nowhere"],
])
def test_cli_errors_are_one_line(argv, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Refused before any model, demo or store is touched.
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: --device cuda: CUDA is not available" in err and "\n" not in err
    assert main([*argv, "--device", "cpu", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: --dtype float16 is not supported on CPU" in err and "\n" not in err


def test_loaders_take_the_resolved_choice(tmp_path):
    """A tiny random Llama loads in the dtype asked for; residual activations come back
    float32 on CPU whatever the model runs in."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from guardserve.steering.loading import load_model
    from guardserve.steering.train import residual_activations
    from guardserve.unlearn.trainer import load_causal_lm

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)

    assert next(load_causal_lm(str(tmp_path)).parameters()).dtype == torch.float32
    assert next(load_causal_lm(str(tmp_path), "cpu", "bfloat16").parameters()).dtype == torch.bfloat16
    model, tok = load_model(tmp_path, cap_threads=False, device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    acts = residual_activations(model, tok, ["<s> a b c", "<s> c a"], layer=1)
    assert [a.shape for a in acts] == [(3, 16), (2, 16)]
    assert all(a.dtype == torch.float32 and a.device.type == "cpu" for a in acts)


def _tiny_llama(path):
    """A tiny random Llama with a word-level tokenizer and a one-line chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(path)
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = "<s>{% for m in messages %} {{ m['content'] }}{% endfor %}"
    tok.save_pretrained(path)
    return tok


def test_eval_scorer_takes_the_resolved_choice(tmp_path):
    """The teacher-forced scorer loads its model in the dtype asked for; off the CPU its
    batches go to the model and the logits come back (run here on the CPU: the same losses)."""
    import math

    import torch

    from guardserve.eval.metrics import answer_losses
    from guardserve.eval.runner import Scorer, Served, _OnDevice

    tok = _tiny_llama(tmp_path)
    served = [Served([{"role": "user", "content": "a b"}]), Served([{"role": "user", "content": "c"}])]
    f32 = Scorer(str(tmp_path), tok, {}, None, 100.0)
    assert (f32.device, f32.dtype) == ("cpu", "float32") and next(f32.base.parameters()).dtype == torch.float32
    bf16 = Scorer(str(tmp_path), tok, {}, None, 100.0, device="cpu", dtype="bfloat16")
    assert next(bf16.base.parameters()).dtype == torch.bfloat16
    losses = bf16.losses(served, ["b c", "a"])
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    prompts, answers = [f32._prompt(s) for s in served], ["b c", "a"]
    direct = answer_losses(f32.base, tok, prompts, answers)
    assert answer_losses(_OnDevice(f32.base), tok, prompts, answers) == direct
    assert f32.losses(served, answers) == direct


def test_eval_engine_gets_the_dtype(monkeypatch):
    from types import SimpleNamespace

    import vllm

    from guardserve.eval.runner import Engine

    seen = {}

    class FakeLLM:
        def __init__(self, model, **kw):
            seen.update(kw, model=model)
            self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64))

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    Engine("m", None, {}, None, 100.0, None, 0)
    assert seen["dtype"] == "float32"  # the library default, whatever the machine
    Engine("m", None, {}, None, 100.0, None, 0, dtype="bfloat16")
    assert seen["dtype"] == "bfloat16" and seen["model"] == "m"


@pytest.mark.slow  # needs the demo (its world is the data)
def test_eval_cli_passes_the_resolved_choice(demo, tmp_path, monkeypatch, capsys):
    import torch

    import guardserve.eval.runner as runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got = []

    def fake_run(settings, log=print):
        got.append(settings)
        raise ValueError("stopped before scoring")

    monkeypatch.setattr(runner, "run", fake_run)
    base = ["eval", "--configs", "none", "--adapters", str(tmp_path / "adapters"), "--out", str(tmp_path / "out")]
    assert main(base) == 2 and main([*base, "--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert "stopped before scoring" in capsys.readouterr().err
    assert [(s.device, s.dtype) for s in got] == [("cpu", "float32"), ("cpu", "bfloat16")]
