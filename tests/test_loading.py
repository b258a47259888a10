"""Loading: format detection by content, clear errors naming bad tensors, dtypes, tokenizers, presets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from csm.checkpoint import load_checkpoint, resolve_path
from csm.loading import detect_format, load_model, parse_dtype, random_model
from csm.presets import preset
from csm.tokenizer import ByteTokenizer, Llama3Tokenizer, load_tokenizer
from tests.checkpoints import write_llama3_tokenizer, write_sesame


@pytest.fixture
def hf_copy(hf_tiny_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(hf_tiny_dir, path)
    return path


def rewrite(path, edit):
    f = path / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f))


def test_hf_checkpoint_keeps_codec_tensors_out_of_the_model(hf_tiny_dir):
    loaded = load_model(hf_tiny_dir)
    assert loaded.format == "hf"
    names = dict(loaded.model.named_parameters())
    assert not any("codec" in n for n in names)
    assert any(k.startswith("codec_model.") for k in load_file(str(hf_tiny_dir / "model.safetensors")))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "float32"])
def test_dtype_is_selectable(hf_tiny_dir, dtype):
    model = load_model(hf_tiny_dir, dtype=dtype).model
    assert {p.dtype for p in model.parameters()} == {parse_dtype(dtype)}


def test_missing_tensor_is_named(hf_copy):
    rewrite(hf_copy, lambda s: s.pop("backbone_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: backbone\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(hf_copy)


def test_unknown_tensor_is_named(hf_copy):
    rewrite(hf_copy, lambda s: s.__setitem__("backbone_model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unknown tensors: backbone_model\.layers\.0\.extra\.weight"):
        load_model(hf_copy)


def test_misshaped_tensor_is_named(hf_copy):
    rewrite(hf_copy, lambda s: s.__setitem__("lm_head.weight", torch.zeros(7, 3)))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: lm_head\.weight: \[7, 3\]"):
        load_model(hf_copy)


def test_format_is_told_by_content_not_by_name(tmp_path):
    (tmp_path / "csm-1b-hf").mkdir()
    (tmp_path / "csm-1b-hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a CSM checkpoint"):
        detect_format(tmp_path / "csm-1b-hf")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"backbone_flavor": "llama-7B"}))
    (tmp_path / "x" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown transformer flavor 'llama-7B'"):
        load_model(tmp_path / "x")


def test_presets_are_looked_up_exactly():
    assert preset("small").backbone.dim == 512 and preset("small").decoder.n_layers == 2
    real = preset("csm-1b")
    assert (real.backbone.n_layers, real.backbone.dim, real.backbone.n_kv_heads) == (16, 2048, 8)
    assert (real.decoder.n_layers, real.decoder.dim, real.decoder.intermediate_size) == (4, 1024, 8192)
    with pytest.raises(ValueError, match="unknown preset 'CSM-1B'"):
        preset("CSM-1B")
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")


def test_random_model_is_deterministic():
    a, b = random_model("tiny", seed=3).model, random_model("tiny", seed=3).model
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_llama3_tokenizer_wraps_bos_and_eos(tmp_path):
    write_llama3_tokenizer(tmp_path)
    t = load_tokenizer(tmp_path)
    assert isinstance(t, Llama3Tokenizer)
    ids = t.encode("hello")
    assert ids[0] == 3 and ids[-1] == 4 and 2 in ids
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


# ---- which checkpoint runs (csm.checkpoint: the CLI, the deployments and the local services) -----------


@pytest.fixture
def no_weight_env(monkeypatch):
    for name in ("MODEL_PATH", "TOKENIZER_PATH"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_path_given_wins_over_the_environment_and_must_exist(no_weight_env, tmp_path):
    assert resolve_path(None, "MODEL_PATH") is None
    no_weight_env.setenv("MODEL_PATH", str(tmp_path))
    assert resolve_path(None, "MODEL_PATH") == str(tmp_path)
    (tmp_path / "given").mkdir()
    assert resolve_path(str(tmp_path / "given"), "MODEL_PATH") == str(tmp_path / "given")
    no_weight_env.setenv("MODEL_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"MODEL_PATH=.*nowhere: no such file"):
        load_checkpoint(None, None, "tiny", torch.float32, "cpu")


def test_nothing_given_runs_the_random_preset_and_says_so(no_weight_env, caplog):
    loaded, tokenizer = load_checkpoint(None, None, "tiny", torch.float32, "cpu")
    assert (loaded.format, loaded.source) == ("random", "random tiny")
    assert isinstance(tokenizer, ByteTokenizer)
    assert "RANDOM WEIGHTS" in caplog.text


def test_the_tokenizer_comes_with_hf_weights_and_from_tokenizer_path_for_sesame(
    no_weight_env, hf_copy, tmp_path
):
    write_llama3_tokenizer(hf_copy)
    loaded, tokenizer = load_checkpoint(str(hf_copy), None, "tiny", torch.float32, "cpu")
    assert loaded.format == "hf" and isinstance(tokenizer, Llama3Tokenizer)
    sesame = write_sesame(loaded.model, tmp_path / "sesame", "tiny-backbone", "tiny-decoder")
    no_weight_env.setenv("MODEL_PATH", str(sesame))
    with pytest.raises(ValueError, match="Sesame-format checkpoint: it needs TOKENIZER_PATH"):
        load_checkpoint(None, None, "tiny", torch.float32, "cpu")
    no_weight_env.setenv("TOKENIZER_PATH", str(hf_copy))
    loaded, tokenizer = load_checkpoint(None, None, "tiny", torch.float32, "cpu")
    assert loaded.format == "sesame" and isinstance(tokenizer, Llama3Tokenizer)
