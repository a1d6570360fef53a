"""Recipe parameters: one YAML file per recipe, validated into a typed object at load.

    params = load_params("params/demo.yaml")

Every ratio and count of METHOD.md is a field whose default is the reference value. Unknown keys,
wrong types and a missing model are errors that name the key, the file and the line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slkit.models.loading import BUILTIN_MODELS, BUILTIN_PREFIX, is_builtin


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_RUN_NAME = re.compile(r"[\w.-]+")  # letters, digits, _, - and .: one directory name
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")  # training.report_to: transformers' integrations slkit names


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 as a float (YAML 1.1 wants 1.0e-4)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


class ParamsError(ValueError):
    """A recipe file that cannot be used; the message names file, line and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelParams(_Section):
    path: str = Field(description="local directory, hub id, or builtin:qwen2.5-coder-0.5b-instruct / "
                                   "builtin:qwen2.5-coder-1.5b-instruct / builtin:tiny-random-llama")
    # auto: bfloat16 on GPUs and on CPUs with bf16 instructions, float32 on other CPUs (where bf16 is slow)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    load_in_4bit: bool = False  # nf4 + double quant through bitsandbytes (QLoRA); needs a CUDA GPU to pay off
    trust_remote_code: bool = False  # runs code shipped with the weights: only for models you trust
    prompt_format: Literal["auto", "chat", "plain"] = "auto"  # auto: the chat template when the tokenizer has one

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str) -> str:
        if is_builtin(value):
            if value[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
                raise ValueError(f"unknown builtin model {value!r}; known: "
                                 + ", ".join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS))
        elif not Path(value).expanduser().is_dir():
            if value.startswith(("/", ".", "~")) or not HUB_ID.match(value):
                raise ValueError(f"{value!r} is neither an existing model directory nor a hub id (org/name)")
        return value


class VLLMParams(_Section):
    """Offline vLLM (engine.backend: vllm). One engine serves every role: LoRA adapters per request."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # share of the GPU vLLM may take (weights + KV cache)
    max_model_len: int | None = Field(None, ge=16)  # None: the model's own limit
    max_num_seqs: int = Field(256, ge=1)  # sequences decoded together
    max_loras: int = Field(2, ge=1)  # adapters in one batch: Generator and Extender share the engine
    max_lora_rank: int | None = Field(None, ge=1)  # None: training.lora_r
    enforce_eager: bool = False  # True skips CUDA graphs: starts ~1 min faster, decodes slower
    tensor_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool = True
    # True: close() puts the engine to sleep (vLLM's sleep mode, level 2), which frees its weights and KV cache
    # inside the process, so training or another engine can follow in it (a plain close frees nothing until
    # the process ends). vLLM's allocator serves one such engine per process: the length-control stage turns it
    # on for its engine before training and off for the scoring engine after; the other stages, one engine per
    # process, need none.
    enable_sleep_mode: bool = False


class EndpointParams(_Section):
    """OpenAI-compatible servers (engine.backend: openai): `vllm serve --enable-lora`, `transformers serve`, ..."""
    base_urls: list[str] = ["http://localhost:8000/v1"]  # requests are spread over these servers
    api: Literal["completions", "chat"] = "completions"  # completions: prompts rendered here, pre-fills work
    model: str | None = None  # the served name of the base model; None: model.path
    api_key_env: str | None = None  # name of the environment variable holding the key (never the key itself)
    # How a role's adapter reaches the servers. load: POST /v1/load_lora_adapter (vLLM with
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; the servers must see the adapter path); named: the servers were
    # started with the names in adapter_names (--lora-modules); none: every role uses the base model.
    adapters: Literal["load", "named", "none"] = "load"
    adapter_names: dict[str, str] = {}
    vllm_sampling: bool = True  # also send top_k, repetition_penalty, min_tokens (vLLM extras; strict servers refuse them)
    concurrency: int = Field(8, ge=1)  # requests in flight per server
    timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(4, ge=0)  # per request and server (the openai client's exponential backoff)


class EngineParams(_Section):
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    batch_size: int = Field(8, ge=1)  # transformers: sequences decoded together; higher is faster and uses more memory
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # transformers on a CPU: int8 weights and activations (torch's dynamic quantisation) for the base model's
    # linear layers while generating; training and LoRA adapters stay in full precision. On a 2-core AVX2 CPU a
    # decode step of the 0.5B at batch 16 takes 0.27 s instead of 0.75 s (bench/cpu_generate.py). Off in the
    # reference, which generates on GPUs.
    cpu_int8: bool = False
    # Layers left in full precision: down_proj's inputs carry a few huge activations that one int8 scale per
    # row cannot hold (on the 0.5B: KL to float32 of 0.31 nats/token with it, 0.04 without it).
    cpu_int8_skip: list[str] = ["down_proj"]
    vllm: VLLMParams = VLLMParams()
    endpoint: EndpointParams = EndpointParams()


class SamplingParams(_Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(20, ge=0)
    repetition_penalty: float = Field(1.1, gt=0)
    max_new_tokens: int = Field(16384, ge=1)
    min_new_tokens: int = Field(0, ge=0)  # 0 lets the model stop when it is done; benchmarks force long outputs
    # The reference's stop strings: any "---" or three newlines end a text. "---" also cuts a markdown table or
    # rule (the text before it must then pass the quality check); ["\n---\n", "\n\n\n"] stops only at a rule line.
    stop: list[str] = ["\n\n---", "\n\n\n", "\n---", "---"]
    # Cut an unfinished last sentence instead of letting the quality check reject the text.
    # Off in the reference; the demo turns it on because its outputs are capped far below a full answer.
    trim_unfinished: bool = False


class QualityParams(_Section):
    """The quality check on every text; defaults are the reference values."""
    check_ending: bool = True  # last character closes a sentence, quote, bracket or code fence
    # Shorter texts fail as "too_short": a refusal ("I'm sorry, but I can't assist...") is no draft to extend.
    # 0 in the reference, whose 7B model does not refuse writing requests; small models do.
    min_words: int = Field(0, ge=0)
    check_repetition: bool = True
    ngram_zh: int = Field(13, ge=2)  # any repeated n-gram of CJK characters / ASCII runs rejects (zh)
    ngram_en: int = Field(10, ge=2)  # any repeated n-gram of whitespace words rejects (en)
    # "revised", "version", ... (en) or 修改后, 以下是, ... (zh: slkit's list, the reference checks English only)
    # in the first/last lines rejects (slkit/quality.py)
    check_meta_talk: bool = True
    meta_head_lines: int = Field(2, ge=0)
    meta_tail_lines: int = Field(3, ge=0)
    # Words of a text that talks about itself ("Here is the revised version...") instead of being the answer,
    # matched case-sensitively in those lines as in the reference (titles such as "Incident Response Plan"
    # pass). English: the reference's five, plus the nouns of slkit's extension template (prompts.EXTENSION),
    # which an Extender echoes when it comments on its task. Chinese: slkit's own list (the reference has
    # none), the same idea with the Chinese template's words; set zh: [] for the reference's behaviour.
    meta_words: dict[Literal["en", "zh"], list[str]] = {
        "en": ["revised", "revision", "response", "version", "paragraph", "draft", "enriched"],
        "zh": ["修改后", "以下是", "扩写", "改写", "初稿", "充实后"],
    }


class QueryParams(_Section):
    exemplar_files: list[str] = []  # jsonl files with a "query" field; empty = the exemplars shipped with slkit
    languages: list[Literal["en", "zh"]] = ["en", "zh"]
    # New queries per language per macro-iteration (the reference runs each language apart, 5,000 per run):
    # an iteration asks for per_language x len(languages) queries.
    per_language: int = Field(5000, ge=1)
    examples_per_prompt: int = Field(2, ge=1)  # pool instructions shown before "Instruction N+1:"
    max_tries: int = Field(10, ge=1)
    judge: bool = True  # ask the model whether the query suits a 2,000+ word article
    min_words: int = Field(3, ge=1)
    max_words: int = Field(500, ge=1)
    grow_pool: bool = True  # accepted queries join the sampling pool of later iterations
    dedup_similarity: float = Field(0.8, gt=0, le=1)  # character 5-gram Jaccard at or above this is a duplicate
    max_new_tokens: int = Field(256, ge=1)


class DraftParams(_Section):
    samples_per_query: int = Field(2, ge=1)
    max_tries: int = Field(20, ge=1)  # quality-check retries per sample
    max_new_tokens: int | None = None  # None: sampling.max_new_tokens
    # The reference's length-biased resampling (U > coefficient * r**exponent, resampling's values) of the
    # drafts before they are extended; the extend stage writes the kept ones to resampled_drafts.jsonl.
    resample: bool = True


class ExtensionParams(_Section):
    micro_iterations: int = Field(3, ge=1)
    min_ratio: float = Field(1.2, gt=1)  # keep the result only if words(best) > min_ratio * words(draft)
    keep_fraction: float = Field(2 / 3, gt=0, le=1)  # stage 1 keeps floor(n x this) of its n paragraphs, at least 1 (its tail drifts)
    max_tries: int = Field(20, ge=1)  # whole-extension retries per job
    samples_per_draft: int = Field(2, ge=1)  # independent extension jobs per draft, each with its own max_tries
    stage1_max_new_tokens: int | None = None  # None: sampling.max_new_tokens
    stage2_max_new_tokens: int | None = None


class ResamplingParams(_Section):
    enabled: bool = True
    coefficient: float = Field(2.0, ge=0)  # keep an item if U(0,1) > coefficient * r**exponent
    exponent: float = Field(3.0, gt=0)


class TrainingParams(_Section):
    # LLaMA-Factory's LoRA defaults of the time, which the reference trained with.
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = Field(1e-4, gt=0)
    epochs: float = Field(4.0, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int = Field(16384, ge=16)  # samples are cut here; memory grows with it
    gradient_checkpointing: bool = True  # non-reentrant; trades ~30% speed for activation memory
    loss: Literal["chunked", "liger", "model"] = "chunked"  # chunked never holds full-vocabulary fp32 logits
    loss_chunk_tokens: int = Field(2048, ge=1)  # fp32 logits exist for this many tokens at a time
    activation_offload: bool = False  # keep checkpointed layer inputs in pinned CPU memory (GPU): longer samples, ~10% slower
    mlp_tile_tokens: int = Field(0, ge=0)  # >0: run each MLP over the sequence in tiles this long, checkpointed (long samples)
    liger_kernels: bool = False  # Liger's fused RMSNorm / SwiGLU / RoPE kernels (CUDA, pip install liger-kernel)
    optimizer: str = "adamw_torch"  # paged_adamw_8bit on GPU saves optimizer memory
    line_keep_prob: float = Field(0.8, gt=0, le=1)  # Extender set: each draft line kept with this probability
    continue_adapters: bool = True  # iteration k starts from iteration k-1's adapters
    min_samples: int = Field(1, ge=1)  # fewer training samples than this skips training (adapters carried over)
    save_steps: int = Field(0, ge=0)  # >0: checkpoint every N steps; a killed training resumes from the last one
    # >1: the train stage runs `accelerate launch` with this many processes (one per GPU) and the config
    # below: ddp, fsdp or zero3 (shipped in slkit/accelerate_configs/) or the path of your own config.
    num_processes: int = Field(1, ge=1)
    accelerate_config: str = "ddp"
    # Where transformers' Trainer sends the training metrics (loss, learning rate, grad norm per step): "none",
    # or tensorboard / wandb / mlflow (one or a list), each when its package is installed (`slkit run` checks).
    # tensorboard writes <iteration dir>/tensorboard/<role>/ (`tensorboard --logdir runs/<run>`); wandb and
    # mlflow use their own settings (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...), one run per adapter.
    # The losses are also in each adapter's slkit-train.json whatever this says.
    report_to: str | list[str] = "none"

    @field_validator("report_to")
    @classmethod
    def _known_integrations(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        unknown = [n for n in names if n not in REPORT_TO or (n == "none" and len(names) > 1)]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))}: give \"none\" alone, or one or a list of "
                             f"{', '.join(REPORT_TO[1:])}")
        return value


class LengthControlParams(_Section):
    """The final stage: queries rewritten to carry a length their response meets, then a last SFT."""
    enabled: bool = False
    min_words: int = Field(2000, ge=1)  # responses kept for the stage, and the bounds' clamp
    max_words: int = Field(8000, ge=1)
    round_to: int = Field(1000, ge=1)  # N, A and B are multiples of this
    coarse_prob: float = Field(0.2, ge=0, le=1)  # N, A and B are multiples of 2 x round_to this often
    proportions: dict[Literal["about", "range", "above", "below"], float] = {
        "about": 0.40, "range": 0.25, "above": 0.10, "below": 0.25}
    rewrite: Literal["template", "model"] = "template"  # model rewrites failing the check fall back to templates
    fresh_adapter: bool = False  # False: continue from the last iteration's Generator adapter
    # The collection pass: this many new self-instructed queries per language (like queries.per_language),
    # answered by the last iteration's Generator, add their drafts to the pairs. The reference's size; 0 skips it.
    collect_queries: int = Field(5000, ge=0)

    @model_validator(mode="after")
    def _window_has_a_true_constraint(self) -> LengthControlParams:
        # Then a range of consecutive multiples is true of every length in the window (length_control.py).
        if self.min_words % self.round_to or self.max_words % self.round_to or self.max_words - self.min_words < self.round_to:
            raise ValueError(f"min_words ({self.min_words}) and max_words ({self.max_words}) must be multiples of "
                             f"round_to ({self.round_to}), at least one round_to apart")
        return self


class JudgeParams(_Section):
    """The quality judge: seven dimensions scored 1-10 as JSON, told to ignore length (slkit/judge.py)."""
    enabled: bool = False
    model: ModelParams | None = None  # None: the run's base model; any slkit engine can run it
    engine: EngineParams | None = None  # None: the run's engine; e.g. backend: openai, endpoint: {api: chat, ...}
    max_tries: int = Field(3, ge=1)  # a reply that is not the JSON asked for is retried, then counted as failed
    max_new_tokens: int = Field(256, ge=16)
    samples_per_query: int = Field(1, ge=1)  # how many of each query's samples are judged


class EvaluationParams(_Section):
    # A jsonl file, a `datasets` hub id (org/name[:split]; one split needs no name) or a builtin
    # (builtin:lengths-mini, slkit's 100-800-word set), in LonGen's or LongBench-Write's format; None skips it.
    benchmark: str | None = "quanshr/LonGen"  # LonGen, the reference's benchmark (240 queries, 2,000-8,000 words)
    baseline: bool = True  # evaluate the untrained base model first (runs/<run>/baseline/), so curves start from it
    benchmark_format: Literal["auto", "longen", "longbench_write"] = "auto"  # auto: by the first record's fields
    subset_size: int | None = Field(None, ge=1)  # None: the whole benchmark; else queries drawn evenly over language x type
    # Queries that ask for more words than this are left out before the subset is drawn. None (the reference):
    # all. For a run whose answers are capped far below the benchmark's targets, where those would score 0
    # whatever the model learned.
    max_required_words: float | None = Field(None, gt=0)
    samples_per_query: int = Field(1, ge=1)  # k > 1 measures length stability (coefficient of variation over k)
    max_new_tokens: int | None = None  # None: sampling.max_new_tokens
    judge: JudgeParams = JudgeParams()


class Params(_Section):
    run_name: str
    macro_iterations: int = Field(3, ge=1)
    seed: int = 0
    output_dir: str = "runs"
    model: ModelParams
    engine: EngineParams = EngineParams()
    sampling: SamplingParams = SamplingParams()
    quality: QualityParams = QualityParams()
    queries: QueryParams = QueryParams()
    drafts: DraftParams = DraftParams()
    extensions: ExtensionParams = ExtensionParams()
    resampling: ResamplingParams = ResamplingParams()
    training: TrainingParams = TrainingParams()
    evaluation: EvaluationParams = EvaluationParams()
    length_control: LengthControlParams = LengthControlParams()

    @field_validator("run_name")
    @classmethod
    def _one_directory_name(cls, value: str) -> str:
        if not _RUN_NAME.fullmatch(value) or ".." in value or value == ".":
            raise ValueError("must be one directory name of letters, digits, '-', '_' and '.', without '..' "
                             "(the run is written to output_dir/run_name; a path belongs in output_dir)")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping key path of a YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = prefix + (str(key.value),)
                lines[path] = key.start_mark.line + 1
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def params_from_dict(data: Any, source: str = "<dict>", text: str | None = None) -> Params:
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: the file must hold a mapping of parameters, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        key_lines = _key_lines(text) if text else {}
        messages = []
        for e in err.errors():
            loc = tuple(str(p) for p in e["loc"])
            key = ".".join(loc) or "<root>"
            line = next((key_lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in key_lines), None)
            where = f"{source}:{line}" if line else source
            what = {"extra_forbidden": "unknown key", "missing": "missing required key"}.get(e["type"], e["msg"])
            messages.append(f"{where}: {key}: {what}" + (f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""))
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(messages)) from None


def load_params(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a recipe; `overrides` maps dotted keys to values (e.g. {"macro_iterations": 1})."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ParamsError(f"{path}: cannot read the params file ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise ParamsError(f"{path}:{mark.line + 1 if mark else '?'}: malformed YAML: {err.problem}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return params_from_dict(data, str(path), text)


def dump_params(params: Params, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(params.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
