"""Training under `accelerate launch`: two CPU processes (gloo, the shipped cpu config) give the adapter
that one process gives with the same global batch, so gradients are synchronised and scaled right."""
import json

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from slkit.core.params import load_params
from slkit.training.adapters import train_adapter
from slkit.training.distributed import accelerate_config_path

pytestmark = pytest.mark.slow  # runs scripts, pipelines or processes: the full suite, not `make test-fast`


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write piece {i}.", "completion": f"river town {i} " * 12})
                            + "\n" for i in range(8)))
    common = {"training.lora_dropout": 0.0, "training.epochs": 1.0, "training.accelerate_config": "cpu",
              "training.gradient_accumulation": 1}
    single = train_adapter(load_params(REPO / "params" / "smoke.yaml", {**common, "training.batch_size": 2}),
                           data, tmp_path / "single")
    ddp = train_adapter(load_params(REPO / "params" / "smoke.yaml", {**common, "training.batch_size": 1,
                                                                     "training.num_processes": 2}),
                        data, tmp_path / "ddp")
    assert (single["processes"], ddp["processes"]) == (1, 2) and single["steps"] == ddp["steps"] == 4
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("single", "ddp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert not list(tmp_path.glob(".*params.yaml"))  # the launch's params file is cleaned up


def test_accelerate_configs_are_shipped_and_a_wrong_one_is_named():
    assert {p.stem for p in accelerate_config_path("ddp").parent.glob("*.yaml")} == {"ddp", "fsdp", "zero3", "cpu"}
    with pytest.raises(ValueError, match="training.accelerate_config: 'nope' is neither a shipped config"):
        accelerate_config_path("nope")
