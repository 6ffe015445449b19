"""``--device`` / ``--dtype`` on ``guardserve unlearn`` and ``guardserve sae train|select``:
``auto`` resolves to CUDA + bfloat16 where CUDA is present and to CPU + float32 here,
impossible choices are one-line usage errors, and the loaders take what was resolved.
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
