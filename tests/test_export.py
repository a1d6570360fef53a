"""`slkit export`: the training sets load with `datasets` in TRL's conversational format and with LLaMA-Factory's
dataset_info.json, the adapters carry model cards naming their base model, --merge gives a model with the adapter's
logits, and --push-to-hub uploads both folders without the token ever reaching a file or the terminal."""
import json

import pytest
import yaml

from conftest import REPO
from slkit.running.cli import main
from slkit.running.export import export_run, public_base_model
from slkit.core.layout import adapter_dir, iter_dir, log_path
from slkit.running.pipeline import prepare_run
from slkit.core.records import write_jsonl_atomic

LENGTH = {"benchmark": "longen_mini.jsonl", "format": "longen", "max_score": 1.0, "overall": 0.5,
          "per_type": {"about": 0.5}, "per_length_bin": {}, "per_language": {"en": 0.5}, "n": 2, "stability": None,
          "capped": {"outputs": 2, "cut": 0, "share": 0.0}}
# A chat template of the Llama-2 kind, for the tiny model (its tokenizer has none): what SFTTrainer renders with.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
            "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")


def _examples(tag, n):
    return [{"id": f"{tag}-{i}", "prompt": f"Write about {tag} number {i}.",
             "completion": f"{tag} answer {i}. " * (5 + i)} for i in range(n)]


def _lora(model_path, out, seed):
    """A LoRA adapter with random (nonzero) B matrices: unlike a fresh one it changes the model's logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                     task_type="CAUSAL_LM")).save_pretrained(str(out))


def _adapter(model_path, out, seed, real):
    """A real LoRA adapter of the tiny model, or (real=False, for tests that load no weights) its config alone."""
    if real:
        _lora(model_path, out, seed)
    else:
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text('{"base_model_name_or_path": "/home/me/models/base"}')


def _trained_run(tmp_path, tiny_model_path, overrides=None, adapters=True):
    """A smoke run directory with iteration 1's training and the final stage finished (files written here)."""
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml",
                             {"output_dir": str(tmp_path / "runs"), "macro_iterations": 1, **(overrides or {})})
    out = iter_dir(run_dir, 1)
    out.mkdir(parents=True)
    sets = {"generator": _examples("gen", 3), "extender": _examples("ext", 2)}
    summary = {}
    for seed, (role, examples) in enumerate(sets.items()):
        write_jsonl_atomic(out / f"{role}_sft.jsonl", examples)
        _adapter(tiny_model_path, adapter_dir(run_dir, 1, role), seed, adapters)
        summary[role] = {"samples": len(examples), "init_adapter": None, "trained": True, "steps": 3,
                         "first_loss": 6.5, "final_loss": 6.1, "seconds": 1.0}
        (adapter_dir(run_dir, 1, role) / "slkit-train.json").write_text(json.dumps(summary[role]))
    # Written as plain json: export reads only these fields, and a whole record of each type would hide that.
    _write(out / "training.done.json", {"stage": "training", "finished_at": 0.0, "summary": summary})
    _write(out / "evaluation.json", {"iteration": 1, "run": "smoke", "length_following": LENGTH, "judge": None,
                                     "words": {}, "counts": {}, "figures": []})
    (out / "lengths.png").write_bytes(b"\x89PNG fake")
    final = run_dir / "length_control"
    final.mkdir()
    write_jsonl_atomic(final / "generator_sft.jsonl", _examples("lc", 2))
    _adapter(tiny_model_path, final / "adapters" / "generator", 7, adapters)
    _write(final / "length_control.json", {"length_before": LENGTH, "length_after": {**LENGTH, "overall": 0.7}})
    (final / "adapters" / "generator" / "slkit-train.json").write_text(json.dumps(
        {"samples": 2, "init_adapter": str(adapter_dir(run_dir, 1, "generator")), "trained": False, "reason": "test"}))
    _write(final / "length_control.done.json",
           {"stage": "length_control", "finished_at": 0.0, "iteration": 1, "summary": {"pairs": 2}})
    return run_dir, sets


def _write(path, document):
    path.write_text(json.dumps(document))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("export")
    run_dir, sets = _trained_run(tmp, tiny_model_path)
    result = export_run(run_dir, merge=True)
    return run_dir, sets, result["out"]


def test_training_sets_load_with_datasets_as_chat_turns(exported):
    import datasets

    run_dir, sets, out = exported
    names = datasets.get_dataset_config_names(str(out / "dataset"))
    assert names == ["iter_1-generator", "iter_1-extender", "length_control-generator"]
    for name, source in [("iter_1-generator", sets["generator"]), ("iter_1-extender", sets["extender"])]:
        ds = datasets.load_dataset(str(out / "dataset"), name, split="train")
        assert ds.column_names == ["id", "messages"]
        assert [row["id"] for row in ds] == [e["id"] for e in source]
        for row, example in zip(ds, source):
            # TRL's conversational format: a list of {"role", "content"} turns, user first, ending with the answer
            assert row["messages"] == [{"role": "user", "content": example["prompt"]},
                                       {"role": "assistant", "content": example["completion"]}]


def test_exported_turns_render_with_a_chat_template_as_sft_prepares_them(exported, tiny_model_path):
    """What TRL's SFTTrainer does to a `messages` row before training (TRL is not installed here)."""
    import datasets
    from transformers import AutoTokenizer

    _, sets, out = exported
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = TEMPLATE
    row = datasets.load_dataset(str(out / "dataset"), "iter_1-generator", split="train")[0]
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert text == f"<s>[INST] {sets['generator'][0]['prompt']} [/INST] {sets['generator'][0]['completion']}</s>"


def test_sft_trainer_trains_one_step_on_an_exported_set(exported, tiny_model_path, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed: the format test above stands in for it")
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = exported
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = TEMPLATE
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_path), processing_class=tokenizer,
        train_dataset=datasets.load_dataset(str(out / "dataset"), "iter_1-generator", split="train"),
        args=trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, report_to="none",
                           use_cpu=True, max_length=128))
    # TRL took the rows as conversations: it rendered them with the chat template before tokenizing
    assert "[INST]" in tokenizer.decode(trainer.train_dataset[0]["input_ids"])
    trainer.train()
    assert trainer.state.global_step == 1


def test_dataset_info_gives_llama_factory_the_files_and_their_turns(exported):
    _, sets, out = exported
    info = json.loads((out / "dataset" / "dataset_info.json").read_text())
    assert list(info) == ["iter_1-generator", "iter_1-extender", "length_control-generator"]
    for name, entry in info.items():
        path = out / "dataset" / entry["file_name"]  # LLaMA-Factory reads file_name relative to dataset_dir
        assert path.is_file()
        assert entry["formatting"] == "sharegpt"
        tags = entry["tags"]
        for line in path.read_text().splitlines():
            turns = json.loads(line)[entry["columns"]["messages"]]
            assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"], tags["assistant_tag"]]
            assert all(isinstance(t[tags["content_tag"]], str) for t in turns)


def test_dataset_card_declares_the_configs_and_shows_params_and_scores(exported):
    _, _, out = exported
    card = (out / "dataset" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert [c["data_files"][0]["path"] for c in meta["configs"]] == [
        "data/iter_1-generator.jsonl", "data/iter_1-extender.jsonl", "data/length_control-generator.jsonl"]
    assert "run_name: smoke" in card and "lora_r: 8" in card  # the run's params
    assert "| smoke | 1 | longen_mini.jsonl | 0.5 |" in card  # the scores table
    assert "![lengths.png](figures/lengths.png)" in card and (out / "dataset" / "figures" / "lengths.png").exists()
    assert str(out.parent.parent) not in card  # no path of this machine (output_dir, files) in a published card


def test_each_adapter_has_a_model_card_naming_its_base_model_and_data(exported):
    _, sets, out = exported
    adapters = out / "model" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == [
        "iter_1-extender", "iter_1-generator", "length_control-generator"]
    card = (adapters / "iter_1-generator" / "README.md").read_text()
    assert "- base model: `builtin:tiny-random-llama`" in card
    assert "config `iter_1-generator` of the run's dataset (3 examples" in card
    assert "length score 0.5 of 1.0" in card
    assert (adapters / "iter_1-generator" / "adapter_model.safetensors").exists()
    assert not (adapters / "iter_1-generator" / "slkit-train.json").exists()
    final = (adapters / "length_control-generator" / "README.md").read_text()
    assert "continued from: iter_1-generator" in final and "after: length score 0.7" in final


def test_a_hub_base_model_is_named_in_card_metadata_and_adapter_config(tmp_path, tiny_model_path):
    run_dir, _ = _trained_run(tmp_path, tiny_model_path, {"model.path": "builtin:qwen2.5-coder-0.5b-instruct"},
                              adapters=False)
    out = export_run(run_dir)["out"]
    card = (out / "model" / "adapters" / "iter_1-generator" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    config = json.loads((out / "model" / "adapters" / "iter_1-generator" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"  # not this machine's path
    assert public_base_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert public_base_model(str(tmp_path)) is None and public_base_model("builtin:tiny-random-llama") is None


def test_merged_model_loads_with_transformers_and_gives_the_adapters_logits(exported, tiny_model_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _, out = exported
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    merged = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(run_dir / "length_control" / "adapters" / "generator")).eval()
        adapter_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(str(out / "model")).eos_token == "</s>"
    card = (out / "model" / "README.md").read_text()
    assert "library_name: transformers" in card and "length_control-generator (merged)" in card


class FakeHfApi:
    """huggingface_hub.HfApi's two calls the export makes, recorded (no network)."""
    calls = []

    def __init__(self, **kwargs):
        assert "token" not in kwargs  # huggingface_hub finds the token itself; slkit never holds it
        FakeHfApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))


def test_push_to_hub_uploads_both_folders_and_never_writes_the_token(tmp_path, tiny_model_path, monkeypatch, capsys):
    secret = "hf_thisIsTheUsersSecretToken123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr("slkit.running.export.HfApi", FakeHfApi)
    FakeHfApi.calls = []
    run_dir, _ = _trained_run(tmp_path, tiny_model_path, adapters=False)
    assert main(["export", str(run_dir), "--push-to-hub", "me/long-writer", "--private"]) == 0
    uploads = [c[1] for c in FakeHfApi.calls if c[0] == "upload_folder"]
    assert [(u["repo_type"], u["repo_id"], u["folder_path"]) for u in uploads] == [
        ("dataset", "me/long-writer", str(run_dir / "export" / "dataset")),
        ("model", "me/long-writer", str(run_dir / "export" / "model"))]
    assert [(c[1], c[2]["repo_type"], c[2]["private"]) for c in FakeHfApi.calls if c[0] == "create_repo"] == [
        ("me/long-writer", "dataset", True), ("me/long-writer", "model", True)]
    card = (run_dir / "export" / "model" / "adapters" / "iter_1-generator" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["datasets"] == ["me/long-writer"]
    printed = capsys.readouterr()
    assert "https://huggingface.co/datasets/me/long-writer" in printed.out
    written = [p.read_bytes() for p in run_dir.rglob("*") if p.is_file()]
    assert secret not in printed.out + printed.err and not any(secret.encode() in b for b in written)
    assert "export pushed to" in log_path(run_dir).read_text()


def test_export_refuses_what_it_cannot_export(tmp_path, tiny_model_path, capsys):
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {"output_dir": str(tmp_path / "runs"), "run_name": "new"})
    assert main(["export", str(run_dir)]) == 2
    assert "has no finished training stage" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    trained, _ = _trained_run(tmp_path, tiny_model_path, adapters=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", str(trained), "--out", str(tmp_path / "mine")]) == 2
    assert "is not an earlier export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["export", str(trained)]) == 0 and main(["export", str(trained)]) == 0  # an export is replaced
