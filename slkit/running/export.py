"""`slkit export RUN_DIR`: a run's training sets and adapters in the forms other tools load.

    slkit export runs/demo [--out DIR] [--merge] [--push-to-hub USER/NAME [--private]]

DIR (default runs/<run>/export/) holds two folders laid out as the Hub repositories they become:

    dataset/  a Hugging Face dataset with one config per training set (iter_1-generator, iter_1-extender, ...,
              length_control-generator): data/<config>.jsonl of {"id", "messages"}, a user turn and an assistant
              turn each (TRL's conversational format); README.md, the dataset card (params, scores, figures);
              dataset_info.json, LLaMA-Factory's entries for the same files (`dataset_dir: DIR/dataset`)
    model/    adapters/<config>/, each adapter with its model card; README.md, the card of the final Generator
              (length control's when the run has one); with --merge, that Generator merged into the base
              model's weights with the tokenizer, in model/ itself: what vLLM or `transformers serve` load

`--push-to-hub USER/NAME` uploads dataset/ to the dataset repository USER/NAME and model/ to the model repository
of the same name, with the token huggingface_hub finds (HF_TOKEN, or `hf auth login`): slkit never reads it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import yaml
from huggingface_hub import HfApi
from peft import PeftModel

from slkit.core.builtins import BUILTIN_PREFIX, is_builtin
from slkit.core.layout import ROLES, adapter_dir, environment_path, iter_dir, load_run_params, stage_dir, stage_done
from slkit.core.logs import run_log
from slkit.core.params import HUB_ID, Params
from slkit.core.records import read_json, read_jsonl
from slkit.evaluation.reports import markdown_table, summary_table
from slkit.method.textstats import count_words
from slkit.models.builtin import SPLIT_GGUF_MODELS
from slkit.models.loading import load_model, load_tokenizer

MARKER = "slkit-export.json"  # in an export directory: it may be replaced by the next export
PAPER = "https://arxiv.org/abs/2410.23933"
LLAMA_FACTORY_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
ROLE_TEXT = {
    "generator": "the Generator: it answers a writing request",
    "extender": "the Extender: it rewrites a draft into a longer text (slkit's extension prompt around the request "
                "and the draft)",
    "length_control": "the final Generator: it answers writing requests that ask for a length",
}


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message says what is missing."""


@dataclass(frozen=True)
class TrainingSet:
    """One training set of a run and the adapter trained on it."""
    name: str  # the dataset config and the adapter folder: iter_<k>-<role>, length_control-generator
    role: str  # generator, extender, or length_control (the final stage's Generator)
    iteration: int  # the macro-iteration it was built in (the last one for length control)
    examples: Path  # the run's <role>_sft.jsonl
    adapter: Path


def training_sets(run_dir: str | Path, params: Params) -> list[TrainingSet]:
    """The training sets of every finished training stage, in order, the final stage's last."""
    found = []
    for k in range(1, params.macro_iterations + 1):
        if stage_done(run_dir, k, "training"):
            found += [TrainingSet(f"iter_{k}-{role}", role, k, iter_dir(run_dir, k) / f"{role}_sft.jsonl",
                                  adapter_dir(run_dir, k, role)) for role in ROLES]
    if stage_done(run_dir, params.macro_iterations, "length_control"):
        out = stage_dir(run_dir, params.macro_iterations, "length_control")
        found.append(TrainingSet("length_control-generator", "length_control", params.macro_iterations,
                                 out / "generator_sft.jsonl", out / "adapters" / "generator"))
    return found


def chat_record(example: dict[str, Any]) -> dict[str, Any]:
    """A (prompt, completion) training example as one user turn and one assistant turn."""
    return {"id": example["id"], "messages": [{"role": "user", "content": example["prompt"]},
                                              {"role": "assistant", "content": example["completion"]}]}


def public_base_model(model_path: str) -> str | None:
    """The hub id of the run's base model, for cards and exported adapter configs: the model path when it is
    one, the model a builtin was converted from; None for a local directory or the tiny random builtin."""
    if is_builtin(model_path):
        spec = SPLIT_GGUF_MODELS.get(model_path[len(BUILTIN_PREFIX):])
        return spec.origin if spec else None
    return model_path if HUB_ID.match(model_path) and not Path(model_path).expanduser().exists() else None


def base_model_name(model_path: str) -> str:
    """How a card names the base model: its hub id, else the builtin's name or the local directory's name (not
    this machine's path)."""
    return public_base_model(model_path) or (model_path if is_builtin(model_path) else Path(model_path).name)


def _load_base(model_path: str) -> list[str]:
    """The lines of a card's code that load the base model."""
    name = base_model_name(model_path)
    if public_base_model(model_path):
        return [f'base = AutoModelForCausalLM.from_pretrained("{name}")']
    if is_builtin(model_path):
        return ["from slkit.models.loading import resolve_model_path",
                f'base = AutoModelForCausalLM.from_pretrained(resolve_model_path("{name}"))']
    return [f'base = AutoModelForCausalLM.from_pretrained("PATH/TO/{name}")']


def public_params(params: Params) -> dict[str, Any]:
    """The run's params for a card: no output directory, files by name only (not this machine's paths), servers
    by count (the key itself is never in params, only the name of its environment variable)."""
    def clean(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items() if k != "output_dir"}
        if key == "base_urls":
            return f"<{len(value)} server(s)>"
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and value.startswith(("/", "~")):
            return Path(value).name
        return value

    return clean(params.to_dict())


def _front_matter(meta: dict[str, Any], body: str) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def _adapter_name(path: str | None) -> str | None:
    """The export name of an adapter path recorded by training (iter_<k>-<role>), or None."""
    if not path:
        return None
    p = Path(path)
    return f"{p.parent.parent.name}-{p.name}" if p.parent.name == "adapters" else p.name


def scores_of(run_dir: Path, ts: TrainingSet) -> list[str]:
    """Lines of a model card's scores: the benchmark scores of a Generator (with the base model's), the
    extensions an Extender made in the next iteration, length control's scores before and after."""
    def line(name: str, lf: dict | None) -> str | None:
        if not lf:
            return None
        per_type = ", ".join(f"{t} {v}" for t, v in (lf.get("per_type") or {}).items())
        return f"- {name}: length score {lf['overall']} of {lf['max_score']} on {lf['benchmark']} ({per_type})"

    def evaluation(k: int) -> dict:
        path = iter_dir(run_dir, k) / "evaluation.json"
        return read_json(path) if path.exists() else {}

    lines = []
    if ts.role == "generator":
        ev = evaluation(ts.iteration)
        lines += [line(f"this adapter (iteration {ts.iteration})", ev.get("length_following")),
                  line("the base model", evaluation(0).get("length_following"))]
        if ev.get("judge"):
            lines.append(f"- judge: mean {ev['judge']['overall']} of 10 over {ev['judge']['judged']} answers")
    elif ts.role == "extender":
        done = iter_dir(run_dir, ts.iteration + 1) / "extensions.done.json"
        if done.exists():
            s = read_json(done)["summary"]
            lines.append(f"- iteration {ts.iteration + 1}: {s['extensions']} of {s['jobs']} extension jobs with "
                         f"this adapter kept (longer than the draft by the run's ratio)")
    else:
        lc = read_json(ts.adapter.parent.parent / "length_control.json")
        lines += [line("before length control", lc.get("length_before")), line("after", lc.get("length_after"))]
    return [x for x in lines if x] or ["- none recorded"]


def model_card(run_dir: Path, params: Params, ts: TrainingSet, hub_repo: str | None, merged: bool = False) -> str:
    base = public_base_model(params.model.path)
    train = read_json(ts.adapter / "slkit-train.json") if (ts.adapter / "slkit-train.json").exists() else {}
    meta: dict[str, Any] = {**({"base_model": base} if base else {}),
                            "library_name": "transformers" if merged else "peft", "pipeline_tag": "text-generation",
                            "tags": ["slkit", "self-lengthen", "lora", "long-form-generation"],
                            **({"datasets": [hub_repo]} if hub_repo else {})}
    tp = params.training
    if merged:
        load = [f'model = AutoModelForCausalLM.from_pretrained("{hub_repo or "EXPORT/model"}")']
    else:
        where = f'"{hub_repo}", subfolder="adapters/{ts.name}"' if hub_repo else f'"EXPORT/model/adapters/{ts.name}"'
        load = [*_load_base(params.model.path), f"model = PeftModel.from_pretrained(base, {where})"]
    if not hub_repo:
        load.insert(0, "# EXPORT: the directory `slkit export` wrote")
    built = "" if base is None or not is_builtin(params.model.path) else (
        f" (slkit's `{params.model.path}`: {base}'s Q4_K_M GGUF dequantised; the adapter was trained on those "
        "weights)")
    quantised = (" It was trained on the 4-bit (nf4) base model (QLoRA) and merged into the base weights in "
                 f"{params.model.dtype}: close to, not equal to, the adapter on the 4-bit model."
                 if merged and params.model.load_in_4bit else "")
    body = [f"# {params.run_name} · {ts.name}{' (merged)' if merged else ''}", "",
            f"A LoRA adapter{', merged into its base model,' if merged else ''} trained by "
            f"slkit with Self-Lengthen ([Quan et al., 2024]({PAPER})): {ROLE_TEXT[ts.role]}.{quantised}",
            "", f"- base model: `{base_model_name(params.model.path)}`{built}",
            f"- training data: config `{ts.name}` of the run's dataset ({train.get('samples', '?')} examples, "
            "one user turn and one assistant turn each)",
            f"- continued from: {_adapter_name(train.get('init_adapter')) or 'a fresh LoRA'}",
            f"- LoRA r={tp.lora_r}, alpha={tp.lora_alpha}, dropout={tp.lora_dropout}, targets {tp.target_modules}; "
            f"learning rate {tp.learning_rate} ({tp.lr_scheduler}), {tp.epochs} epochs, batch {tp.batch_size} x "
            f"{tp.gradient_accumulation}, max length {tp.max_length}, 4-bit base: {params.model.load_in_4bit}",
            f"- training: {'trained' if train.get('trained') else 'not trained (' + str(train.get('reason')) + ')'}"
            + (f", {train['steps']} steps, loss {train['first_loss']} -> {train['final_loss']}, {train['seconds']} s"
               if train.get("trained") else ""),
            "", "## Scores", "", *scores_of(run_dir, ts),
            "", "## Use", "", "```python", "from transformers import AutoModelForCausalLM",
            *([] if merged else ["from peft import PeftModel"]), *load, "```", ""]
    return _front_matter(meta, "\n".join(body))


def dataset_card(run_dir: Path, params: Params, sets: list[TrainingSet], sizes: dict[str, tuple[int, float]],
                 figures: list[str], hub_repo: str | None) -> str:
    meta = {"configs": [{"config_name": ts.name, "data_files": [{"split": "train", "path": f"data/{ts.name}.jsonl"}]}
                        for ts in sets],
            "language": list(params.queries.languages), "task_categories": ["text-generation"],
            "tags": ["slkit", "self-lengthen", "synthetic", "long-form-generation"]}
    rows = [f"| `{ts.name}` | {ts.role} | {ts.iteration} | {sizes[ts.name][0]} | {sizes[ts.name][1]} |" for ts in sets]
    summary = summary_table([run_dir])
    env = read_json(environment_path(run_dir)) if environment_path(run_dir).exists() else None
    body = [f"# {params.run_name}: Self-Lengthen training sets", "",
            f"The training sets of the slkit run `{params.run_name}` (Self-Lengthen, [Quan et al., 2024]({PAPER})), "
            f"made by the model `{base_model_name(params.model.path)}` from its own outputs. "
            "Each record is one user turn and one assistant turn (`messages`, TRL's conversational format); "
            "`dataset_info.json` lists the same files for LLaMA-Factory. The Generator's sets pair a request with a "
            "lengthened answer; the Extender's pair slkit's extension prompt (request and draft) with it; "
            "length control's pair a request that names a length with an answer of that length.", "",
            "```python", "from datasets import load_dataset",
            *([] if hub_repo else ["# EXPORT: the directory `slkit export` wrote"]),
            f'ds = load_dataset("{hub_repo or "EXPORT/dataset"}", "{sets[-1].name}", split="train")', "```", "",
            "| config | role | iteration | examples | mean words of the answers |", "|---|---|---|---|---|", *rows, "",
            "## Scores", "", markdown_table(summary) if len(summary) else "No evaluation recorded.", "",
            *[f"![{name}](figures/{name})" for name in figures], "",
            "## Params", "", "```yaml",
            yaml.safe_dump(public_params(params), sort_keys=False, allow_unicode=True).strip(), "```", ""]
    if env:
        packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
        gpus = ", ".join(g["name"] for g in env["gpus"]) or "none"
        body += ["## Environment", "", f"Python {env['python']}, {packages}; CUDA {env['cuda']}; GPUs: {gpus}", ""]
    return _front_matter(meta, "\n".join(body))


def write_dataset(run_dir: Path, params: Params, sets: list[TrainingSet], out: Path, hub_repo: str | None) -> None:
    (out / "data").mkdir(parents=True)
    sizes = {}
    for ts in sets:
        records = [chat_record(e) for e in read_jsonl(ts.examples, required=["id", "prompt", "completion"])]
        with open(out / "data" / f"{ts.name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        answers = [count_words(r["messages"][1]["content"]) for r in records]
        sizes[ts.name] = (len(records), round(mean(answers), 1) if answers else 0.0)
    info = {ts.name: {"file_name": f"data/{ts.name}.jsonl", "formatting": "sharegpt",
                      "columns": {"messages": "messages"}, "tags": LLAMA_FACTORY_TAGS} for ts in sets}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    # The last evaluated iteration's figures show every iteration up to it.
    evaluated = [k for k in range(params.macro_iterations, 0, -1)
                 if (iter_dir(run_dir, k) / "evaluation.json").exists()]
    figures = sorted(p.name for p in iter_dir(run_dir, evaluated[0]).glob("*.png")) if evaluated else []
    if figures:
        (out / "figures").mkdir()
        for name in figures:
            shutil.copy2(iter_dir(run_dir, evaluated[0]) / name, out / "figures" / name)
    (out / "README.md").write_text(dataset_card(run_dir, params, sets, sizes, figures, hub_repo), encoding="utf-8")


def write_adapter(run_dir: Path, params: Params, ts: TrainingSet, out: Path, hub_repo: str | None) -> None:
    """The adapter's weights and config, its base model named by hub id where there is one (the run's config
    names this machine's path), and its card. slkit-train.json stays in the run: its numbers are in the card."""
    out.mkdir(parents=True)
    for path in ts.adapter.iterdir():
        if path.is_file() and path.name != "slkit-train.json":
            shutil.copy2(path, out / path.name)
    base = public_base_model(params.model.path)
    if base:
        config = read_json(out / "adapter_config.json")
        config["base_model_name_or_path"] = base
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(run_dir, params, ts, hub_repo), encoding="utf-8")


def merge_adapter(params: Params, adapter: Path, out: Path) -> None:
    """Base model + LoRA adapter -> one model's weights (peft's merge_and_unload), saved with the tokenizer. The
    base is loaded unquantised on the CPU (merging into 4-bit weights would round the update away) in the run's
    dtype, bfloat16 for "auto"."""
    full = params.model.model_copy(update={"load_in_4bit": False})
    base = load_model(full, device="cpu", dtype="bfloat16" if params.model.dtype == "auto" else params.model.dtype)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    load_tokenizer(params.model).save_pretrained(str(out))


def push_to_hub(out: Path, repo: str, private: bool = False, api: Any = None, message: str = "slkit export") -> dict:
    """Upload out/dataset to the dataset repository `repo` and out/model to the model repository `repo`, created
    when missing. The token is huggingface_hub's to find (HF_TOKEN, or the one `hf auth login` stored)."""
    if api is None:
        api = HfApi()
    urls = {}
    for folder in ("dataset", "model"):
        try:
            api.create_repo(repo, repo_type=folder, private=private or None, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(out / folder), repo_type=folder, commit_message=message)
        except (OSError, ValueError) as err:  # huggingface_hub's HTTP and token errors derive from these
            raise ExportError(f"push of {out / folder} to the {folder} repository {repo} failed: {err} (log in with "
                              "`hf auth login` or set HF_TOKEN to a token that may write there)") from None
        urls[folder] = f"https://huggingface.co/{'datasets/' if folder == 'dataset' else ''}{repo}"
    return urls


def export_run(run_dir: str | Path, out: str | Path | None = None, merge: bool = False, hub_repo: str | None = None,
               private: bool = False, api: Any = None) -> dict[str, Any]:
    """Write the export of a run (see the module's docstring); returns what was written and pushed."""
    run_dir = Path(run_dir)
    if not (run_dir / "params.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no params.yaml)")
    if hub_repo and not HUB_ID.match(hub_repo):
        raise ExportError(f"--push-to-hub: {hub_repo!r} is not a repository id (USER/NAME)")
    params = load_run_params(run_dir)
    sets = training_sets(run_dir, params)
    if not sets:
        raise ExportError(f"{run_dir} has no finished training stage yet: nothing to export")
    out = Path(out) if out else run_dir / "export"
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ExportError(f"{out} exists and is not an earlier export (no {MARKER}): give another --out")
    with run_log(run_dir) as log:
        for folder in ("dataset", "model"):
            shutil.rmtree(out / folder, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text(json.dumps({"run": str(run_dir.resolve()), "sets": [ts.name for ts in sets]}))
        write_dataset(run_dir, params, sets, out / "dataset", hub_repo)
        for ts in sets:
            write_adapter(run_dir, params, ts, out / "model" / "adapters" / ts.name, hub_repo)
        final = [ts for ts in sets if ts.role in ("generator", "length_control")][-1]
        if merge:
            merge_adapter(params, final.adapter, out / "model")
        (out / "model" / "README.md").write_text(model_card(run_dir, params, final, hub_repo, merged=merge),
                                                 encoding="utf-8")
        log.info("export to %s: %d training sets and adapters%s", out, len(sets),
                 f", {final.name} merged" if merge else "")
        urls = {}
        if hub_repo:
            urls = push_to_hub(out, hub_repo, private, api, f"slkit export of run {params.run_name}")
            log.info("export pushed to %s", ", ".join(urls.values()))
    return {"out": out, "sets": [ts.name for ts in sets], "final": final.name, "merged": merge, "urls": urls}


def export_command(args: argparse.Namespace) -> int:
    try:
        result = export_run(args.run, args.out, args.merge, args.push_to_hub, args.private)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {len(result['sets'])} training sets and adapters ({', '.join(result['sets'])}) to {result['out']}")
    print(f"final Generator: {result['final']}{' (merged into model/)' if result['merged'] else ''}")
    for folder, url in result["urls"].items():
        print(f"{folder}: {url}")
    return 0
