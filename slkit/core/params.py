"""Recipe parameters: one YAML file per recipe, validated into a typed object at load.

    params = load_params("params/demo.yaml")

Every ratio and count of docs/method.md is a field whose default is the reference value. Each field is a
`setting`: default, description, unit and the method's value side by side (`slkit check --explain`,
docs/params.md). Unknown keys, wrong types and a missing model are errors that name the key, the file and
the line.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slkit.core.builtins import BUILTIN_MODELS, BUILTIN_PREFIX, is_builtin

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


NO_REFERENCE: Any = object()  # `reference=` of a setting the method does not have (slkit's own, or infrastructure)


def setting(default: Any, description: str, *, unit: str, reference: Any, **constraints: Any) -> Any:
    """A params field documented as data: its default, what it means, its unit ("none" for switches, names and
    choices) and the method's value (NO_REFERENCE where the method has no such setting). The reference value is
    the one that reproduces the reference's behaviour; it is the default, unless the description says why not.
    `slkit check --explain` and docs/params.md print them (slkit/running/explain.py)."""
    extra = {"unit": unit} if reference is NO_REFERENCE else {"unit": unit, "reference": reference}
    # One line: section descriptions are their class docstrings.
    return Field(default, description=" ".join(description.split()), json_schema_extra=extra, **constraints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelParams(_Section):
    """The base model: both roles (Generator and Extender) are it plus their own LoRA adapter."""
    path: str = setting(..., "A local directory, a hub id (org/name), or builtin:qwen2.5-coder-0.5b-instruct / "
                             "builtin:qwen2.5-coder-1.5b-instruct / builtin:tiny-random-llama. The paper's models "
                             "are Qwen2-7B-Instruct and Llama-3.1-8B-Instruct.", unit="none", reference=NO_REFERENCE)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "bfloat16", "Weights' dtype. auto: bfloat16 on GPUs and on CPUs with bf16 instructions, float32 on other CPUs "
        "(where bf16 is slow).", unit="none", reference="bfloat16")
    load_in_4bit: bool = setting(False, "Load the base model in 4 bits (nf4 + double quant through bitsandbytes: "
                                        "QLoRA), so a 7B model trains on 24 GB; needs a CUDA GPU to pay off. The "
                                        "reference trains bf16 LoRA.", unit="none", reference=False)
    trust_remote_code: bool = setting(False, "Run code shipped with the weights: only for models you trust.",
                                      unit="none", reference=NO_REFERENCE)
    prompt_format: Literal["auto", "chat", "plain"] = setting(
        "auto", "How a user turn is rendered. auto: the chat template when the tokenizer has one, else plain text.",
        unit="none", reference=NO_REFERENCE)

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
    gpu_memory_utilization: float = setting(0.85, "Share of the GPU's memory vLLM may take (weights + KV cache).",
                                            unit="ratio", reference=NO_REFERENCE, gt=0, le=1)
    max_model_len: int | None = setting(None, "Longest prompt + output vLLM accepts. None: the model's own limit.",
                                        unit="tokens", reference=NO_REFERENCE, ge=16)
    max_num_seqs: int = setting(256, "Sequences decoded together.", unit="sequences", reference=NO_REFERENCE, ge=1)
    max_loras: int = setting(2, "Adapters in one batch: the Generator and the Extender share the engine.",
                             unit="adapters", reference=NO_REFERENCE, ge=1)
    max_lora_rank: int | None = setting(None, "Largest LoRA rank served. None: training.lora_r.", unit="rank",
                                        reference=NO_REFERENCE, ge=1)
    enforce_eager: bool = setting(False, "True skips CUDA graphs: starts ~1 min faster, decodes slower.",
                                  unit="none", reference=NO_REFERENCE)
    compilation_config: dict[str, Any] | None = setting(
        None, "vLLM's compilation config, handed over as it is (LLM(compilation_config=...), `vllm serve "
        "--compilation-config JSON`); e.g. fewer cudagraph_capture_sizes and cudagraph_specialize_lora: false capture "
        "fewer CUDA graphs, so the engine starts sooner. None: vLLM's defaults.", unit="none", reference=NO_REFERENCE)
    tensor_parallel_size: int | None = setting(
        None, "GPUs one copy of the model is split over (tensor parallel). None: 1 when the model fits one GPU's "
        "share (gpu_memory_utilization), else the fewest GPUs that hold it.", unit="GPUs", reference=NO_REFERENCE, ge=1)
    data_parallel_size: int | None = setting(
        None, "Copies of the model the run's server spreads requests over (data parallel), each on "
        "tensor_parallel_size GPUs. None: every visible GPU is used (visible GPUs // tensor_parallel_size).",
        unit="copies", reference=NO_REFERENCE, ge=1)
    server: bool = setting(
        True, "true: `slkit run` starts one `vllm serve` for the whole run and every stage sends its requests there "
        "(slkit.engines.server); false: each stage starts its own in-process vLLM engine.", unit="none",
        reference=NO_REFERENCE)
    port: int | None = setting(None, "Port of the run's server on 127.0.0.1. None: a free one.", unit="port",
                               reference=NO_REFERENCE, ge=1, le=65535)
    start_timeout_s: float = setting(1200.0, "Seconds the run's server may take to answer /health before the run "
                                             "stops with its log's last lines.", unit="seconds",
                                     reference=NO_REFERENCE, gt=0)
    sleep_during_training: Literal["auto", "always", "never"] = setting(
        "auto", "Whether the run's server sleeps (level 1: weights to CPU memory, KV cache freed) while adapters "
        "train beside it. auto: when gpu_memory_utilization is above 0.5 (training would not fit beside it); "
        "never: training uses what the server leaves.", unit="none", reference=NO_REFERENCE)
    enable_prefix_caching: bool = setting(True, "Reuse the KV cache of shared prompt prefixes (the extension "
                                                "template, the self-instruct examples).", unit="none",
                                          reference=NO_REFERENCE)


class EndpointParams(_Section):
    """OpenAI-compatible servers (engine.backend: openai): `vllm serve --enable-lora`, `transformers serve`, ..."""
    base_urls: list[str] = setting(["http://localhost:8000/v1"], "The servers' URLs; requests are spread over them.",
                                   unit="none", reference=NO_REFERENCE)
    api: Literal["completions", "chat"] = setting(
        "completions", "Which API is called. completions: prompts are rendered here, so pre-fills (extension phase "
        "2) work; chat: the server renders them.", unit="none", reference=NO_REFERENCE)
    model: str | None = setting(None, "The served name of the base model. None: model.path.", unit="none",
                                reference=NO_REFERENCE)
    api_key_env: str | None = setting(None, "Name of the environment variable holding the API key (never the key "
                                            "itself). None: no key.", unit="none", reference=NO_REFERENCE)
    adapters: Literal["load", "named", "none"] = setting(
        "load", "How a role's adapter reaches the servers. load: POST /v1/load_lora_adapter (vLLM with "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; the servers must see the adapter path); named: the servers were "
        "started with the names in adapter_names (--lora-modules); none: every role uses the base model.",
        unit="none", reference=NO_REFERENCE)
    adapter_names: dict[str, str] = setting({}, "Served adapter name per role (generator, extender) when adapters "
                                                "is named.", unit="none", reference=NO_REFERENCE)
    vllm_sampling: bool = setting(True, "Also send top_k, repetition_penalty and min_tokens (vLLM's extras; strict "
                                        "servers refuse them, and then those settings are not applied).",
                                  unit="none", reference=NO_REFERENCE)
    concurrency: int = setting(8, "Requests in flight per server.", unit="requests", reference=NO_REFERENCE, ge=1)
    timeout_s: float = setting(600.0, "Time a request may take before it is retried.", unit="seconds",
                               reference=NO_REFERENCE, gt=0)
    max_retries: int = setting(4, "Retries per request and server (the openai client's exponential backoff).",
                               unit="retries", reference=NO_REFERENCE, ge=0)


class EngineParams(_Section):
    """How text is generated: the backend and its settings. Engines change speed and memory, not the method."""
    backend: Literal["transformers", "vllm", "openai"] = setting(
        "transformers", "transformers: in this process, GPU or CPU; vllm: offline vLLM (engine.vllm); openai: "
        "OpenAI-compatible servers (engine.endpoint).", unit="none", reference=NO_REFERENCE)
    batch_size: int = setting(8, "transformers: sequences decoded together; higher is faster and uses more memory.",
                              unit="sequences", reference=NO_REFERENCE, ge=1)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "Where transformers generates and trains. auto: a CUDA "
                                                             "GPU when there is one.", unit="none",
                                                     reference=NO_REFERENCE)
    cpu_int8: bool = setting(
        False, "transformers on a CPU: int8 weights and activations (torch's dynamic quantisation) for the base "
        "model's linear layers while generating; training and LoRA adapters stay in full precision. On a 2-core "
        "AVX2 CPU a decode step of the 0.5B at batch 16 takes 0.27 s instead of 0.75 s (bench/cpu_generate.py). "
        "Off in the reference, which generates on GPUs in full precision.", unit="none", reference=False)
    cpu_int8_skip: list[str] = setting(
        ["down_proj"], "Layers cpu_int8 leaves in full precision: down_proj's inputs carry a few huge activations "
        "that one int8 scale per row cannot hold (on the 0.5B: KL to float32 of 0.31 nats/token with it, 0.04 "
        "without it).", unit="none", reference=NO_REFERENCE)
    vllm: VLLMParams = setting(VLLMParams(), VLLMParams.__doc__, unit="none", reference=NO_REFERENCE)
    endpoint: EndpointParams = setting(EndpointParams(), EndpointParams.__doc__, unit="none", reference=NO_REFERENCE)


class SamplingParams(_Section):
    """Decoding for every generation (queries, drafts, extensions, benchmark answers); defaults are the reference's."""
    temperature: float = setting(0.7, "Softmax temperature; 0 decodes greedily.", unit="none", reference=0.7, ge=0)
    top_p: float = setting(0.8, "Nucleus sampling: sample among the most likely tokens that together hold this "
                                "probability.", unit="probability", reference=0.8, gt=0, le=1)
    top_k: int = setting(20, "Sample among this many most likely tokens; 0: all.", unit="tokens", reference=20, ge=0)
    repetition_penalty: float = setting(1.1, "Divides the logits of tokens already in the text (1: none).",
                                        unit="none", reference=1.1, gt=0)
    max_new_tokens: int = setting(16384, "Cap on one generation; a stage's own max_new_tokens overrides it.",
                                  unit="tokens", reference=16384, ge=1)
    min_new_tokens: int = setting(0, "The end-of-text token is held back until this many tokens are out. 0 lets the "
                                     "model stop when it is done; benchmarks force long outputs.", unit="tokens",
                                  reference=0, ge=0)
    stop: list[str] = setting(
        ["\n\n---", "\n\n\n", "\n---", "---"], "Strings that end a text. The reference's: any \"---\" or three "
        "newlines. \"---\" also cuts a markdown table or rule (the text before it must then pass the quality "
        "check); [\"\\n---\\n\", \"\\n\\n\\n\"] stops only at a rule line.", unit="none",
        reference=["\n\n---", "\n\n\n", "\n---", "---"])
    trim_unfinished: bool = setting(
        False, "Cut an unfinished last sentence instead of letting the quality check reject the text. Off in the "
        "reference; the demo turns it on because its outputs are capped far below a full answer.", unit="none",
        reference=False)


class QualityParams(_Section):
    """The quality check on every text; defaults are the reference values."""
    check_ending: bool = setting(True, "Reject a text whose last character is not one of its language's "
                                       "ending_chars (cut off mid-sentence).", unit="none", reference=True)
    ending_chars: dict[Literal["en", "zh"], str] = setting(
        {"en": ".!?,;:-\"')]}>`", "zh": "。！？”)]}>）】’…`"},
        "Characters a text may end with, per language: the reference's English set (which also lets a text end in "
        ", ; : - >) and its Chinese set (which has no ASCII . ! ? \" ' and no 」』》). A closing code fence ends in "
        "a backtick (docs/method.md, \"The quality check\").", unit="none", reference={"en": ".!?,;:-\"')]}>`", "zh": "。！？”)]}>）】’…`"})
    min_words: int = setting(
        0, "Shorter texts fail as \"too_short\": a refusal (\"I'm sorry, but I can't assist...\") is no draft to "
        "extend. 0 in the reference, whose 7B model does not refuse writing requests; small models do.",
        unit="words", reference=0, ge=0)
    check_repetition: bool = setting(True, "Reject a text in which an n-gram occurs twice.", unit="none",
                                     reference=True)
    ngram_zh: int = setting(13, "n of the repetition check for Chinese: n-grams of CJK characters and ASCII runs.",
                            unit="characters", reference=13, ge=2)
    ngram_en: int = setting(10, "n of the repetition check for English: n-grams of whitespace-separated words.",
                            unit="words", reference=10, ge=2)
    check_meta_talk: bool = setting(
        True, "Reject a text with a meta_words word in its first meta_head_lines or last meta_tail_lines lines "
        "(slkit/method/quality.py).", unit="none", reference=True)
    meta_head_lines: int = setting(2, "First lines searched for meta-talk; blank lines count, as in the reference "
                                      "(a title, a blank line, then the body: only the title is searched).",
                                   unit="lines", reference=2, ge=0)
    meta_tail_lines: int = setting(3, "Last lines searched for meta-talk; blank lines count, as in the reference.",
                                   unit="lines", reference=3, ge=0)
    meta_words: dict[Literal["en", "zh"], list[str]] = setting(
        {"en": ["revised", "revision", "response", "version", "paragraph", "outline", "enriched"],
         "zh": ["修改后", "以下是", "扩写", "改写", "大纲", "充实后"]},
        "Words of a text that talks about itself (\"Here is the revised version...\") instead of being the answer, "
        "matched case-sensitively as in the reference (titles such as \"Incident Response Plan\" pass). English: "
        "the reference's five, plus the nouns of the extension template (prompts.EXTENSION), which an Extender "
        "echoes when it comments on its task. Chinese: slkit's own list (the reference has none), the same idea "
        "with the Chinese template's words; set zh: [] and en: the five for the reference's behaviour.",
        unit="none", reference={"en": ["revised", "revision", "response", "version", "paragraph"], "zh": []})


class QueryParams(_Section):
    """Query synthesis (self-instruct): new writing requests imitating a pool of exemplars, judged and filtered."""
    exemplar_files: list[str] = setting(
        [], "jsonl files with a \"query\" field (and \"language\") to imitate; empty: the exemplars shipped with "
        "slkit (slkit/core/exemplars; the reference's pool holds 10 per language).", unit="none",
        reference=NO_REFERENCE)
    languages: list[Literal["en", "zh"]] = setting(
        ["en", "zh"], "Languages of the queries; slots advance through them together. The reference runs one "
        "language per run.", unit="none", reference=NO_REFERENCE)
    per_language: int = setting(
        5000, "New queries per language per macro-iteration (the reference runs each language apart, 5,000 per "
        "run): an iteration asks for per_language x len(languages) queries.", unit="queries", reference=5000, ge=1)
    examples_per_prompt: int = setting(2, "Pool instructions shown before \"Instruction N+1:\".", unit="queries",
                                       reference=2, ge=1)
    max_tries: int = setting(10, "Candidates per query slot before it is given up.", unit="tries", reference=10, ge=1)
    judge: bool = setting(True, "Ask the model whether the query suits an article of over 2,000 words; keep it only "
                                "on a yes.", unit="none", reference=True)
    min_words: int = setting(3, "Shorter candidates are rejected.", unit="words", reference=3, ge=1)
    max_words: int = setting(500, "Longer candidates are rejected.", unit="words", reference=500, ge=1)
    grow_pool: bool = setting(
        False, "True: the queries accepted in earlier iterations join the exemplar pool. The reference never grows "
        "the pool across iterations (every run reloads its seeds); within a run its Qwen script adds each accepted "
        "query to the pool for the rest of a batch of 500 and its Llama script samples the seeds only. slkit's "
        "pool is fixed within a stage, as the Llama script's, so a resumed stage replays the same prompts.",
        unit="none", reference=False)
    dedup_similarity: float = setting(
        0.8, "A candidate whose character 5-gram Jaccard similarity to an earlier query is at or above this is a "
        "duplicate. slkit's addition: the reference never deduplicates.", unit="ratio", reference=NO_REFERENCE,
        gt=0, le=1)
    max_new_tokens: int = setting(256, "Cap on a generated query.", unit="tokens", reference=NO_REFERENCE, ge=1)


class DraftParams(_Section):
    """Drafts: the Generator answers each query; answers that fail the quality check are retried."""
    samples_per_query: int = setting(2, "Drafts per query.", unit="samples", reference=2, ge=1)
    max_tries: int = setting(20, "Tries per sample to pass the quality check.", unit="tries", reference=20, ge=1)
    max_new_tokens: int | None = setting(None, "Cap on a draft. None: sampling.max_new_tokens.", unit="tokens",
                                         reference=None)
    resample: bool = setting(
        True, "The reference's length-biased resampling (U > coefficient * r**exponent, resampling's values) of the "
        "drafts before they are extended; the extensions stage writes the kept ones to resampled_drafts.jsonl.",
        unit="none", reference=True)
    finish_share: float = setting(
        0.95, "The stage ends once this share of its drafts (query x sample) have ended, passed or out of tries; the "
        "few still being retried are dropped instead of holding the GPU alone. 1: wait for every one.",
        unit="ratio", reference=0.95, gt=0, le=1)


class ExtensionParams(_Section):
    """Extension: the Extender lengthens a draft in two phases per micro-iteration, kept when min_ratio times
    longer."""
    micro_iterations: int = setting(3, "Micro-iterations per try; each extends the best text so far.",
                                    unit="micro-iterations", reference=3, ge=1)
    min_ratio: float = setting(1.2, "Keep the result only if words(best) > min_ratio x words(draft); else try again.",
                               unit="ratio", reference=1.2, gt=1)
    keep_fraction: float = setting(2 / 3, "Phase 1 keeps floor(n x this) of its n paragraphs (pieces between blank "
                                          "lines; none of one), verbatim: its tail drifts.", unit="ratio",
                                   reference=2 / 3, gt=0, le=1)
    max_tries: int = setting(20, "Tries per job: each try extends the draft afresh.", unit="tries", reference=20,
                             ge=1)
    samples_per_draft: int = setting(2, "Independent extension jobs per draft, each with its own max_tries.",
                                     unit="samples", reference=2, ge=1)
    phase1_max_new_tokens: int | None = setting(None, "Cap on phase 1 (the enriched former half). None: "
                                                      "sampling.max_new_tokens.", unit="tokens", reference=None)
    phase2_max_new_tokens: int | None = setting(None, "Cap on phase 2 (the continuation after the pre-fill). None: "
                                                      "sampling.max_new_tokens.", unit="tokens", reference=None)
    finish_share: float = setting(
        0.95, "The stage ends once this share of its jobs have ended, kept or out of tries; the few still running "
        "are dropped instead of holding the GPU alone. 1: wait for every one.", unit="ratio", reference=0.95, gt=0,
        le=1)


class ResamplingParams(_Section):
    """Length-biased resampling: with r = 1 - rank/N (near 1 for the shortest), keep an item if U(0,1) >
    coefficient * r**exponent. Ranked by words within each language (the reference: by characters, one language
    per run)."""
    enabled: bool = setting(True, "Resample the extensions before they become training sets (drafts.resample does "
                                  "the drafts).", unit="none", reference=True)
    coefficient: float = setting(2.0, "c of U > c * r**exponent; higher drops more short items.", unit="none",
                                 reference=2.0, ge=0)
    exponent: float = setting(3.0, "Exponent of r in U > coefficient * r**exponent.", unit="none", reference=3.0,
                              gt=0)


class TrainingParams(_Section):
    """LoRA training of the Generator and the Extender; the reference's values are LLaMA-Factory's LoRA defaults of
    the time. Settings without a reference change memory and speed, not what is learned."""
    lora_r: int = setting(8, "LoRA rank.", unit="rank", reference=8, ge=1)
    lora_alpha: int = setting(16, "LoRA alpha: the update is scaled by alpha / r.", unit="none", reference=16, ge=1)
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input.", unit="probability", reference=0.0, ge=0, lt=1)
    target_modules: str | list[str] = setting("all-linear", "Layers that get an adapter: all-linear or a list of "
                                                            "module names.", unit="none", reference="all-linear")
    learning_rate: float = setting(1e-4, "Peak learning rate (AdamW).", unit="none", reference=1e-4, gt=0)
    epochs: float = setting(4.0, "Passes over each training set.", unit="epochs", reference=4.0, gt=0)
    lr_scheduler: str = setting("cosine", "transformers' lr_scheduler_type.", unit="none", reference="cosine")
    warmup_ratio: float = setting(0.1, "Share of the steps that warm the learning rate up from 0.", unit="ratio",
                                  reference=0.1, ge=0, le=1)
    batch_size: int = setting(1, "Samples per device per step (padded to the longest of the step: 1 holds one "
                                 "sample in memory at a time).", unit="samples", reference=1, ge=1)
    gradient_accumulation: int = setting(
        8, "Steps whose gradients are summed before an update: the global batch is batch_size x gradient_accumulation "
        "x num_processes. The reference trains at batch 1 on every GPU of its nodes (LLaMA-Factory under torchrun, 8 "
        "GPUs a node): a global batch of 8 or more. On one GPU, 8 accumulated steps give that batch at one sample's "
        "memory; with num_processes N, 8 / N does.", unit="steps", reference=8, ge=1)
    max_length: int = setting(16384, "Samples are cut here; memory grows with it.", unit="tokens", reference=16384,
                              ge=16)
    group_by_length: bool = setting(False, "Batch samples of like length together, so batch_size > 1 pads little "
                                           "(transformers' LengthGroupedSampler: random groups of up to 50 batches, "
                                           "each sorted by length; the longest batch first). Off: random order, as "
                                           "the reference.", unit="none", reference=NO_REFERENCE)
    adapters_at_once: bool = setting(False, "Train the Generator and the Extender at the same time, in two "
                                            "processes on the same GPU (twice the training memory; with "
                                            "num_processes > 1 they train one after the other). The same adapters; "
                                            "measured no faster for a 1.5B on an H200 (docs/benchmarks.md).",
                                     unit="none", reference=NO_REFERENCE)
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward pass (non-reentrant): "
                                                 "trades ~30% speed for activation memory.", unit="none",
                                           reference=NO_REFERENCE)
    activation_offload: bool = setting(False, "TRL's activation offloading: checkpointed layer inputs wait in pinned "
                                              "CPU memory, copied on a side stream (GPU): longer samples fit.",
                                       unit="none", reference=NO_REFERENCE)
    mlp_tile_tokens: int = setting(0, ">0: run each MLP over the sequence in tiles this long, checkpointed (long "
                                      "samples); 0: off.", unit="tokens", reference=NO_REFERENCE, ge=0)
    liger_kernels: bool = setting(False, "Liger's fused RMSNorm / SwiGLU / RoPE kernels through transformers' "
                                         "use_liger_kernel (CUDA, pip install liger-kernel).", unit="none",
                                  reference=NO_REFERENCE)
    optimizer: str = setting("adamw_torch", "transformers' optim name; paged_adamw_8bit on a GPU saves optimizer "
                                            "memory.", unit="none", reference=NO_REFERENCE)
    line_keep_prob: float = setting(0.8, "Extender set: each draft line is kept with this probability, so the "
                                         "Extender learns to add, not copy.", unit="probability", reference=0.8,
                                    gt=0, le=1)
    continue_adapters: bool = setting(True, "Iteration k starts from iteration k-1's adapters.", unit="none",
                                      reference=True)
    min_samples: int = setting(1, "Fewer training samples than this skips training (the adapters are carried "
                                  "over).", unit="samples", reference=NO_REFERENCE, ge=1)
    save_steps: int = setting(0, ">0: a checkpoint every N steps, so a killed training resumes from the last one; "
                                 "0: none.", unit="steps", reference=NO_REFERENCE, ge=0)
    gpu_memory_fraction: float | None = setting(
        None, "Cap on the GPU memory one training process may allocate, as a share of the card "
        "(torch.cuda.set_per_process_memory_fraction): measures what a smaller card would allow. None: no cap.",
        unit="ratio", reference=NO_REFERENCE, gt=0, le=1)
    num_processes: int = setting(1, ">1: the training stage runs `accelerate launch` with this many processes (one "
                                    "per GPU) and accelerate_config.", unit="processes", reference=NO_REFERENCE, ge=1)
    accelerate_config: str = setting("ddp", "With num_processes > 1: ddp, fsdp or zero3 (shipped in "
                                            "slkit/training/accelerate_configs/) or the path of your own config.",
                                     unit="none", reference=NO_REFERENCE)
    report_to: str | list[str] = setting(
        "none", "Where transformers' Trainer sends the training metrics (loss, learning rate, grad norm per step): "
        "none, or tensorboard / wandb / mlflow (one or a list), each when its package is installed (`slkit run` "
        "checks). tensorboard writes <iteration dir>/tensorboard/<role>/; wandb and mlflow use their own settings "
        "(WANDB_PROJECT, MLFLOW_TRACKING_URI), one run per adapter. The losses are also in each adapter's "
        "slkit-train.json.", unit="none", reference=NO_REFERENCE)

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
    enabled: bool = setting(
        False, "Run the final stage after the last macro-iteration. Off by default because it is a separate, long "
        "step (a collection pass and one more SFT), as the reference's own scripts are; turn it on to replicate "
        "the paper's length control.", unit="none", reference=True)
    min_words: int = setting(2000, "Responses shorter than this are left out, and the constraints' bounds are "
                                   "clamped to it.", unit="words", reference=2000, ge=1)
    max_words: int = setting(8000, "Responses longer than this are left out, and the constraints' bounds are "
                                   "clamped to it.", unit="words", reference=8000, ge=1)
    round_to: int = setting(1000, "N, A and B are multiples of this.", unit="words", reference=1000, ge=1)
    coarse_prob: float = setting(0.2, "N, A and B are multiples of 2 x round_to this often.", unit="probability",
                                 reference=0.2, ge=0, le=1)
    proportions: dict[Literal["about", "range", "above", "below"], float] = setting(
        {"about": 0.40, "range": 0.25, "above": 0.10, "below": 0.25}, "How often each kind of constraint is drawn: "
        "about N words, between A and B words, more than A words, less than B words.", unit="probability",
        reference={"about": 0.40, "range": 0.25, "above": 0.10, "below": 0.25})
    rewrite: Literal["template", "model"] = setting(
        "template", "How a query gets its constraint: slkit's templates (en/zh), or the model, whose rewrites "
        "failing the check fall back to templates. The reference's rewrite call is missing.", unit="none",
        reference=NO_REFERENCE)
    fresh_adapter: bool = setting(False, "True: a new Generator adapter; False: continue from the last iteration's.",
                                  unit="none", reference=NO_REFERENCE)
    collect_queries: int = setting(
        5000, "The collection pass: this many new self-instructed queries per language (like queries.per_language), "
        "answered by the last iteration's Generator, add their drafts to the pairs; 0 skips it.", unit="queries",
        reference=5000, ge=0)

    @model_validator(mode="after")
    def _window_has_a_true_constraint(self) -> LengthControlParams:
        # Then a range of consecutive multiples is true of every length in the window (length_control.py).
        if self.min_words % self.round_to or self.max_words % self.round_to or self.max_words - self.min_words < self.round_to:
            raise ValueError(f"min_words ({self.min_words}) and max_words ({self.max_words}) must be multiples of "
                             f"round_to ({self.round_to}), at least one round_to apart")
        return self


class JudgeParams(_Section):
    """The quality judge: seven dimensions scored 1-10 as JSON, told to ignore length (slkit/evaluation/judge.py).
    The reference used GPT-4o and ships no runner."""
    enabled: bool = setting(False, "Judge the benchmark answers.", unit="none", reference=NO_REFERENCE)
    model: ModelParams | None = setting(None, "The judge's model, a section like model. None: the run's base "
                                              "model; any slkit engine can run it.", unit="none",
                                        reference=NO_REFERENCE)
    engine: EngineParams | None = setting(None, "The judge's engine, a section like engine. None: the run's engine; "
                                                "e.g. backend: openai, endpoint: {api: chat, ...}.", unit="none",
                                          reference=NO_REFERENCE)
    max_tries: int = setting(3, "A reply that is not the JSON asked for is retried, then counted as failed.",
                             unit="tries", reference=NO_REFERENCE, ge=1)
    max_new_tokens: int = setting(256, "Cap on a judge reply.", unit="tokens", reference=NO_REFERENCE, ge=16)
    samples_per_query: int = setting(1, "How many of each query's samples are judged.", unit="samples",
                                     reference=NO_REFERENCE, ge=1)


class EvaluationParams(_Section):
    """The Generator answers a benchmark after each iteration: length scores, stability, judge."""
    benchmark: str | None = setting(
        "quanshr/LonGen", "A jsonl file, a `datasets` hub id (org/name[:split]; one split needs no name) or a "
        "builtin (builtin:lengths-mini, slkit's 100-800-word set), in LonGen's or LongBench-Write's format; None "
        "skips the evaluation. The default is LonGen, the reference's benchmark (240 queries, 2,000-8,000 words).",
        unit="none", reference="quanshr/LonGen")
    baseline: bool = setting(True, "Evaluate the untrained base model first (runs/<run>/baseline/), so curves start "
                                   "from it.", unit="none", reference=NO_REFERENCE)
    benchmark_format: Literal["auto", "longen", "longbench_write"] = setting(
        "auto", "The benchmark's format. auto: by the first record's fields.", unit="none", reference=NO_REFERENCE)
    subset_size: int | None = setting(None, "Queries evaluated, drawn evenly over language x type. None: the whole "
                                            "benchmark.", unit="queries", reference=None, ge=1)
    max_required_words: float | None = setting(
        None, "Queries that ask for more words than this are left out before the subset is drawn. None (the "
        "reference): all. For a run whose answers are capped far below the benchmark's targets, where those would "
        "score 0 whatever the model learned.", unit="words", reference=None, gt=0)
    samples_per_query: int = setting(1, "Answers per query; k > 1 measures length stability (coefficient of "
                                        "variation over k).", unit="samples", reference=NO_REFERENCE, ge=1)
    max_new_tokens: int | None = setting(None, "Cap on an answer. None: sampling.max_new_tokens.", unit="tokens",
                                         reference=None)
    judge: JudgeParams = setting(JudgeParams(), JudgeParams.__doc__, unit="none", reference=NO_REFERENCE)


class Params(_Section):
    """A recipe: the run's name, the model, and one section per stage and concern."""
    run_name: str = setting(..., "The run is written to output_dir/run_name: one directory name.", unit="none",
                            reference=NO_REFERENCE)
    macro_iterations: int = setting(3, "Macro-iterations of queries -> drafts -> extensions -> training -> evaluation.",
                                    unit="iterations", reference=3, ge=1)
    seed: int = setting(0, "The RNG seed: every random choice (sampling, resampling, line dropping) is derived "
                           "from it and the item, so a resumed stage makes the same ones.", unit="none",
                        reference=NO_REFERENCE)
    output_dir: str = setting("runs", "Directory that holds the runs.", unit="none", reference=NO_REFERENCE)
    model: ModelParams = setting(..., ModelParams.__doc__, unit="none", reference=NO_REFERENCE)
    engine: EngineParams = setting(EngineParams(), EngineParams.__doc__, unit="none", reference=NO_REFERENCE)
    sampling: SamplingParams = setting(SamplingParams(), SamplingParams.__doc__, unit="none", reference=NO_REFERENCE)
    quality: QualityParams = setting(QualityParams(), QualityParams.__doc__, unit="none", reference=NO_REFERENCE)
    queries: QueryParams = setting(QueryParams(), QueryParams.__doc__, unit="none", reference=NO_REFERENCE)
    drafts: DraftParams = setting(DraftParams(), DraftParams.__doc__, unit="none", reference=NO_REFERENCE)
    extensions: ExtensionParams = setting(ExtensionParams(), ExtensionParams.__doc__, unit="none",
                                          reference=NO_REFERENCE)
    resampling: ResamplingParams = setting(ResamplingParams(), ResamplingParams.__doc__, unit="none",
                                           reference=NO_REFERENCE)
    training: TrainingParams = setting(TrainingParams(), TrainingParams.__doc__, unit="none", reference=NO_REFERENCE)
    evaluation: EvaluationParams = setting(EvaluationParams(), EvaluationParams.__doc__, unit="none",
                                           reference=NO_REFERENCE)
    length_control: LengthControlParams = setting(LengthControlParams(), LengthControlParams.__doc__, unit="none",
                                                  reference=NO_REFERENCE)

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


# Keys slkit no longer has, each with the value that did what slkit does now and why it went. A run directory's
# params.yaml written while one existed holds it: at that value it is dropped as the file loads, so the run resumes.
ANY_VALUE = object()  # a retired key dropped whatever it was set to: no value of it changed a result
RETIRED_KEYS = {
    "engine.vllm.enable_sleep_mode": (False, "the length-control stage runs each vLLM engine in a child process, "
                                             "whose GPU memory goes back when it ends"),
    # TRL's SFTTrainer trains since 2026-12-01; every value of these computed the same loss, with other memory.
    "training.loss": (ANY_VALUE, "TRL's trainer computes the loss through its fused LM head"),
    "training.loss_chunk_tokens": (ANY_VALUE, "TRL's trainer computes the loss through its fused LM head"),
}


def _without_retired_keys(data: dict[str, Any], source: str, text: str | None) -> dict[str, Any]:
    """`data` without the RETIRED_KEYS at their last value; one at another value is an error that says why."""
    for dotted, (value, why) in RETIRED_KEYS.items():
        *parents, last = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        if value is not ANY_VALUE and node[last] != value:
            line = _key_lines(text).get(tuple(dotted.split("."))) if text else None
            raise ParamsError(f"{source}{f':{line}' if line else ''}: {dotted}: no longer a setting ({why}); remove it")
        data = {**data}  # the caller's mapping stays as it was: copy the path down to the key
        copy = data
        for part in parents:
            copy[part] = {**copy[part]}
            copy = copy[part]
        del copy[last]
    return data


# Keys slkit renamed, old -> new (one word per concept: docs/method.md). A recipe or a run directory's params.yaml
# that still says the old key loads as if it said the new one, with a warning naming the file and both keys.
RENAMED_KEYS = {
    "extensions.stage1_max_new_tokens": "extensions.phase1_max_new_tokens",
    "extensions.stage2_max_new_tokens": "extensions.phase2_max_new_tokens",
}


def _warn_renamed(source: str, old: str, new: str) -> None:
    warnings.warn(f"{source}: {old} is now called {new}; read as {new} (rename it there)", FutureWarning,
                  stacklevel=2)


def _with_renamed_keys(data: dict[str, Any], source: str, text: str | None) -> dict[str, Any]:
    """`data` with each of RENAMED_KEYS under its new name (the caller's mapping stays as it was); a file
    holding both names of one key is an error."""
    for old, new in RENAMED_KEYS.items():
        *parents, last = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        new_last = new.split(".")[-1]  # a rename within its section
        if new_last in node:
            line = _key_lines(text).get(tuple(old.split("."))) if text else None
            raise ParamsError(f"{source}{f':{line}' if line else ''}: {old}: the old name of {new}, which is set "
                              "too; keep only " + new)
        _warn_renamed(source, old, new)
        data = {**data}
        copy = data
        for part in parents:
            copy[part] = {**copy[part]}
            copy = copy[part]
        copy[new_last] = copy.pop(last)
    return data


def params_from_dict(data: Any, source: str = "<dict>", text: str | None = None,
                     overridden: tuple[str, ...] = ()) -> Params:
    """Validate `data`; errors name source:line and the key, or `--set KEY` for a key in `overridden` (dotted keys
    set on the command line, which the file's lines would misplace)."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: the file must hold a mapping of parameters, got {type(data).__name__}")
    data = _with_renamed_keys(_without_retired_keys(data, source, text), source, text)
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
            from_set = any(loc[:len(o.split("."))] == tuple(o.split(".")) for o in overridden)
            what = {"extra_forbidden": "unknown key", "missing": "missing required key"}.get(e["type"], e["msg"])
            messages.append((f"--set {key}" if from_set else f"{where}: {key}") + f": {what}" + (f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""))
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
    overrides = overrides or {}
    if isinstance(data, dict):  # else params_from_dict says why
        data = _with_renamed_keys(data, str(path), text)  # the file's old names first, so --set NEW replaces them
        for old in set(overrides) & set(RENAMED_KEYS):
            _warn_renamed("--set", old, RENAMED_KEYS[old])
        overrides = {RENAMED_KEYS.get(k, k): v for k, v in overrides.items()}
        apply_overrides(data, overrides)
    return params_from_dict(data, str(path), text, tuple(overrides))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set each dotted key of `overrides` in the nested params `data`, in place."""
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # e.g. --set model.path.x=1: model.path holds a value, not keys
                raise ParamsError(f"--set {dotted}: unknown key ({'.'.join(parents[:depth + 1])} is a value, "
                                  "not a section)")
        node[last] = value


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """The `--set KEY=VALUE` option every command that reads a recipe takes (parse_overrides reads it)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set macro_iterations=1 --set run_name=try2")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs -> {dotted key: value}, each value read as YAML as a recipe's is (2e-4 is a float)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = yaml.load(value, Loader=_YamlLoader)
        except yaml.YAMLError as err:
            raise ParamsError(f"--set {key}: malformed YAML value {value!r} ({getattr(err, 'problem', err)})") from None
    return out


def dump_params(params: Params, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(params.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
