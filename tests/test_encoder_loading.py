import hashlib
import urllib.error

import pytest
import torch

from conftest import meta_state_dict
from models import load_encoder, registry as encoders


@pytest.mark.parametrize("name,registers", [("dinov2_vit_small_14", 0), ("dinov2reg_vit_small_14", 4)])
def test_loads_meta_layout_for_vit_small(tmp_path, name, registers):
    sd = meta_state_dict(384, 12, registers, torch.Generator().manual_seed(1))
    path = tmp_path / "weights.pth"
    torch.save(sd, path)
    encoder = load_encoder(name, str(path), verbose=False)
    loaded = encoder.state_dict()
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key
    assert encoder.num_register_tokens == registers


def test_rejects_mismatched_checkpoint_with_named_keys(tmp_path):
    sd = meta_state_dict(384, 12, 0, torch.Generator().manual_seed(1))
    sd.pop("blocks.3.ls1.gamma")
    sd["head.weight"] = torch.zeros(3)
    sd["blocks.0.attn.qkv.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError) as error:
        load_encoder("dinov2_vit_small_14", str(path))
    message = str(error.value)
    assert str(path) in message
    assert "blocks.3.ls1.gamma" in message and "head.weight" in message and "blocks.0.attn.qkv.bias" in message


def test_registers_checkpoint_into_plain_architecture_is_rejected(tmp_path):
    path = tmp_path / "reg.pth"
    torch.save(meta_state_dict(384, 12, 4, torch.Generator().manual_seed(1)), path)
    with pytest.raises(RuntimeError, match="register_tokens"):
        load_encoder("dinov2_vit_small_14", str(path))


def test_cached_official_file_is_verified_by_sha256(tmp_path):
    spec = encoders.ENCODERS["dinov2_vit_small_14"]
    (tmp_path / spec.file_name).write_bytes(b"not the real checkpoint")
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        load_encoder("dinov2_vit_small_14", weights_dir=str(tmp_path))


def test_cached_file_with_matching_digest_is_loaded(tmp_path, monkeypatch):
    sd = meta_state_dict(384, 12, 0, torch.Generator().manual_seed(2))
    spec = encoders.ENCODERS["dinov2_vit_small_14"]
    path = tmp_path / spec.file_name
    torch.save(sd, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(encoders.ENCODERS, "dinov2_vit_small_14",
                        encoders.EncoderSpec(384, 12, 6, 0, url=spec.url, sha256=digest))
    encoder = load_encoder("dinov2_vit_small_14", weights_dir=str(tmp_path), verbose=False)
    assert torch.equal(encoder.pos_embed, sd["pos_embed"])


def test_offline_error_names_url_file_and_directory(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(RuntimeError) as error:
        load_encoder("dinov2reg_vit_base_14", weights_dir=str(tmp_path))
    message = str(error.value)
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth" in message
    assert str(tmp_path / "dinov2_vitb14_reg4_pretrain.pth") in message
    assert not list(tmp_path.iterdir()), "a failed download must leave no partial file"


def test_random_encoder_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        load_encoder("dinov2_vit_tiny_14", "random")


def test_unknown_encoder_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder 'dinov2_vit_huge_14'"):
        load_encoder("dinov2_vit_huge_14", "random")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_encoder("dinov2_vit_small_14", str(tmp_path / "nothere.pth"))


def test_registry_urls_follow_meta_naming():
    assert encoders.ENCODERS["dinov2reg_vit_large_14"].url.endswith("dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth")
    assert encoders.ENCODERS["dinov2_vit_giant_14"].url.endswith("dinov2_vitg14/dinov2_vitg14_pretrain.pth")
    assert encoders.ENCODERS["dinov2reg_vit_small_14"].sha256.startswith("f433177089")
