"""Offloaded activations: the same gradients on both trainers' tiny models, each checkpointed layer's input moved,
weights and small tensors left alone, a tensor saved twice copied once."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import LlamaConfig, LlamaForCausalLM

from diffusers_lowmem import activation_offload, adapters, tiny

BATCH, SEQ = 2, 16


def random_adapter(model, role):
    network = adapters.attach_adapter(model, adapters.AdapterConfig(algo="lora", rank=4), role=role)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return network


def gradients_of(network, step, offload):
    network.zero_grad(set_to_none=True)
    with offload:
        loss = step()
    loss.backward()
    return {name: parameter.grad.clone() for name, parameter in network.named_parameters()}


def assert_same_gradients(first, second):
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.equal(first[name], second[name]), name


def tiny_llama_step(checkpointing: bool):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny.TINY_LLAMA_CONFIG)).train()
    network = random_adapter(model, "llm")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return model, network, lambda: model(input_ids=input_ids, labels=input_ids).loss


@pytest.mark.parametrize("checkpointing", [False, True])
def test_causal_lm_gradients_are_unchanged(checkpointing):
    model, network, step = tiny_llama_step(checkpointing)
    plain = gradients_of(network, step, activation_offload.offload_activations(enabled=False))
    offload = activation_offload.ActivationOffload(min_bytes=0, copy_host_tensors=True)
    assert_same_gradients(gradients_of(network, step, offload), plain)
    assert offload.offloaded_tensors > 0


def test_checkpointed_layer_inputs_are_offloaded():
    """Non-reentrant checkpointing keeps each decoder layer's input through the saved-tensor hooks, so it moves."""
    model, network, step = tiny_llama_step(checkpointing=True)
    hidden_shape = (BATCH, SEQ, model.config.hidden_size)
    layer_inputs = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0]))
    with activation_offload.ActivationOffload(min_bytes=0, copy_host_tensors=True) as checkpointed:
        step()
    assert len(layer_inputs) == model.config.num_hidden_layers
    assert checkpointed.offloaded_shapes.count(hidden_shape) >= model.config.num_hidden_layers

    _, _, step_without = tiny_llama_step(checkpointing=False)
    with activation_offload.ActivationOffload(min_bytes=0, copy_host_tensors=True) as everything:
        step_without()
    # Checkpointing keeps far fewer activations, and offloading moves what it keeps.
    assert checkpointed.offloaded_tensors < everything.offloaded_tensors / 3
    assert checkpointed.offloaded_bytes < everything.offloaded_bytes / 2


def test_text_to_image_unet_gradients_are_unchanged(tiny_sd_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").train()
    network = random_adapter(unet, "unet")
    unet.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    encoder_hidden_states = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([10, 500])

    def step():
        prediction = unet(latents, timesteps, encoder_hidden_states).sample
        return torch.nn.functional.mse_loss(prediction.float(), latents)

    plain = gradients_of(network, step, activation_offload.offload_activations(enabled=False))
    offload = activation_offload.ActivationOffload(min_bytes=0, copy_host_tensors=True)
    assert_same_gradients(gradients_of(network, step, offload), plain)
    assert offload.offloaded_tensors > 0


def test_weights_small_tensors_and_host_tensors_stay():
    weight = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    x = torch.randn(8, 64, requires_grad=True)
    with activation_offload.ActivationOffload(min_bytes=0, copy_host_tensors=True) as offload:
        (x @ weight.t()).sum().backward()  # saves the weight's transpose, not x
    assert offload.offloaded_tensors == 0

    w = torch.randn(8, 64, requires_grad=True)
    with activation_offload.ActivationOffload(min_bytes=x.numel() * 4 + 1, copy_host_tensors=True) as offload:
        (x * w).sum().backward()
    assert offload.offloaded_tensors == 0  # below min_bytes
    with activation_offload.ActivationOffload(min_bytes=0) as offload:
        (x * w).sum().backward()
    assert offload.offloaded_tensors == 0  # already on the host


def test_a_tensor_saved_by_several_ops_is_copied_once():
    x = torch.randn(8, 64, requires_grad=True)
    hidden = x * 2  # saved by the three products below (as q, k and v projections save their input)
    factors = [torch.randn(8, 64, requires_grad=True) for _ in range(3)]
    with activation_offload.ActivationOffload(min_bytes=0, copy_host_tensors=True) as offload:
        loss = sum((hidden * factor).sum() for factor in factors)
    assert offload.offloaded_tensors == 4  # hidden once, the three factors (saved by the products for hidden)
    assert offload.offloaded_shapes == [(8, 64)] * 4
    loss.backward()
    for factor in factors:
        assert torch.equal(factor.grad, hidden.detach())


def test_disabled_is_a_no_op_context():
    with activation_offload.offload_activations(enabled=False) as nothing:
        assert nothing is None
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_activations_go_to_pinned_host_memory():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny.TINY_LLAMA_CONFIG)).cuda().train()
    network = random_adapter(model, "llm")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), device="cuda")

    def step():
        return model(input_ids=input_ids, labels=input_ids).loss

    plain = gradients_of(network, step, activation_offload.offload_activations(enabled=False))
    offload = activation_offload.ActivationOffload(min_bytes=0)
    assert offload.pin_memory
    assert_same_gradients(gradients_of(network, step, offload), plain)
    assert offload.offloaded_shapes.count((BATCH, SEQ, model.config.hidden_size)) >= model.config.num_hidden_layers


def test_simulated_host_lets_a_memory_counter_see_activations_leave():
    """Memory estimates count the CPU as the device: under `simulated_host`, what offloading moves is no longer
    counted after the forward, and the gradients stay the same."""
    from diffusers_lowmem.memory import LiveTensorCounter

    model, network, step = tiny_llama_step(checkpointing=True)
    live_after_forward, gradients = {}, {}
    for offload in (False, True):
        network.zero_grad(set_to_none=True)
        with LiveTensorCounter("cpu", block_bytes=1) as counter:
            with activation_offload.simulated_host():
                moved = activation_offload.offload_activations(offload, min_bytes=0)
                with moved:
                    loss = step()
            live_after_forward[offload] = counter.live_bytes
            loss.backward()
        gradients[offload] = {name: parameter.grad.clone() for name, parameter in network.named_parameters()}
    assert_same_gradients(gradients[True], gradients[False])
    assert moved.copy_host_tensors and moved.offloaded_bytes > 0
    # Views and tensors kept alive elsewhere (the loss graph) free less than they copy; most is freed.
    freed = live_after_forward[False] - live_after_forward[True]
    assert 0.5 * moved.offloaded_bytes <= freed <= moved.offloaded_bytes, (freed, moved.offloaded_bytes)
