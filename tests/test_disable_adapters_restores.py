"""disable_guidance_adapters(pipe) restores the pipeline exactly (issue 21 item 1, reproducer 28)."""

import torch

from fewstep.distill import GuidanceAdapters, disable_guidance_adapters, enable_guidance_adapters, save_adapters
from fewstep.zoo.digits import load_digits_pipeline


def test_disable_restores_requires_grad_and_the_output_bit_for_bit(tmp_path):
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    unet.conv_in.weight.requires_grad_(False)  # a mixed state, to be restored as it was

    def run():
        return pipe(class_labels=[0, 1, 2], guidance_scale=3.0, num_inference_steps=4, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    before = run()
    adapters = GuidanceAdapters(unet)
    with torch.no_grad():
        for p in adapters.parameters():  # trained-looking adapters: they change the output
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_adapters(adapters, tmp_path / "adapters")
    adapters.remove()
    for _ in range(2):  # enable -> disable, twice (re-enabling attached adapters included)
        enable_guidance_adapters(pipe, tmp_path / "adapters" if _ == 0 else None)
        assert not any(p.requires_grad for p in unet.parameters())  # attached: the base is frozen
        assert not torch.equal(run(), before)
        disable_guidance_adapters(pipe)
        assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
        # Same weights, same flags (hence the same CPU kernels), same batch: bitwise by construction.
        assert torch.equal(run(), before)
    enable_guidance_adapters(pipe)
    disable_guidance_adapters(pipe, remove=True)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags and torch.equal(run(), before)
