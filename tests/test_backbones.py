import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from embedpipe.flows.config import ExtractConfig
from embedpipe.storage.errors import BackboneError
from embedpipe.workers.descriptors.backbones import lite_classifier, load_backbone, load_in_order
from embedpipe.workers.embed import Embedder

CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_weights_are_real_imagenet_weights(demo_images):
    model = lite_classifier(0)
    img = Image.open(demo_images / "100100.jpg").convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    x = (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top = int(model(x).argmax())
    assert top in CAT_CLASSES


def test_in_order_loading_fails_loudly_on_mismatch():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    good = dict(model.state_dict())
    load_in_order(model, good, "same")
    bad = dict(good)
    first = next(iter(bad))
    bad[first] = torch.zeros(1, 2, 3)
    with pytest.raises(BackboneError, match="does not fit"):
        load_in_order(model, bad, "bad")
    with pytest.raises(BackboneError, match="tensors for a model of"):
        load_in_order(model, dict(list(good.items())[:-1]), "short")


def test_timm_and_torchvision_from_local_weights(tmp_path):
    torch.manual_seed(0)
    tm = timm.create_model("resnet18", pretrained=False)
    torch.save(tm.state_dict(), tmp_path / "timm_r18.pth")
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "tv_r18.pth")
    x = torch.rand(1, 3, 96, 128)
    for name, path in [("timm:resnet18", "timm_r18.pth"), ("torchvision:resnet18", "tv_r18.pth")]:
        trunk, spec = load_backbone(name, tmp_path / path)
        with torch.no_grad():
            assert trunk(x).shape == (1, 512, 3, 4)
        assert spec.channels == 512
    with pytest.raises(BackboneError, match="do not fit"):
        load_backbone("timm:resnet34", tmp_path / "timm_r18.pth")
    with pytest.raises(BackboneError, match="needs a local weights file"):
        load_backbone("torchvision:resnet18")
    with pytest.raises(BackboneError, match="timm:not_a_net"):
        load_backbone("timm:not_a_net", tmp_path / "timm_r18.pth")
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("nope")


def test_embedder_descriptors_are_unit_and_deterministic(demo_images):
    image = np.asarray(Image.open(demo_images / "100000.jpg").convert("RGB"))[:200, :300]
    emb = Embedder(ExtractConfig(descriptors=("gem", "spoc", "mac")))
    a, b = emb(image), emb(image)
    for name in ("gem", "spoc", "mac"):
        assert a[name].shape == (1280,) and a[name].dtype == np.float32
        assert np.linalg.norm(a[name]) == pytest.approx(1.0, abs=1e-5)
        assert np.array_equal(a[name], b[name])
