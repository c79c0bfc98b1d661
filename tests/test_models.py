"""Model I/O: one front door, open_clip's folder layout, safetensors only."""

import json

import open_clip
import pytest
import torch

from unlearning.models import WEIGHTS_FILE, count_parameters, load_model, register_tiny_configs, save_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("TinyCLIP-RN32", device="cpu")


def test_tiny_configs_are_registered_open_clip_names():
    names = register_tiny_configs()
    assert {"TinyCLIP-RN32", "TinyCLIP-ViT32"} <= set(names)
    assert open_clip.get_model_config("TinyCLIP-RN32")["vision_cfg"]["layers"] == [1, 1, 1, 1]


def test_default_tiny_clip_is_about_8_5_million_parameters(tiny):
    assert 8.0e6 < count_parameters(tiny.model) < 9.0e6
    assert tiny.image_size == 32


def test_save_then_load_is_bit_identical(tiny, tmp_path):
    folder = save_model(tiny, tmp_path / "m")
    loaded = load_model(f"local-dir:{folder}", device="cpu")
    original, restored = tiny.model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"] == tiny.model_cfg


def test_saved_folder_loads_with_plain_open_clip(tiny, tmp_path):
    folder = save_model(tiny, tmp_path / "m")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a photo of a circle"])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), tiny.model.encode_text(tokens), atol=1e-6)
    assert preprocess.transforms[0].size == 32


def test_plain_folder_path_is_accepted(tiny, tmp_path):
    folder = save_model(tiny, tmp_path / "m")
    assert load_model(str(folder), device="cpu").source == str(folder)


def test_folder_without_safetensors_is_refused_not_unpickled(tiny, tmp_path):
    folder = save_model(tiny, tmp_path / "m")
    (folder / WEIGHTS_FILE).unlink()
    torch.save(tiny.model.state_dict(), folder / "open_clip_pytorch_model.bin")  # a pickle: must not be read
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(f"local-dir:{folder}")


def test_unknown_model_name_says_what_to_use():
    with pytest.raises(ValueError, match="unknown model 'NoSuchCLIP'"):
        load_model("NoSuchCLIP")


def test_a_seed_makes_the_initialisation_reproducible_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_model("TinyCLIP-RN32", device="cpu", seed=5).model.state_dict()
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    again = load_model("TinyCLIP-RN32", device="cpu", seed=5).model.state_dict()
    other = load_model("TinyCLIP-RN32", device="cpu", seed=6).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])


def test_tiny_vit_config_builds():
    bundle = load_model("TinyCLIP-ViT32", device="cpu")
    with torch.no_grad():
        features = bundle.model.encode_image(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 128)
