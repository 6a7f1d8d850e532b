"""Feature extractors: offline loading, resize modes, input conventions, batch independence, registry."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewstep.eval.metrics.features as features_module
from fewstep.eval.metrics.features import (
    FeatureExtractor,
    ModuleFeatureExtractor,
    extract_features,
    feature_extractor,
    list_feature_extractors,
    quantize_images,
    register_feature_extractor,
    resize_images,
    state_dict_sha256,
)
from fewstep.eval.metrics.inception import (
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    FIDInceptionV3,
    random_fid_inception,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _images(n: int, size: int = 32, seed: int = 0, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


# --- InceptionV3 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> tuple[FIDInceptionV3, Path]:
    """A random-weight FID InceptionV3, saved the way the real weights file is (a plain state dict)."""
    net = random_fid_inception(seed=0)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def inception(random_inception) -> FeatureExtractor:
    with pytest.warns(UserWarning, match="not the standard FID InceptionV3 file"):
        return feature_extractor("inception", weights=random_inception[1])


def test_inception_loads_from_the_standard_cache_path(random_inception, tmp_path, monkeypatch, no_network):
    net, path = random_inception
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / INCEPTION_WEIGHTS_NAME).symlink_to(path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.warns(UserWarning, match=r"SHA-256 [0-9a-f]{16}\.\.\.\) is not the standard"):
        from_cache = feature_extractor("inception")
    images = _images(1)
    feats = from_cache(images)
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32 and feats.abs().max() > 0.1
    # Every saved tensor (BN running statistics included) is what the network computes with.
    x = resize_images(images.float(), 299, "legacy")
    assert torch.equal(feats, net((x - 128) / 128))
    assert from_cache.metadata() == {
        "extractor": "inception", "weights_hash": state_dict_sha256(net), "resize": "legacy", "input_size": 299,
    }


def test_missing_inception_weights_error_says_what_to_put_where(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected_path = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME
    with pytest.raises(FileNotFoundError) as info:
        feature_extractor("inception")
    message = str(info.value)
    for part in (str(expected_path), "never downloads", "6726825d", "weights=PATH", INCEPTION_WEIGHTS_URL):
        assert part in message
    with pytest.raises(FileNotFoundError, match="given weights file .*nowhere.pth"):
        feature_extractor("inception", weights=tmp_path / "nowhere.pth")


def test_wrong_inception_files_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth does not hold FID InceptionV3 weights"):
        feature_extractor("inception", weights=tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth is not a readable PyTorch state dict"):
        feature_extractor("inception", weights=tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="resize must be one of"):
        feature_extractor("inception", weights=tmp_path / "junk.pth", resize="bilinear")


@pytest.mark.slow
def test_inception_features_do_not_depend_on_batch_size(inception):
    images = _images(32, size=48)
    reference = extract_features(inception, images, batch_size=32)
    for batch_size in (1, 7):
        assert _max_rel_diff(extract_features(inception, images, batch_size=batch_size), reference) < 1e-5


@pytest.mark.slow
def test_inception_fd_matches_torchmetrics(inception):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from fewstep.eval.metrics.fd import frechet_distance
    from fewstep.eval.metrics.stats import FeatureStatistics

    real, fake = _images(6, seed=1), _images(5, seed=2)
    metric = FrechetInceptionDistance(feature=inception, normalize=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = metric.compute().item()
    stats = [FeatureStatistics().update(extract_features(inception, x, batch_size=4)) for x in (real, fake)]
    # torchmetrics takes square roots of the round-off eigenvalues of its rank-4 product: ~1e-7.
    assert frechet_distance(*stats[0].result(), *stats[1].result()) == pytest.approx(expected, rel=1e-5)


# --- resize modes -------------------------------------------------------------------------------


def _tf1_bilinear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF 1.x resize_bilinear(align_corners=False) in float64: source position = i * in / out."""
    h, w = img.shape

    def axis(n_in, n_out):
        pos = np.arange(n_out) * (n_in / n_out)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo

    (y0, y1, dy), (x0, x1, dx) = axis(h, out_h), axis(w, out_w)
    top = img[y0][:, x0] * (1 - dx) + img[y0][:, x1] * dx
    bottom = img[y1][:, x0] * (1 - dx) + img[y1][:, x1] * dx
    return top * (1 - dy[:, None]) + bottom * dy[:, None]


@pytest.mark.parametrize("shape", [(32, 32), (64, 48), (512, 400)])
def test_legacy_resize_is_tensorflow_bilinear(shape):
    img = torch.randint(0, 256, (1, 1, *shape), generator=torch.Generator().manual_seed(3)).float()
    ours = resize_images(img, 299, "legacy")[0, 0].double().numpy()
    # TF 1.x, like ours, computes source positions in float32: ~n_in * 2^-24 pixels of slack.
    reference = _tf1_bilinear_reference(img[0, 0].double().numpy(), 299, 299)
    np.testing.assert_allclose(ours, reference, atol=255 * shape[0] * 2.0**-23)


@pytest.mark.parametrize("shape, size", [((32, 32), 299), ((512, 400), 299), ((300, 300), 224)])
def test_clean_resize_is_pil_bicubic(shape, size):
    """clean-fid / dgm-eval resize each channel as a float ('F') PIL image with BICUBIC."""
    img = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(4)) * 255
    pil = np.asarray(PIL.Image.fromarray(img[0, 0].numpy()).resize((size, size), PIL.Image.BICUBIC))
    ours = resize_images(img, size, "clean")[0, 0].numpy()
    np.testing.assert_allclose(ours, np.clip(pil, 0, 255), atol=1e-2)


def test_legacy_and_clean_resize_differ_as_documented():
    # Same size: both are the identity.
    img = _images(1, size=299).float()
    assert torch.equal(resize_images(img, 299, "legacy"), img) and torch.equal(resize_images(img, 299, "clean"), img)
    # Downscaling a one-pixel checkerboard by 2: legacy aliases it to a constant, clean averages to grey.
    board = ((torch.arange(598)[:, None] + torch.arange(598)[None, :]) % 2 * 255.0)[None, None]
    legacy, clean = resize_images(board, 299, "legacy"), resize_images(board, 299, "clean")
    assert torch.equal(legacy, torch.zeros_like(legacy))
    torch.testing.assert_close(clean[..., 2:-2, 2:-2], torch.full_like(clean[..., 2:-2, 2:-2], 127.5))
    # Upscaling a ramp: legacy samples source position j * in/out, clean (j + 1/2) * in/out - 1/2
    # (pixel centres aligned), so legacy is shifted by (1 - in/out) / 2 source pixels.
    ramp = torch.arange(32.0).expand(1, 1, 32, 32)
    j = torch.arange(299.0)
    interior = slice(20, 270)
    torch.testing.assert_close(resize_images(ramp, 299, "legacy")[0, 0, 0, interior], (j * 32 / 299)[interior])
    torch.testing.assert_close(resize_images(ramp, 299, "clean")[0, 0, 0, interior],
                               ((j + 0.5) * 32 / 299 - 0.5)[interior], atol=1e-4, rtol=0)


def test_quantization_round_trips_every_8_bit_level():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(quantize_images(levels.float() / 255), levels.float())
    assert torch.equal(quantize_images(levels.double() / 255), levels.float())


# --- transformers extractors (tiny random checkpoints) ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14)
    Dinov2Model(Dinov2Config(**vit, image_size=28)).save_pretrained(root / "dinov2")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=99, max_position_embeddings=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config={**vit, "image_size": 28}, projection_dim=16)
              ).save_pretrained(root / "clip")
    return {"dinov2": root / "dinov2", "clip": root / "clip"}


def _normalised(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True).clamp(0, 255) / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_dinov2_features_are_the_final_cls_token(tiny_checkpoints, no_network):
    from transformers import Dinov2Model

    extractor = feature_extractor("dinov2", checkpoint=tiny_checkpoints["dinov2"])
    images = _images(3, size=40)
    model = Dinov2Model.from_pretrained(tiny_checkpoints["dinov2"]).eval()
    with torch.no_grad():  # Stein et al.: 224x224 bicubic, ImageNet mean/std, CLS after the last norm
        pixels = _normalised(images, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        expected = model(pixel_values=pixels).last_hidden_state[:, 0]
    feats = extract_features(extractor, images)
    assert feats.shape == (3, 32) and extractor.feature_dim == 32
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    meta = extractor.metadata()
    assert meta["extractor"] == "dinov2" and meta["resize"] == "clean" and meta["input_size"] == 224


def test_input_conventions(tiny_checkpoints):
    """uint8, [0, 1] floats (rounded to 8 bits), [-1, 1] floats via value_range, grayscale as RGB."""
    extractor = feature_extractor("dinov2", checkpoint=tiny_checkpoints["dinov2"])
    gray = _images(2, size=20, channels=1)
    expected = extractor(gray.expand(-1, 3, -1, -1))
    assert torch.equal(extractor(gray), expected)
    assert torch.equal(extractor(gray.float() / 255), expected)
    assert torch.equal(extract_features(extractor, gray.double() / 127.5 - 1, value_range=(-1, 1)), expected)


def test_clip_features_are_the_vision_tower_pooled_output(tiny_checkpoints, no_network):
    from transformers import CLIPModel

    extractor = feature_extractor("clip", checkpoint=tiny_checkpoints["clip"], resize="legacy")
    images = _images(2, size=40)
    model = CLIPModel.from_pretrained(tiny_checkpoints["clip"]).eval()
    with torch.no_grad():  # dgm-eval's FD_CLIP: post-layernorm CLS, no projection, CLIP mean/std
        x = resize_images(images.float(), 28, "legacy") / 255
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        expected = model.vision_model(pixel_values=(x - mean) / std).pooler_output
    torch.testing.assert_close(extract_features(extractor, images), expected, rtol=1e-5, atol=1e-6)
    assert extractor.metadata()["input_size"] == 28 and extractor.metadata()["resize"] == "legacy"


def test_transformers_checkpoint_errors(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="holds a 'clip' model; the dinov2 extractor needs"):
        feature_extractor("dinov2", checkpoint=tiny_checkpoints["clip"])
    with pytest.raises(FileNotFoundError, match="no config.json.*never downloads"):
        feature_extractor("dinov2", checkpoint=tmp_path / "absent")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((tiny_checkpoints["dinov2"] / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="partial"):
        feature_extractor("dinov2", checkpoint=partial)
    state = load_file(tiny_checkpoints["dinov2"] / "model.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, partial / "model.safetensors")
    with pytest.raises(ValueError, match="lacks weights for the dinov2 model"):
        feature_extractor("dinov2", checkpoint=partial)


# --- batch-size independence, digits, registry -------------------------------------------------------


def test_features_do_not_depend_on_batch_size(tiny_checkpoints):
    """Batch 1 vs 7 vs 32 (measured on CPU: convolutions differ by <= 5e-7 relative, the ViT not at all)."""
    from fewstep.zoo.digits import load_digits_data

    digits, _ = load_digits_data("test")
    cases = [
        (feature_extractor("digits"), (digits[:64] + 1) / 2),
        (feature_extractor("dinov2", checkpoint=tiny_checkpoints["dinov2"]), _images(32, size=30)),
        (feature_extractor("torch.nn:Conv2d", in_channels=3, out_channels=4, kernel_size=3), _images(64, size=9)),
    ]
    for extractor, images in cases:
        reference = extract_features(extractor, images, batch_size=32)
        for batch_size in (1, 7):
            assert _max_rel_diff(extract_features(extractor, images, batch_size=batch_size), reference) <= 1e-5
        extractor.train()
        assert not any(m.training for m in extractor.modules())  # train() cannot enable batch statistics


def test_digits_extractor_comes_from_the_zoo_through_the_registry():
    from fewstep.zoo.digits import DigitsFeatureExtractor, digits_features, load_digits_data

    extractor = feature_extractor("digits")
    assert isinstance(extractor, DigitsFeatureExtractor) and extractor.feature_dim == 64
    real, _ = load_digits_data("test")
    torch.testing.assert_close(extract_features(extractor, real, value_range=(-1, 1)), digits_features(real))
    as_uint8 = ((real + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(extractor(as_uint8), extractor((real + 1) / 2), atol=0.05, rtol=0)
    assert set(extractor.metadata()) == {"extractor", "weights_hash"}
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        extractor(torch.zeros(2, 1, 9, 9))


def test_metric_code_never_imports_the_zoo():
    package = Path(features_module.__file__).parents[2]  # fewstep/: metrics and the ground floor (shards, process group)
    for path in [*(package / "eval" / "metrics").glob("*.py"), *(package / "infra").glob("*.py")]:
        name = path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert "zoo" not in target, f"{name} imports {target}"
            elif isinstance(node, ast.Import):
                assert not any("zoo" in alias.name for alias in node.names), name


def test_module_callable_spec_and_options():
    extractor = feature_extractor("torch.nn:Conv2d", in_channels=3, out_channels=2, kernel_size=3)
    assert isinstance(extractor, ModuleFeatureExtractor)
    assert extract_features(extractor, _images(4, size=8)).shape == (4, 2 * 6 * 6)
    meta = extractor.metadata()
    assert meta["extractor"] == "torch.nn:Conv2d" and meta["options"]["out_channels"] == 2
    assert meta["weights_hash"] == state_dict_sha256(extractor.network)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['kernel'\]; allowed: .*kernel_size"):
        feature_extractor("torch.nn:Conv2d", in_channels=3, out_channels=2, kernel=3)
    with pytest.raises(ValueError, match="has no attribute 'NoSuchNet'"):
        feature_extractor("torch.nn:NoSuchNet")
    with pytest.raises(ValueError, match="cannot import 'no_such_package_xyz'"):
        feature_extractor("no_such_package_xyz:net")
    with pytest.raises(ValueError, match="is the class dict, not an nn.Module subclass"):  # refused before the call
        feature_extractor("builtins:dict")


def test_registry(monkeypatch):
    monkeypatch.setattr(features_module, "_REGISTRY", dict(features_module._REGISTRY))
    assert {"inception", "dinov2", "clip", "digits"} <= set(list_feature_extractors())

    @register_feature_extractor("flat")
    def flat(scale: float = 1.0) -> nn.Module:
        return nn.Flatten()

    assert isinstance(feature_extractor("flat", scale=2.0), ModuleFeatureExtractor)
    with pytest.raises(ValueError, match="already registered"):
        register_feature_extractor("flat", lambda: nn.Flatten())
    with pytest.raises(ValueError, match="contain no ':'"):
        register_feature_extractor("a:b", flat)
    with pytest.raises(ValueError, match=r"unknown feature extractor 'incepton'; choose one of \["):
        feature_extractor("incepton")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['weight'\]; allowed: \['weights', 'resize'\]"):
        feature_extractor("inception", weight="x")


def test_input_errors(inception):
    extractor = feature_extractor("torch.nn:Flatten")
    with pytest.raises(ValueError, match=r"value_range=\(-1, 1\)"):
        extract_features(extractor, torch.rand(2, 3, 4, 4) * 2 - 1)
    with pytest.raises(ValueError, match="value_range must be"):
        extract_features(extractor, torch.rand(2, 3, 4, 4), value_range=(0, 255))
    with pytest.raises(TypeError, match="uint8"):
        extract_features(extractor, torch.zeros(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        extract_features(extractor, torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(extractor, torch.rand(2, 3, 4, 4), batch_size=0)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        inception(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))
