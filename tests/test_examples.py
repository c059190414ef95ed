"""The accelerate configs in examples/ load with accelerate's own reader and say what the README says they do."""

from pathlib import Path

import pytest
import transformers
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).parent.parent / "examples" / "accelerate"


def load(name):
    return load_config_from_file(str(CONFIGS / name))


@pytest.mark.parametrize(
    "name, distributed_type",
    [
        ("multi_gpu_ddp.yaml", DistributedType.MULTI_GPU),
        ("fsdp_qlora.yaml", DistributedType.FSDP),
        ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED),
    ],
)
def test_config_loads_as_a_multi_process_gpu_run(name, distributed_type):
    config = load(name)
    assert config.distributed_type == distributed_type
    assert config.num_processes >= 2 and not config.use_cpu
    assert config.mixed_precision == "bf16"


def test_fsdp_config_wraps_llama_decoder_layers_and_keeps_frozen_and_trainable_apart():
    fsdp = load("fsdp_qlora.yaml").fsdp_config
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert hasattr(transformers.models.llama.modeling_llama, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    # Frozen quantized weights and trainable adapter weights share units: FSDP needs the original parameters.
    assert fsdp["fsdp_use_orig_params"] is True


def test_deepspeed_config_is_zero_stage_2_without_offload():
    deepspeed = load("deepspeed_zero2.yaml").deepspeed_config
    assert deepspeed["zero_stage"] == 2
    assert deepspeed["offload_optimizer_device"] == deepspeed["offload_param_device"] == "none"
