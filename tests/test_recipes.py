"""The shipped recipes as a set: each is in the README's table, and the 16 GB recipe runs the 24 GB Qwen recipe's
method (every count, ratio and memory switch) with a smaller model. tests/test_params.py loads each one."""
import re

from conftest import REPO
from slkit.core.params import load_params
from slkit.running.pipeline import changed_keys


def test_every_recipe_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    listed = re.findall(r"^\| `params/([\w.-]+\.yaml)` \|", readme, re.M)
    assert sorted(listed) == sorted(p.name for p in (REPO / "params").glob("*.yaml"))


def test_the_16gb_recipe_is_the_24gb_method_with_a_3b_model():
    small = load_params(REPO / "params" / "qwen2.5-3b-16gb.yaml")
    large = load_params(REPO / "params" / "qwen2.5-7b-24gb.yaml")
    # only the model, the name and vLLM's share of the card differ: method, 4-bit QLoRA and every long-context
    # memory switch (chunked loss, activation offload, Liger, 8-bit paged optimizer) are the 24 GB recipe's
    assert changed_keys(large.to_dict(), small.to_dict()) == ["engine.vllm.gpu_memory_utilization", "model.path",
                                                               "run_name"]
    assert small.model.path == "Qwen/Qwen2.5-3B-Instruct" and small.model.load_in_4bit
    assert small.engine.vllm.gpu_memory_utilization * 16 <= 13  # GiB of a 16 GB card: room for a display
    assert small.engine.vllm.max_model_len == 32768 and small.training.max_length == 16384
