"""Guidance adapters (AGD): exactness at init, frozen base, save/load, one forward per step in pipelines."""

import contextlib
import copy
import json

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel

from fewstep import UniPCScheduler
from fewstep.distill import (
    AdapterConfig,
    GuidanceAdapters,
    disable_guidance_adapters,
    enable_guidance_adapters,
    load_adapters,
    save_adapters,
)
from fewstep.zoo.digits import NULL_LABEL, load_digits_pipeline
from fewstep.zoo.tiny import build_tiny_sd3_pipeline, build_tiny_sd_pipeline

# Learned variance (out_channels = 2 x in_channels), as DiT-XL/2.
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _tiny_dit(dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DiTTransformer2DModel(**TINY_DIT).eval().to(dtype)


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def digits():
    return load_digits_pipeline()


def _inputs(kind, seed=0):
    """Forward arguments ``(args, kwargs)`` of a batch of 3 for each test network."""
    g = torch.Generator().manual_seed(seed)

    def noise(*shape):
        return torch.randn(*shape, generator=g)

    if kind == "digits":
        return (noise(3, 1, 8, 8), torch.tensor([900, 400, 20])), {"class_labels": torch.tensor([3, 7, NULL_LABEL])}
    if kind == "sd":
        return (noise(3, 4, 8, 8), torch.tensor(500)), {"encoder_hidden_states": noise(3, 7, 32)}
    if kind == "sd3":
        return (), {"hidden_states": noise(3, 16, 8, 8), "timestep": torch.tensor([900.0, 500.0, 50.0]),
                    "encoder_hidden_states": noise(3, 7, 64), "pooled_projections": noise(3, 64)}
    return (noise(3, 4, 8, 8),), {"timestep": torch.tensor([900, 500, 50]), "class_labels": torch.tensor([1, 4, 9])}


@pytest.fixture
def model(request, sd, sd3, digits):
    kind = request.param
    base = {"digits": lambda: digits.unet, "sd": lambda: sd.unet, "sd3": lambda: sd3.transformer,
            "dit": _tiny_dit}[kind]()
    yield kind, base
    adapters = GuidanceAdapters.attached_to(base)
    if adapters is not None:
        adapters.remove()


def _randomise(adapters, std=0.2, seed=1):
    # Trained-looking adapters: every parameter non-trivial, including the zero-initialised output.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return adapters


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


@contextlib.contextmanager
def _frozen(base):
    # GuidanceAdapters freezes the base, and on some CPU builds requires_grad=False picks another
    # Linear kernel (outputs move by ~1e-6). Bitwise equality holds by construction against the
    # base frozen the same way, so references are computed that way.
    flags = [p.requires_grad for p in base.parameters()]
    base.requires_grad_(False)
    try:
        yield base
    finally:
        for param, flag in zip(base.parameters(), flags):
            param.requires_grad_(flag)


def _frozen_output(base, args, kwargs):
    with _frozen(base):
        return _sample(base(*args, **kwargs))


@pytest.mark.parametrize("model", ["digits", "sd", "sd3", "dit"], indirect=True)
def test_untrained_adapters_reproduce_the_base_exactly_and_disable_restores_it(model):
    kind, base = model
    args, kwargs = _inputs(kind)
    with torch.no_grad():
        reference = _frozen_output(base, args, kwargs)
        adapters = GuidanceAdapters(base)
        w = torch.tensor([1.0, 4.5, 12.0])
        assert torch.equal(_sample(adapters(*args, guidance_scale=w, **kwargs)), reference)

        # A trained adapter set sits on the path: the output moves, per block and as a whole.
        _randomise(adapters)
        guided = _sample(adapters(*args, guidance_scale=w, **kwargs))
        assert (guided - reference).abs().max() > 1e-3
        for block in adapters.blocks:
            saved = block.to_out.weight.clone()
            block.to_out.weight.zero_()
            assert not torch.equal(_sample(adapters(*args, guidance_scale=w, **kwargs)), guided)
            block.to_out.weight.copy_(saved)

        adapters.disable()
        assert torch.equal(_sample(base(*args, **kwargs)), reference)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
        adapters.enable()
        assert torch.equal(_sample(adapters(*args, guidance_scale=w, **kwargs)), guided)


def test_low_precision_base_keeps_float32_adapters():
    base = _tiny_dit(torch.bfloat16)
    args, kwargs = _inputs("dit")
    args = (args[0].to(torch.bfloat16),)
    with torch.no_grad():
        reference = base(*args, **kwargs).sample
        adapters = GuidanceAdapters(base)
        assert {p.dtype for p in adapters.parameters()} == {torch.float32}
        assert torch.equal(adapters(*args, guidance_scale=3.0, **kwargs).sample, reference)
        out = _randomise(adapters)(*args, guidance_scale=3.0, **kwargs).sample
    assert out.dtype == torch.bfloat16 and not torch.equal(out, reference)
    adapters.remove()


def test_base_stays_frozen_and_bitwise_untouched_while_adapters_train(digits):
    base = digits.unet
    before = {k: v.clone() for k, v in base.state_dict().items()}
    args, kwargs = _inputs("digits")
    adapters = GuidanceAdapters(base)
    try:
        assert not any(p.requires_grad for p in base.parameters())
        assert set(base.state_dict()) == set(before)  # adapters are not submodules of the base
        initial = {k: v.clone() for k, v in adapters.state_dict().items()}
        optimizer = torch.optim.AdamW(adapters.parameter_groups(weight_decay=0.01), lr=1e-2)
        w = torch.tensor([1.5, 3.0, 6.0])
        for _ in range(3):
            # The CFG teacher is the same network with the adapters switched off.
            with torch.no_grad(), adapters.disabled() as teacher:
                x, t = (torch.cat([a, a]) for a in args)
                labels = torch.cat([kwargs["class_labels"], torch.full((3,), NULL_LABEL)])
                cond, uncond = teacher(x, t, class_labels=labels).sample.chunk(2)
            assert adapters.enabled
            optimizer.zero_grad()
            eps = adapters(*args, guidance_scale=w, **kwargs).sample
            torch.nn.functional.mse_loss(eps, uncond + w[:, None, None, None] * (cond - uncond)).backward()
            assert all(p.grad is None for p in base.parameters())
            optimizer.step()
        changed = {k for k, v in adapters.state_dict().items() if not torch.equal(v, initial[k])}
        buffers = {k for k, _ in adapters.named_buffers()}
        assert changed == set(initial) - buffers  # every weight learned, Fourier features fixed
        assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    finally:
        adapters.remove()
    assert all(p.requires_grad for p in base.parameters())  # flags restored


def test_per_sample_guidance_scales_match_separate_calls(digits):
    args, kwargs = _inputs("digits")
    adapters = _randomise(GuidanceAdapters(digits.unet))
    try:
        with torch.no_grad():
            w = torch.tensor([1.0, 3.0, 9.0])
            batched = adapters(*args, guidance_scale=w, **kwargs).sample
            rows = [adapters(args[0][i:i + 1], args[1][i:i + 1], class_labels=kwargs["class_labels"][i:i + 1],
                             guidance_scale=float(w[i])).sample for i in range(3)]
            torch.testing.assert_close(batched, torch.cat(rows), rtol=1e-5, atol=1e-6)
            same = adapters(*args, guidance_scale=3.0, **kwargs).sample
            torch.testing.assert_close(same, adapters(*args, guidance_scale=torch.full((3,), 3.0), **kwargs).sample)
            assert not torch.allclose(same, batched)

            with pytest.raises(ValueError, match="3 entries for a batch of 2"):
                adapters(args[0][:2], args[1][:2], class_labels=kwargs["class_labels"][:2], guidance_scale=w)
            for bad, err in [(float("nan"), ValueError), ("7.5", TypeError), (True, TypeError),
                             (torch.ones(3, 1), ValueError), (torch.ones(3, dtype=torch.bool), TypeError)]:
                with pytest.raises(err, match="guidance_scale"):
                    adapters(*args, guidance_scale=bad, **kwargs)
            with pytest.raises(RuntimeError, match="no guidance scale"):
                digits.unet(*args, **kwargs)
    finally:
        adapters.remove()


def test_gradients_are_the_same_with_gradient_checkpointing(sd3):
    base = sd3.transformer
    args, kwargs = _inputs("sd3")
    adapters = _randomise(GuidanceAdapters(base))
    try:
        grads = []
        for checkpointing in (False, True):
            base.enable_gradient_checkpointing() if checkpointing else base.disable_gradient_checkpointing()
            adapters.zero_grad()
            out = adapters(*args, guidance_scale=torch.tensor([2.0, 5.0, 8.0]), **kwargs).sample
            out.square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in adapters.named_parameters()})
        assert grads[0]["tokens.guidance.mlp.0.weight"].abs().max() > 0  # w reaches the loss through the blocks
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        base.disable_gradient_checkpointing()
        adapters.remove()


@pytest.mark.parametrize("model", ["sd3", "digits"], indirect=True)
def test_save_load_round_trip(model, tmp_path):
    kind, base = model
    args, kwargs = _inputs(kind)
    config = AdapterConfig(width_ratio=0.5, head_dim=4, fourier_features=16, seed=3)
    adapters = _randomise(GuidanceAdapters(base, config))
    with torch.no_grad():
        expected = _sample(adapters(*args, guidance_scale=torch.tensor([1.0, 2.0, 7.5]), **kwargs))
    save_adapters(adapters, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["model_class"] == type(base).__name__ and saved["version"] == 1
    assert saved["num_parameters"] == adapters.num_parameters()
    assert [p["name"] for p in saved["injection_points"]] == [p.name for p in adapters.architecture.points]
    adapters.remove()

    copy_of_base = copy.deepcopy(base)
    loaded = load_adapters(copy_of_base, tmp_path)
    assert loaded.config == adapters.config
    state = loaded.state_dict()
    assert state.keys() == adapters.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in adapters.state_dict().items())
    with torch.no_grad():
        assert torch.equal(_sample(loaded(*args, guidance_scale=torch.tensor([1.0, 2.0, 7.5]), **kwargs)), expected)


def test_adapters_load_onto_a_finetune_and_nothing_else(sd, sd3, digits, tmp_path):
    base = sd.unet
    adapters = _randomise(GuidanceAdapters(base))
    save_adapters(sd, tmp_path)  # from the pipeline
    adapters.remove()

    finetune = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in finetune.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    loaded = load_adapters(finetune, tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in adapters.state_dict().items())
    args, kwargs = _inputs("sd")
    with torch.no_grad():
        guided = loaded(*args, guidance_scale=5.0, **kwargs).sample
        loaded.disable()
        plain = finetune(*args, **kwargs).sample
        loaded.enable()
    assert not torch.equal(guided, plain)

    load_adapters(copy.deepcopy(base).to(torch.bfloat16), tmp_path)  # another dtype is the same architecture

    wider = UNet2DConditionModel(**{**dict(base.config), "block_out_channels": (32, 96)})
    with pytest.raises(ValueError, match=r"differs in: down_blocks.1 \(parameter shapes differ\), mid_block"):
        load_adapters(wider, tmp_path)
    with pytest.raises(ValueError, match="made for a UNet2DConditionModel, not a SD3Transformer2DModel"):
        load_adapters(sd3, tmp_path)
    with pytest.raises(ValueError, match="made for a UNet2DConditionModel, not a UNet2DModel"):
        load_adapters(digits.unet, tmp_path)
    for model in (wider, sd3.transformer, digits.unet):
        assert GuidanceAdapters.attached_to(model) is None
    with pytest.raises(ValueError, match="already has guidance adapters"):
        load_adapters(finetune, tmp_path)
    loaded.remove()


def test_load_rejects_damaged_folders(sd3, tmp_path):
    base = sd3.transformer
    save_adapters(GuidanceAdapters(base), tmp_path / "ok")
    GuidanceAdapters.attached_to(base).remove()

    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    deeper = {**config["fingerprint"], "transformer_blocks.2": "0"}
    cases = {  # name: (config, damage the weights?, expected message)
        "version": ({**config, "version": 99}, False, "format version 99"),
        "deeper": ({**config, "fingerprint": deeper}, False, r"transformer_blocks.2 \(missing from this model\)"),
        "config": ({**config, "adapter_config": {**config["adapter_config"], "width": 3}}, False, "unknown Adapter"),
        "nan": (config, True, "not a finite float tensor"),
    }
    from safetensors.torch import load_file, save_file

    for name, (cfg, weights, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        state = load_file(str(tmp_path / "ok" / "adapters.safetensors"))
        if weights:
            state["blocks.0.to_q.weight"][0, 0] = float("nan")
        save_file(state, str(folder / "adapters.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_adapters(base, folder)
        assert GuidanceAdapters.attached_to(base) is None
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    (tmp_path / "ok" / "adapters.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapters.safetensors is missing"):
        load_adapters(base, tmp_path / "ok")


def test_bad_arguments_are_refused(digits):
    with pytest.raises(TypeError, match="guidance adapters support"):
        GuidanceAdapters(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="UNet2DModel offers no 'prompt' conditioning"):
        GuidanceAdapters(digits.unet, AdapterConfig(conditions=("timestep", "prompt")))
    with pytest.raises(ValueError, match="conditions must be distinct names"):
        AdapterConfig(conditions=("timestep", "colour"))
    with pytest.raises(ValueError, match="width_ratio"):
        AdapterConfig(width_ratio=0)
    with pytest.raises(TypeError, match="head_dim"):
        AdapterConfig(head_dim=8.0)
    adapters = GuidanceAdapters(digits.unet, AdapterConfig(conditions=("timestep",)))
    try:
        assert [s.name for s in adapters.tokens.sources] == ["timestep"]
        with pytest.raises(ValueError, match="already has guidance adapters"):
            GuidanceAdapters(digits.unet)
        with pytest.raises(ValueError, match="batch_order"):
            enable_guidance_adapters(digits, batch_order=("negative", "positive"))
        with pytest.raises(TypeError, match="expected a pipeline"):
            enable_guidance_adapters(digits.unet)
    finally:
        adapters.remove()
    with pytest.raises(ValueError, match="has no guidance adapters"):
        enable_guidance_adapters(digits)


def test_meta_device_counts_match_real_construction(sd):
    real = GuidanceAdapters(sd.unet)
    try:
        with torch.device("meta"):
            meta_base = UNet2DConditionModel(**dict(sd.unet.config))
        meta = GuidanceAdapters(meta_base)
        assert meta.num_parameters() == real.num_parameters()
        assert meta.base_num_parameters() == real.base_num_parameters()
        assert 0 < real.num_parameters() < 0.05 * real.base_num_parameters()
    finally:
        real.remove()


# --------------------------------------------------------------- pipelines: one forward per step
def _count_calls(module):
    rows = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    return rows, handle


def _text(pipe, **kw):
    kw = {"prompt": ["a photo of a cat", "a dog"], "num_inference_steps": 3, "height": 32, "width": 32,
          "output_type": "pt", "generator": torch.Generator().manual_seed(0), **kw}
    return pipe(**kw).images


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_text_pipelines_run_one_forward_per_step_and_disable_restores_cfg(kind, sd, sd3, tmp_path):
    pipe = sd if kind == "sd" else sd3
    denoiser = pipe.unet if kind == "sd" else pipe.transformer
    w = 5.0
    # CFG of the pipeline as the user holds it: disable_guidance_adapters restores exactly this state
    # (requires_grad flags included), so these are bitwise references for the end of the test.
    cfg = _text(pipe, guidance_scale=w)
    cfg_negative = _text(pipe, guidance_scale=w, negative_prompt=["blurry", "dark"])
    with _frozen(denoiser):  # as the adapters will hold it (see _frozen)
        conditional = _text(pipe, guidance_scale=1.0)
    assert not torch.equal(cfg, cfg_negative)

    save_adapters(GuidanceAdapters(denoiser), tmp_path / "zero")
    _randomise(GuidanceAdapters.attached_to(denoiser))
    save_adapters(denoiser, tmp_path / "trained")
    GuidanceAdapters.attached_to(denoiser).remove()

    rows, handle = _count_calls(denoiser)
    try:
        # Untrained adapters: guided sampling is the conditional model, one half-batch call per step.
        enable_guidance_adapters(pipe, tmp_path / "zero")
        assert torch.equal(_text(pipe, guidance_scale=w), conditional)
        steps = len(rows)
        assert steps >= 3 and set(rows) == {2}

        rows.clear()
        enable_guidance_adapters(pipe, tmp_path / "trained")
        guided = _text(pipe, guidance_scale=w)
        assert len(rows) == steps and set(rows) == {2}
        assert not torch.equal(guided, conditional)
        assert not torch.equal(guided, _text(pipe, guidance_scale=2.0))  # w reaches the adapters
        # Negative prompts are dropped with the unconditional half while the adapters are on (warned once).
        with pytest.warns(UserWarning, match="negative_prompt is ignored"):
            assert torch.equal(_text(pipe, guidance_scale=w, negative_prompt=["blurry", "dark"]), guided)
        if kind == "sd3":
            with pytest.raises(NotImplementedError, match="skip-layer guidance"):
                _text(pipe, guidance_scale=w, skip_guidance_layers=[0], num_inference_steps=10)

        rows.clear()
        disable_guidance_adapters(pipe)
        assert torch.equal(_text(pipe, guidance_scale=w), cfg)
        assert torch.equal(_text(pipe, guidance_scale=w, negative_prompt=["blurry", "dark"]), cfg_negative)
        assert set(rows) == {4}

        enable_guidance_adapters(pipe)  # back on, same adapters
        assert torch.equal(_text(pipe, guidance_scale=w), guided)
    finally:
        handle.remove()
        disable_guidance_adapters(pipe, remove=True)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in denoiser.modules())


@pytest.mark.parametrize("scheduler", [UniPCScheduler, DDIMScheduler])
def test_digits_pipeline_with_adapters_equals_a_manual_one_forward_loop(scheduler, tmp_path):
    pipe = load_digits_pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    save_adapters(_randomise(GuidanceAdapters(pipe.unet), std=0.05), tmp_path)
    GuidanceAdapters.attached_to(pipe.unet).remove()
    labels, steps = torch.tensor([0, 5, 9]), 6
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    cfg = pipe(labels, guidance_scale=2.5, num_inference_steps=steps, latents=noise, output_type="pt").images
    adapters = enable_guidance_adapters(pipe, tmp_path)
    try:
        for w in (2.5, 1.0):  # at w <= 1 the pipeline does not double the batch; the adapters still get w
            rows, handle = _count_calls(pipe.unet)
            images = pipe(labels, guidance_scale=w, num_inference_steps=steps, latents=noise, output_type="pt").images
            handle.remove()
            assert rows == [3] * steps

            # The same sampler written by hand: one conditional call per step, w given to the adapters.
            scheduler = pipe.scheduler
            scheduler.set_timesteps(steps)
            x = noise * scheduler.init_noise_sigma
            with torch.no_grad():
                for t in scheduler.timesteps:
                    eps = adapters(scheduler.scale_model_input(x, t), t, class_labels=labels, guidance_scale=w).sample
                    x = scheduler.step(eps, t, x).prev_sample
            assert torch.equal(images, x.clamp(-1, 1))
            assert not torch.equal(images, cfg)
    finally:
        disable_guidance_adapters(pipe, remove=True)
    assert torch.equal(pipe(labels, guidance_scale=2.5, num_inference_steps=steps, latents=noise,
                            output_type="pt").images, cfg)


# ------------------------------------------------------------------------ data parallel
def _ddp_gradients(rank, world, init_file, out_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        adapters = _randomise(GuidanceAdapters(_tiny_dit()))
        model = torch.nn.parallel.DistributedDataParallel(adapters)
        args, kwargs, w, target = _ddp_batch()
        rows = slice(rank * 2, rank * 2 + 2)
        out = model(args[0][rows], guidance_scale=w[rows], timestep=kwargs["timestep"][rows],
                    class_labels=kwargs["class_labels"][rows]).sample
        torch.nn.functional.mse_loss(out, target[rows]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in adapters.named_parameters()}, out_file)
        del model  # DDP's reducer must go before its process group (gloo can hang otherwise)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_batch():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(4, 4, 8, 8, generator=g),)
    kwargs = {"timestep": torch.tensor([900, 500, 50, 10]), "class_labels": torch.tensor([1, 4, 9, 2])}
    return args, kwargs, torch.tensor([1.0, 3.0, 6.0, 9.0]), torch.randn(4, 8, 8, 8, generator=g)


@pytest.mark.slow
def test_two_process_data_parallel_gradients_equal_one_process(tmp_path):
    torch.multiprocessing.spawn(_ddp_gradients, args=(2, tmp_path / "init", tmp_path / "grads.pt"), nprocs=2)
    ddp = torch.load(tmp_path / "grads.pt")

    adapters = _randomise(GuidanceAdapters(_tiny_dit()))
    args, kwargs, w, target = _ddp_batch()
    torch.nn.functional.mse_loss(adapters(*args, guidance_scale=w, **kwargs).sample, target).backward()
    assert ddp.keys() == dict(adapters.named_parameters()).keys()
    for name, param in adapters.named_parameters():
        torch.testing.assert_close(ddp[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiles_to_one_graph_with_per_sample_guidance(sd):
    args, kwargs = _inputs("sd")
    adapters = _randomise(GuidanceAdapters(sd.unet))
    try:
        compiled = torch.compile(adapters, backend="eager", fullgraph=True)
        with torch.no_grad():
            for w in (torch.tensor([1.0, 4.0, 9.0]), torch.tensor([2.0, 2.0, 12.0])):
                torch.testing.assert_close(compiled(*args, guidance_scale=w, **kwargs).sample,
                                           adapters(*args, guidance_scale=w, **kwargs).sample)
    finally:
        torch._dynamo.reset()
        adapters.remove()
