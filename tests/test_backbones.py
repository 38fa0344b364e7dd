import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from embedpipe.flows.config import load_config
from embedpipe.storage.contracts.config import ExtractConfig
from embedpipe.storage.contracts.errors import BackboneError
from embedpipe.workers.descriptors.backbones import lite_classifier, load_backbone, load_in_order
from embedpipe.workers.extract.embed import Embedder

from .helpers import decoded_batch

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


def test_channels_last_forward_equals_the_plain_layout(demo_images):
    """The embedder runs the backbone channels-last on every device; the descriptors are those of the
    default (NCHW) layout up to float rounding."""
    image = np.asarray(Image.open(demo_images / "100100.jpg").convert("RGB"))[:240, :320]
    emb = Embedder(ExtractConfig(descriptors=("gem", "mac"), runtime="torch"))
    out = emb(image)
    plain, _ = load_backbone("efficientnet_lite0")
    x = emb.preprocess(image).contiguous()
    with torch.no_grad():
        fmap = plain(x)
    assert fmap.is_contiguous() and not emb.preprocess(image).is_contiguous()
    gem = fmap.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1 / 3.0)[0]
    mac = fmap.amax(dim=(2, 3))[0]
    for name, ref in (("gem", gem), ("mac", mac)):
        assert np.allclose(out[name], (ref / ref.norm()).numpy(), atol=1e-5), name


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.alexnet()
    path = tmp_path_factory.mktemp("w") / "alexnet.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_fc_codes_come_from_the_same_forward_pass(alexnet_weights, demo_images):
    path, model = alexnet_weights
    cfg = ExtractConfig(
        backbone="torchvision:alexnet",
        weights=path,
        descriptors=("fc6", "fc7", "gem", "rmac"),
        runtime="torch",
    )
    emb = Embedder(cfg)
    image = np.asarray(Image.open(demo_images / "100100.jpg").convert("RGB"))[:180, :240]
    out = emb(image)
    assert {k: v.shape for k, v in out.items()} == {
        "fc6": (4096,),
        "fc7": (4096,),
        "gem": (256,),
        "rmac": (256,),
    }
    with torch.no_grad():
        x = emb.preprocess(image)
        fc6 = torch.relu(model.classifier[1](torch.flatten(model.avgpool(model.features(x)), 1)))
        fc7 = torch.relu(model.classifier[4](fc6))
    for name, ref in (("fc6", fc6), ("fc7", fc7)):
        ref = (ref / ref.norm()).numpy()[0]
        assert np.allclose(out[name], ref, atol=1e-5), name
    with pytest.raises(BackboneError, match="fc6/fc7"):
        Embedder(ExtractConfig(descriptors=("fc6",)))


def test_multi_scale_power_and_bf16(demo_images):
    from embedpipe.workers.descriptors.pooling import gem, l2n
    from embedpipe.workers.extract.embed import rescale

    image = np.asarray(Image.open(demo_images / "100200.jpg").convert("RGB"))[:240, :320]
    one = Embedder(ExtractConfig(descriptors=("gem",), runtime="torch"))
    multi = Embedder(ExtractConfig(descriptors=("gem",), scales=(1.0, 0.5), power=0.5, runtime="torch"))
    with torch.no_grad():
        parts = [l2n(gem(one.model(one.preprocess(rescale(image, s))))) for s in (1.0, 0.5)]
        total = parts[0] + parts[1]
        ref = l2n(total.sign() * total.abs().sqrt())[0].numpy()
    assert rescale(image, 0.5).shape == (120, 160, 3)
    assert np.allclose(multi(image)["gem"], ref, atol=1e-5)
    fast = Embedder(ExtractConfig(descriptors=("gem",), precision="bf16", runtime="torch"))(image)["gem"]
    assert float(fast @ one(image)["gem"]) > 0.99


@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_and_lite2_weights_are_real(demo_images, variant):
    model = lite_classifier(variant)
    img = Image.open(demo_images / "100100.jpg").convert("RGB").resize((240, 240), Image.Resampling.BICUBIC)
    x = (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        assert int(model(x).argmax()) in CAT_CLASSES


def test_weights_from_the_library_cache(tmp_path, monkeypatch):
    from embedpipe.workers.descriptors.backbones import cached_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(BackboneError, match="no cached weights"):
        load_backbone("torchvision:resnet18", "cache")
    with pytest.raises(BackboneError, match="Hugging Face cache"):
        cached_weights("timm:resnet18")
    torch.manual_seed(3)
    model = torchvision.models.resnet18()
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    target = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(model.state_dict(), target)
    trunk, _ = load_backbone("torchvision:resnet18", "cache")
    assert torch.equal(trunk[0].weight, model.conv1.weight)
    assert load_config(sets=["extract.weights=cache"]).extract.weights == "cache"


def test_shape_buckets_group_equal_shapes_without_padding():
    from embedpipe.workers.extract.embed import shape_buckets

    shapes = [(4, 6, 3), (6, 4, 3), (4, 6, 3), (4, 6, 3), (5, 5, 3), (6, 4, 3), (4, 6, 3)]
    assert shape_buckets(shapes, 3) == [[0, 2, 3], [6], [1, 5], [4]]
    assert shape_buckets(shapes, 1) == [[i] for i in (0, 2, 3, 6, 1, 5, 4)]
    assert shape_buckets([], 4) == []


def test_embed_many_stacks_each_shape_and_matches_one_image_at_a_time(demo_images):
    photo = np.asarray(Image.open(demo_images / "100000.jpg").convert("RGB"))
    crops = [(0, 200, 0, 300), (0, 300, 0, 200), (40, 240, 10, 310), (0, 160, 0, 240), (50, 350, 0, 200)]
    crops += [(20, 220, 30, 330)]
    images = [np.ascontiguousarray(photo[a:b, c:d]) for a, b, c, d in crops]
    cfg = ExtractConfig(
        descriptors=("gem", "spoc", "rmac"), scales=(1.0, 0.5), forward_batch=4, runtime="torch"
    )
    stacked, alone = Embedder(cfg), Embedder(cfg.model_copy(update={"forward_batch": 1}))
    sizes: list[int] = []
    hook = stacked.model.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[0]))
    many = stacked.embed_many(images)
    # one forward per scale and shape: 3 of 200x300, 2 of 300x200, 1 of 160x240
    assert sizes == [3, 3, 2, 2, 1, 1]
    hook.remove()
    again = stacked.embed_many(images)
    for image, got, got_again in zip(images, many, again, strict=True):
        ref = alone(image)
        for name in ("gem", "spoc", "rmac"):
            assert np.array_equal(got[name], got_again[name]), name  # same buckets, same bytes
            assert np.allclose(got[name], ref[name], rtol=0, atol=1e-6), name  # no padding effects


def test_model_actor_gives_the_error_to_the_image_the_model_cannot_take(alexnet_weights, demo_images):
    from embedpipe.workers.engines.ray_stages import EmbedActor

    path, _ = alexnet_weights
    cfg = ExtractConfig(backbone="torchvision:alexnet", weights=path, descriptors=("gem",), forward_batch=8)
    photo = np.asarray(Image.open(demo_images / "100100.jpg").convert("RGB"))
    images = [photo[:180, :240], photo[:10, :10], photo[20:200, :240]]  # alexnet cannot pool a 10x10 map
    batch = decoded_batch(images, ["a", "t", "b"])
    out = EmbedActor(cfg, threads=1)(batch)  # a batch decoded by the decode stage
    assert out["error"][0] == "" and out["error"][2] == ""
    assert out["error"][1].startswith("model failed on image:")
    emb = Embedder(cfg)
    assert np.array_equal(out["d_gem"][0], emb(np.ascontiguousarray(images[0]))["gem"])
    assert np.array_equal(out["d_gem"][2], emb(np.ascontiguousarray(images[2]))["gem"])
    assert not out["d_gem"][1].any()
