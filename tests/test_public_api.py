"""The public API: mutators return the model, check_supported checks without mutating, dir() lists the API."""

import pytest
import timm

import tocom_hub


def _vit():
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2
    )


def test_dir_lists_the_api_only():
    names = dir(tocom_hub)
    for helper in ("sys", "types", "Any", "importlib"):
        assert helper not in names
    for api in ("patch", "set_r", "check_supported", "apply", "set_pair"):
        assert api in names


def test_patch_mutators_return_the_model():
    model = _vit()
    assert tocom_hub.patch(model) is model
    assert tocom_hub.set_r(model, 1) is model
    assert tocom_hub.unpatch(model) is model


def test_check_supported_describes_without_mutating():
    model = _vit()
    cls = type(model)
    info = tocom_hub.check_supported(model)
    assert info["model"] == "VisionTransformer" and info["depth"] == 2
    assert type(model) is cls and not tocom_hub.is_patched(model)


def test_check_supported_raises_what_patch_raises():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(TypeError) as checked:
        tocom_hub.check_supported(model)
    with pytest.raises(TypeError) as patched:
        tocom_hub.patch(model)
    assert str(checked.value) == str(patched.value)
    with pytest.raises(ValueError, match="positions"):
        tocom_hub.check_supported(_vit(), positions="nope")
