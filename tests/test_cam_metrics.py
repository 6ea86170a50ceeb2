"""wsss.cam.metrics: Average Drop / Increase against torchcam, Deletion / Insertion against a float64 loop."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from wsss.cam.metrics import average_drop_increase, deletion_insertion, pixel_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip


def _inputs(n_images: int = 3, size: int = 12, map_size: int = 6):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n_images, 3, size, size, generator=g)
    targets = torch.tensor([[i, c] for i in range(n_images) for c in (i % 5, (i + 2) % 5)])
    maps = torch.rand(len(targets), map_size, map_size, generator=g)
    maps[0] = 0.0  # an all-zero map: every pixel ties
    maps[1, :2] = 1.0  # ties at the top
    return images, targets, maps


def test_average_drop_and_increase_equal_torchcam():
    torchcam_metrics = pytest.importorskip("torchcam.metrics")
    model = _model()
    images, targets, maps = _inputs()
    ours = average_drop_increase(model, images, targets, maps, score_fn=torch.sigmoid)

    class GivenMaps:  # torchcam's CAM extractor interface, returning the maps under test
        def __init__(self, model, maps):
            self.model, self.maps = model, maps

        def __call__(self, class_idx, scores):
            return [self.maps]

        def fuse_cams(self, cams):
            return cams[0]

        @contextlib.contextmanager
        def _hooks_off(self):
            yield

    drops, increases = [], []
    for k, (i, c) in enumerate(targets.tolist()):  # one pair per update, as torchcam scores one class per image
        metric = torchcam_metrics.ClassificationMetric(GivenMaps(model, maps[k : k + 1]), torch.sigmoid)
        metric.update(images[i : i + 1], class_idx=[c])
        s = metric.summary()
        drops.append(s["avg_drop"])
        increases.append(s["conf_increase"])
    assert ours["drop"].tolist() == pytest.approx(drops, abs=1e-5)
    assert ours["increase"].float().tolist() == increases
    assert ours["average_drop"] == pytest.approx(100 * np.mean(drops), abs=1e-3)
    assert ours["increase_in_confidence"] == pytest.approx(100 * np.mean(increases), abs=1e-9)


def _reference_blur(image: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's blurred image in float64, written here: a normalised Gaussian of `size` taps, applied along rows
    and columns of the image mirrored at its borders (the edge pixel not repeated), one output pixel at a time."""
    half = size // 2
    g = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    g /= g.sum()
    x = np.pad(image.double().numpy(), ((0, 0), (half, half), (half, half)), mode="reflect")
    c, h, w = image.shape
    out = np.zeros((c, h, w))
    for y in range(h):
        for xx in range(w):
            out[:, y, xx] = np.einsum("cij,i,j->c", x[:, y : y + size, xx : xx + size], g, g)
    return torch.from_numpy(out)


def _reference_curves(model, images, targets, maps, steps, baseline):
    """Deletion and insertion in float64, one image and one step at a time, pixels ordered by a sort written
    here (value descending, then row-major index ascending)."""
    model = model.double()
    h, w = images.shape[-2:]
    up = nn.functional.interpolate(maps[:, None].double(), (h, w), mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp(0, 1).numpy()
    curves = {"deletion": [], "insertion": []}
    for k, (i, c) in enumerate(targets.tolist()):
        image = images[i].double()
        if baseline == "blur":
            base = _reference_blur(images[i])
        else:
            base = torch.zeros_like(image) if baseline == "zeros" else baseline.double().expand_as(image)
        flat = up[k].ravel()
        order = sorted(range(h * w), key=lambda j: (-flat[j], j))
        for name in curves:
            row = []
            for step in range(steps + 1):
                top = order[: step * h * w // steps]
                mask = torch.zeros(h * w, dtype=torch.bool)
                mask[top] = True
                mask = mask.reshape(1, h, w)
                x = torch.where(mask, base, image) if name == "deletion" else torch.where(mask, image, base)
                with torch.no_grad():
                    row.append(torch.sigmoid(model(x[None]))[0, c].item())
            curves[name].append(row)
    model.float()
    return {k: np.array(v) for k, v in curves.items()}


@pytest.mark.parametrize("baseline", ["zeros", "blur", "tensor"])
def test_deletion_and_insertion_equal_a_float64_loop(baseline):
    model = _model()
    images, targets, maps = _inputs()
    base = baseline if baseline != "tensor" else torch.tensor([0.5, -0.25, 1.0]).view(3, 1, 1)
    ours = deletion_insertion(model, images, targets, maps, steps=8, baseline=base)
    ref = _reference_curves(model, images, targets, maps, 8, base)
    for name in ("deletion", "insertion"):
        assert ours[name].numpy() == pytest.approx(ref[name], abs=1e-5), name
        auc = np.trapezoid(ref[name], dx=1 / 8, axis=1)
        assert ours[f"{name}_auc"].numpy() == pytest.approx(auc, abs=1e-5)
    assert torch.isfinite(ours["deletion_auc"]).all()


def test_results_do_not_depend_on_the_batch_size():
    model = _model()
    images, targets, maps = _inputs()
    one = deletion_insertion(model, images, targets, maps, steps=6, batch_size=1)
    many = deletion_insertion(model, images, targets, maps, steps=6, batch_size=64)
    for k in one:
        torch.testing.assert_close(one[k], many[k], rtol=0, atol=1e-6)
    a = average_drop_increase(model, images, targets, maps, batch_size=1)
    b = average_drop_increase(model, images, targets, maps, batch_size=64)
    torch.testing.assert_close(a["drop"], b["drop"], rtol=0, atol=1e-6)
    assert torch.equal(a["increase"], b["increase"])


def test_pixel_ranks_break_ties_by_index():
    maps = torch.tensor([[[0.5, 0.9], [0.5, 0.9]], [[0.0, 0.0], [0.0, 0.0]]])
    assert pixel_ranks(maps).tolist() == [[[2, 0], [3, 1]], [[0, 1], [2, 3]]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i, t, m: (i, t, m * 2), r"maps must be in \[0, 1\]"),
        (lambda i, t, m: (i, t, m.masked_fill(torch.ones_like(m, dtype=torch.bool), float("nan"))), "NaN"),
        (lambda i, t, m: (i, t, m[:-1]), "maps must be"),
        (lambda i, t, m: (i, torch.tensor([[0, 7]] * len(t)), m), r"target classes must be in \[0, 5\)"),
        (lambda i, t, m: (i, torch.tensor([[9, 0]] * len(t)), m), "target image indices"),
        (lambda i, t, m: (i[0], t, m), "images must be"),
    ],
)
def test_bad_input_is_refused_by_name(change, message):
    images, targets, maps = _inputs()
    with pytest.raises(ValueError, match=message):
        deletion_insertion(_model(), *change(images, targets, maps), steps=2)


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        deletion_insertion(_model(), *_inputs(), steps=0)


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_imputation_equals_road_s_sparse_solve(solver):
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from wsss.cam.metrics import impute

    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 14, 17, generator=g)
    removed = torch.rand(2, 14, 17, generator=g) > 0.2  # 80 % removed, as MoRF at the 20th percentile
    ours = impute(images, removed, solver=solver)
    for b in range(2):
        ref = road_module.NoisyLinearImputer(noise=0.0)(images[b], (~removed[b]).float())
        torch.testing.assert_close(ours[b], ref, rtol=0, atol=1e-5)
    assert torch.equal(ours[~removed[:, None].expand_as(images)], images[~removed[:, None].expand_as(images)])


def test_road_equals_pytorch_grad_cam_without_noise():
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from wsss.cam.metrics import road

    model = _model()
    images, targets, _ = _inputs()
    maps = torch.rand(len(targets), 6, 6, generator=torch.Generator().manual_seed(5))  # no ties at a percentile
    percentiles = (20, 50, 80)
    ours = road(model, images, targets, maps, percentiles=percentiles)
    up = nn.functional.interpolate(maps[:, None], images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp(0, 1).numpy()
    inputs = images[targets[:, 0]]
    score_of = [lambda out, c=c: torch.sigmoid(out)[c] for c in targets[:, 1].tolist()]
    for name, cls in (("morf", road_module.ROADMostRelevantFirst), ("lerf", road_module.ROADLeastRelevantFirst)):
        for k, p in enumerate(percentiles):
            metric = cls(percentile=p)
            metric.perturbation.imputer.noise = 0.0
            ref = metric(inputs, up, score_of, model)
            assert ours[name][:, k].numpy() == pytest.approx(ref, abs=1e-4), (name, p)

    class Quiet(road_module.NoisyLinearImputer):  # ROADCombined builds its own imputers, with noise 0.01
        def __init__(self, noise: float = 0.0, **kw) -> None:
            super().__init__(noise=0.0, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(road_module, "NoisyLinearImputer", Quiet)
        ref = road_module.ROADCombined(percentiles=list(percentiles))(inputs, up, score_of, model)
    assert ours["combined"].numpy() == pytest.approx(ref, abs=1e-4)


def test_a_map_that_removes_everything_imputes_the_mean():
    from wsss.cam.metrics import impute, road

    images = torch.randn(1, 3, 8, 8)
    for solver in ("direct", "cg"):
        assert torch.equal(impute(images, torch.ones(1, 8, 8, dtype=torch.bool), solver=solver), 0 * images)
    out = road(_model(), images, torch.tensor([[0, 1]]), torch.zeros(1, 4, 4), percentiles=(50,))
    assert torch.isfinite(out["combined"]).all()  # a constant map ties everywhere: all removed, still defined


def test_the_two_solvers_agree_and_nothing_removed_changes_nothing():
    from wsss.cam.metrics import impute

    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 20, 11, generator=g)
    removed = torch.rand(3, 20, 11, generator=g) > 0.5
    removed[1] = False  # nothing to impute
    removed[2, :, :5] = True  # a wide band, known pixels on one side only
    direct, cg = impute(images, removed, solver="direct"), impute(images, removed, solver="cg")
    torch.testing.assert_close(direct, cg, rtol=0, atol=1e-5)
    assert torch.equal(direct[1], images[1])
    with pytest.raises(ValueError, match="solver must be one of"):
        impute(images, removed, solver="qr")
