"""Pretrained backbones: model.weights from a local state dict (a torchvision weights name where the machine
may download), the input normalisation inside the model, errors before Ray starts."""

import pytest
import torch
import torchvision

from xai_core.models import IMAGENET_MEAN, IMAGENET_STD, build_model, normalize_inputs, weights_source, with_weights


def _imagenet_resnet18(tmp_path, seed=0):
    torch.manual_seed(seed)
    ref = torchvision.models.resnet18(num_classes=1000).eval()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save({"state_dict": ref.state_dict()}, path)  # a training checkpoint's wrapper
    return ref, path


def test_state_dict_backbone_is_loaded_with_a_fresh_head_and_normalised_inputs(tmp_path):
    ref, path = _imagenet_resnet18(tmp_path)
    model = with_weights(build_model("resnet18", 3), "resnet18", str(path)).eval()
    assert model.fc.out_features == 3 and model.default_layers == ["layer1", "layer2", "layer3", "layer4"]
    own = model.state_dict()
    assert set(own) == set(ref.state_dict())  # the normalisation buffers are not part of the state dict
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    x = torch.rand(2, 3, 64, 64)
    norm = torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    feats = torch.nn.Sequential(*list(ref.children())[:-1])  # the reference backbone, up to the pooled features
    with torch.no_grad():
        got = torch.flatten(torch.nn.Sequential(*list(model.children())[:-1])(norm(x)), 1)
        torch.testing.assert_close(got, torch.flatten(feats(norm(x)), 1))
        torch.testing.assert_close(model(x), model.fc(got))  # forward normalises [0,1] pixels itself


def test_gradcam_of_the_loaded_backbone_equals_pytorch_grad_cam_on_normalize_then_model(tmp_path):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from xai_core.attribution import explain

    _, path = _imagenet_resnet18(tmp_path)
    model = with_weights(build_model("resnet18", 4), "resnet18", str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    ours = explain(model, x, torch.tensor([1, 3]), method="gradcam")
    plain = build_model("resnet18", 4)
    plain.load_state_dict(model.state_dict())
    wrapped = torch.nn.Sequential(torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD), plain).eval()
    with pgc.GradCAM(model=wrapped, target_layers=[plain.layer4]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(3)])
    ours = ours / ours.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)  # pgc scales each map to max 1
    torch.testing.assert_close(ours, torch.from_numpy(theirs), atol=1e-4, rtol=1e-4)


def test_a_checkpoint_of_another_architecture_is_named(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"model.weights file '.*resnet34.pt': checkpoint does not fit ResNet "
                                         r"\(another architecture or num_classes\?\): unexpected keys: layer1.2"):
        with_weights(build_model("resnet18", 3), "resnet18", str(path))


def test_weights_names_and_files_are_checked_without_downloading(tmp_path):
    kind, w = weights_source("resnet50", "IMAGENET1K_V2")
    assert kind == "torchvision" and w.name == "IMAGENET1K_V2"
    with pytest.raises(ValueError, match=r"'IMAGENET9K' is not a weights name of resnet50: allowed IMAGENET1K_V1, "
                                         r"IMAGENET1K_V2, DEFAULT"):
        weights_source("resnet50", "IMAGENET9K")
    with pytest.raises(ValueError, match=r"model.weights file '.*missing.pth' not found"):
        weights_source("resnet50", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="small_resnet has no published weights"):
        weights_source("small_resnet", "IMAGENET1K_V1")


def test_normalize_inputs_keeps_names_and_applies_once():
    m = normalize_inputs(build_model("small_resnet", 3, width=4), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    plain = build_model("small_resnet", 3, width=4).eval()
    plain.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain((x - 0.5) / 0.25))
    assert m.cam_layer == "layer3" and type(m).__name__ == "NormalizedSmallResNet"
    with pytest.raises(ValueError, match="already normalises its inputs"):
        normalize_inputs(m, (0.5,) * 3, (0.25,) * 3)


def test_pipeline_fails_before_ray_on_a_checkpoint_for_another_arch(tmp_path, capsys):
    from pipelines import full
    from pipelines.config import ROOT

    path = tmp_path / "vit.pt"
    torch.save(build_model("vit_tiny", 6, image_size=32).state_dict(), path)
    sets = [f"model.weights={path}", f"storage.uri={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    rc = full.main(["--config", str(ROOT / "configs/smoke.yaml")] + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err
    assert rc == 1 and f"model.weights file {str(path)!r}: checkpoint does not fit SmallResNet" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()  # nothing started
