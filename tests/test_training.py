import json

import pytest
import torch

from slkit.training.adapters import train_adapter
from slkit.training.batches import tokenize_example
from slkit.training.long_context import IGNORE


def _examples(path, n=1, completion="alpha beta gamma delta."):
    path.write_text("".join(json.dumps({"prompt": "Say the words.", "completion": completion}) + "\n" for _ in range(n)))
    return path


def test_trl_trains_on_slkits_tokens_and_labels_as_they_are(smoke_params, tiny_model_path, tmp_path):
    """TRL gets slkit's token ids (the prompt as generation renders it) and labels (response only) and keeps them."""
    from slkit.models.loading import load_tokenizer
    from slkit.training.adapters import build_lora_model
    from slkit.training.trainer import sft_trainer

    tok = load_tokenizer(smoke_params.model)
    features = [tokenize_example(tok, "Write about rivers.", f"Rivers flow {i}.", max_length=512) for i in range(2)]
    trainer, _ = sft_trainer(smoke_params, build_lora_model(smoke_params, None), tok, features, tmp_path / "c", "t")
    assert [row["input_ids"] for row in trainer.train_dataset] == [f["input_ids"] for f in features]
    assert [row["labels"] for row in trainer.train_dataset] == [f["labels"] for f in features]
    assert trainer.args.max_length == smoke_params.training.max_length and trainer.args.use_liger_kernel is False


def test_the_first_loss_is_the_models_cross_entropy_on_the_response(smoke_params, tiny_model_path, tmp_path):
    """TRL's fused LM-head loss at step 1 (a fresh LoRA adds nothing yet) equals the base model's own loss over
    the response tokens of the one example."""
    from slkit.models.loading import load_model, load_tokenizer

    summary = train_adapter(smoke_params, _examples(tmp_path / "sft.jsonl"), tmp_path / "a")
    tok = load_tokenizer(smoke_params.model)
    ex = tokenize_example(tok, "Say the words.", "alpha beta gamma delta.", max_length=512)
    model = load_model(smoke_params.model, for_training=True)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item()
    assert summary["first_loss"] == pytest.approx(expected, rel=2e-2)


def test_tokenize_masks_prompt_and_cuts(smoke_params, tiny_model_path):
    from slkit.models.loading import load_tokenizer

    tok = load_tokenizer(smoke_params.model)
    ex = tokenize_example(tok, "Write about rivers.", "Rivers flow.", max_length=512)
    n_prompt = sum(1 for label in ex["labels"] if label == IGNORE)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][n_prompt:], skip_special_tokens=True) == "Rivers flow."
    cut = tokenize_example(tok, "Write about rivers.", "Rivers flow. " * 50, max_length=20)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 20


def test_train_adapter_learns_and_continues(smoke_params, tiny_model_path, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Say the words.", "completion": "alpha beta gamma delta."}) + "\n"
                            for _ in range(6)))
    params = smoke_params.model_copy(update={"training": smoke_params.training.model_copy(
        update={"epochs": 3.0, "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0})})
    first = train_adapter(params, data, tmp_path / "adapters" / "generator")
    assert first["trained"] and first["final_loss"] < first["first_loss"]
    assert (tmp_path / "adapters" / "generator" / "adapter_config.json").exists()
    assert (tmp_path / "adapters" / "generator" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapters" / "generator" / "tokenizer.json").exists()  # the base model's, not copied
    second = train_adapter(params, data, tmp_path / "next", init_adapter=str(tmp_path / "adapters" / "generator"))
    assert second["first_loss"] < first["first_loss"]  # started from the trained adapter


def test_no_samples_carries_the_previous_adapter(smoke_params, tiny_model_path, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fresh = train_adapter(smoke_params, empty, tmp_path / "a")
    assert fresh["trained"] is False and (tmp_path / "a" / "adapter_config.json").exists()


def test_qlora_4bit_path_trains(smoke_params, tiny_model_path, tmp_path):
    """The GPU recipes' path (nf4 + double quant through bitsandbytes) on CPU: loads, trains, saves."""
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "Say it.", "completion": "alpha beta gamma."}) + "\n")
    params = smoke_params.model_copy(update={"model": smoke_params.model.model_copy(update={"load_in_4bit": True, "dtype": "bfloat16"})})
    from slkit.training.adapters import build_lora_model

    model = build_lora_model(params, None)
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    summary = train_adapter(params, data, tmp_path / "q")
    assert summary["trained"] and summary["steps"] == 1
    assert (tmp_path / "q" / "adapter_model.safetensors").exists()


def test_long_context_switches_reach_trls_trainer(smoke_params, tiny_model_path, tmp_path):
    """training.mlp_tile_tokens tiles every MLP when training begins (after Liger would have patched them) and
    trains the same as untiled (tiling is exact); activation offloading goes to TRL on a GPU only (its copies
    run on CUDA streams)."""
    from slkit.models.loading import load_tokenizer
    from slkit.training.adapters import build_lora_model
    from slkit.training.trainer import TileMLPs, sft_trainer

    tok = load_tokenizer(smoke_params.model)
    features = [tokenize_example(tok, "Say.", f"word {i} and more words.", max_length=512) for i in range(3)]
    losses = []
    for tile in (0, 4):
        params = smoke_params.model_copy(update={"seed": 1, "training": smoke_params.training.model_copy(
            update={"mlp_tile_tokens": tile, "activation_offload": True})})
        torch.manual_seed(0)
        trainer, timer = sft_trainer(params, build_lora_model(params, None), tok, features, tmp_path / f"c{tile}", "t")
        tilers = [c for c in trainer.callback_handler.callbacks if isinstance(c, TileMLPs)]
        trainer.train()
        assert [t.tiled for t in tilers] == ([2] if tile else [])  # the smoke model's two layers
        assert len(timer.seconds) == trainer.state.global_step == 3
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert params.training.activation_offload and trainer.args.activation_offloading is False  # a CPU here


def test_tiled_mlp_is_exact_and_covers_every_layer(smoke_params, tiny_model_path):
    from slkit.models.loading import load_model
    from slkit.training.long_context import tile_mlps

    base = load_model(smoke_params.model)
    tiled = load_model(smoke_params.model)
    assert tile_mlps(tiled, 5) == base.config.num_hidden_layers
    ids = torch.randint(0, 500, (1, 23))
    base.train()
    tiled.train()
    out_base = base(input_ids=ids, labels=ids)
    out_tiled = tiled(input_ids=ids, labels=ids)
    out_base.loss.backward()
    out_tiled.loss.backward()
    assert out_tiled.loss.item() == pytest.approx(out_base.loss.item(), rel=1e-5)
    g_base = base.model.layers[0].mlp.up_proj.weight.grad
    g_tiled = tiled.model.layers[0].mlp.up_proj.weight.grad
    assert torch.allclose(g_base, g_tiled, atol=1e-5)


def test_kill_9_during_training_resumes_from_the_last_complete_checkpoint(smoke_params, tiny_model_path, tmp_path):
    """SIGKILL once a checkpoint is saved; a kill while saving the next one is simulated by a copy of it
    without trainer_state.json (Trainer writes that last). The rerun starts from the complete checkpoint,
    runs only the remaining steps and ends with the uninterrupted run's adapter."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from slkit.core.params import dump_params

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"word {i} " * 30}) + "\n"
                            for i in range(15)))
    params = smoke_params.model_copy(update={"training": smoke_params.training.model_copy(
        update={"save_steps": 3, "epochs": 1.0, "learning_rate": 5e-3, "lr_scheduler": "linear"})})
    dump_params(params, tmp_path / "params.yaml")
    out = tmp_path / "killed" / "generator"
    script = ("import sys; from slkit.core.params import load_params; from slkit.training.adapters import train_adapter; "
              "print(train_adapter(load_params(sys.argv[1]), sys.argv[2], sys.argv[3])['steps'])")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "params.yaml"), str(data), str(out)])
    checkpoints = out.parent / ".generator-checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    saved = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))
    torn = checkpoints / f"checkpoint-{saved + 3}"
    shutil.rmtree(torn, ignore_errors=True)
    shutil.copytree(checkpoints / f"checkpoint-{saved}", torn)
    (torn / "trainer_state.json").unlink()

    resumed = train_adapter(params, data, out)
    assert resumed["resumed_from"] == str(checkpoints / f"checkpoint-{saved}")
    assert 0 < saved < resumed["steps"] == 15
    assert len(resumed["step_seconds"]) == 15 - saved  # only the steps after the checkpoint ran again
    assert not checkpoints.exists()

    clean = train_adapter(params, data, tmp_path / "clean" / "generator")
    assert clean["resumed_from"] is None
    assert resumed["losses"] == pytest.approx(clean["losses"], rel=1e-3)
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(tmp_path / "clean" / "generator" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), key


def test_checkpointing_keywords_fit_the_installed_transformers_and_the_gpu_images_older_one():
    """transformers 5.23 renamed gradient_checkpointing to activation_checkpointing; the H200 image has 5.17,
    where the new name stopped the train stage with a TypeError."""
    import dataclasses

    from transformers import TrainingArguments

    from slkit.training.trainer import checkpointing_args

    @dataclasses.dataclass
    class TrainingArguments517:  # the fields 5.17's TrainingArguments has for it
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    older = TrainingArguments517(**checkpointing_args(TrainingArguments517, True))
    assert older.gradient_checkpointing and older.gradient_checkpointing_kwargs == {"use_reentrant": False}
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none",
                             **checkpointing_args(TrainingArguments, True))
    assert args.activation_checkpointing if hasattr(args, "activation_checkpointing") else args.gradient_checkpointing


def test_the_default_global_batch_is_8_and_accumulation_trains_as_one_batch(smoke_params, tiny_model_path, tmp_path):
    """training.gradient_accumulation defaults to 8 (the reference's global batch: batch 1 on each of 8 GPUs): 10
    samples make 2 updates an epoch (8, then the 2 left). k accumulated samples of batch 1 give the adapter one
    padded batch of k gives (the loss is averaged over the response tokens of the whole global batch)."""
    from safetensors.torch import load_file

    from slkit.core.params import TrainingParams

    assert TrainingParams().gradient_accumulation == 8 and TrainingParams().batch_size == 1
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write piece {i}.", "completion": "river town " * (3 + 2 * i)})
                            + "\n" for i in range(10)))

    def train(name, **update):
        params = smoke_params.model_copy(update={"training": smoke_params.training.model_copy(
            update={"lora_dropout": 0.0, "epochs": 1.0, "warmup_ratio": 0.0, "learning_rate": 1e-2, **update})})
        return train_adapter(params, data, tmp_path / name)

    default = train("default", gradient_accumulation=TrainingParams().gradient_accumulation)
    assert default["steps"] == 2
    accumulated = train("accumulated", gradient_accumulation=5)
    batched = train("batched", batch_size=5, gradient_accumulation=1)
    assert accumulated["steps"] == batched["steps"] == 2
    assert accumulated["losses"] == pytest.approx(batched["losses"], rel=1e-4)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("accumulated", "batched"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_group_by_length_batches_like_lengths_together(smoke_params, tiny_model_path, tmp_path):
    """training.group_by_length gives Trainer transformers' length-grouped sampler: the longest sample comes first
    and batches of 3 hold neighbours in length, so they pad less than the default random order's batches."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from slkit.models.loading import load_tokenizer
    from slkit.training.adapters import build_lora_model
    from slkit.training.trainer import sft_trainer

    tok = load_tokenizer(smoke_params.model)
    features = [tokenize_example(tok, "Write.", "word " * (1 + (7 * i) % 24), max_length=512) for i in range(24)]
    lengths = [len(f["input_ids"]) for f in features]

    def order(group):
        params = smoke_params.model_copy(update={"training": smoke_params.training.model_copy(
            update={"group_by_length": group, "batch_size": 3, "gradient_accumulation": 1})})
        trainer, _ = sft_trainer(params, build_lora_model(params, None), tok, features, tmp_path / str(group), "t")
        sampler = trainer._get_train_sampler()
        return isinstance(sampler, LengthGroupedSampler), list(sampler)

    def padded_tokens(indices):
        return sum(3 * max(lengths[i] for i in indices[k:k + 3]) for k in range(0, len(indices), 3))

    (grouped, by_length), (random_kind, shuffled) = order(True), order(False)
    assert grouped and not random_kind and sorted(by_length) == sorted(shuffled) == list(range(24))
    assert lengths[by_length[0]] == max(lengths)
    assert padded_tokens(by_length) < padded_tokens(shuffled)


@pytest.mark.slow
def test_adapters_at_once_train_as_they_would_one_after_the_other(smoke_params, tiny_model_path, tmp_path):
    """training.adapters_at_once: two processes train both adapters at the same time; each adapter is the one
    train_adapter makes in this process (same seed, same data), and its summary is returned by role."""
    from safetensors.torch import load_file

    from slkit.training.distributed import train_at_once

    params = smoke_params.model_copy(update={"training": smoke_params.training.model_copy(
        update={"lora_dropout": 0.0, "epochs": 1.0, "learning_rate": 1e-2})})
    data = {role: _examples(tmp_path / f"{role}.jsonl", n=3, completion=text)
            for role, text in (("generator", "river town bridge."), ("extender", "long long longer text."))}
    summaries = train_at_once(params, {role: (data[role], tmp_path / "at_once" / role, None) for role in data})
    assert set(summaries) == set(data) and all(s["trained"] for s in summaries.values())
    assert not list((tmp_path / "at_once").glob(".*-params.yaml"))  # the params files handed over are removed
    for role in data:
        alone = train_adapter(params, data[role], tmp_path / "alone" / role)
        assert summaries[role]["losses"] == pytest.approx(alone["losses"], rel=1e-4)
        a, b = (load_file(tmp_path / d / role / "adapter_model.safetensors") for d in ("at_once", "alone"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    broken = {"generator": (tmp_path / "missing.jsonl", tmp_path / "broken" / "generator", None)}
    with pytest.raises(RuntimeError, match="generator"):
        train_at_once(params, broken)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_trainer_started_at_once_dies_with_the_process_that_started_it(tmp_path):
    """train_at_once's children get SIGKILL when their parent (the stage's kernel) dies in any way, SIGKILL
    included, so no trainer outlives its stage to collide with the resumed one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from slkit.engines.server import _alive

    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from slkit.training.distributed import _die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=_die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(50):
        if not _alive(child):  # gone, or killed and waiting to be reaped by init
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")
