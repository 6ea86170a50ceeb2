"""Benchmark wsss.cam against a plain forward, and pytorch-grad-cam / torchcam when installed.

Every method computes all maps of a batch (default: 4 images at 448 px, 3 classes each, resnet50 with
``weights=None``) at layer4 (closed form where the method has one) and layer3 (autograd). Times are medians
over ``--repeats`` interleaved rounds, after one untimed warm-up round, printed as ratios to the median of a
plain ``torch.no_grad()`` forward of the same batch timed in the same rounds (and, in brackets, min to min,
which is steadier on a shared machine). Process CPU time (all threads) is recorded too: it moves less when
other jobs share the CPU.

    python scripts/bench_cam.py --repeats 3 --device cpu --size 448
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from wsss.cam import METHODS, build_cam

DEFAULT_METHODS = ["cam", "gradcam", "gradcampp", "xgradcam", "layercam", "guided_gradcam"]
PEER_METHODS = {  # ours -> (pytorch-grad-cam class, torchcam class)
    "gradcam": ("GradCAM", "GradCAM"),
    "gradcampp": ("GradCAMPlusPlus", "GradCAMpp"),
    "xgradcam": ("XGradCAM", "XGradCAM"),
    "layercam": ("LayerCAM", "LayerCAM"),
    "scorecam": ("ScoreCAM", None),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(name: str, model, layer: str, images, classes, scorecam_batch: int) -> Callable[[], object]:
    kwargs = {"batch_size": scorecam_batch} if name == "scorecam" else {}

    def run() -> object:
        with build_cam(name, model, layer, **kwargs) as cam:
            return cam(images, classes)

    return run


def _pytorch_grad_cam(name: str, model, layer: str, images, classes) -> Callable[[], object] | None:
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    method = getattr(pytorch_grad_cam, name)

    def run() -> object:
        maps = []
        with method(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            # one call (forward + full backward) per class
            maps.extend(
                cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in column])
                for column in classes.T.tolist()
            )
        return maps

    return run


def _torchcam(name: str | None, model, layer: str, images, classes) -> Callable[[], object] | None:
    if name is None:
        return None
    try:
        import torchcam.methods
    except ImportError:
        return None
    method = getattr(torchcam.methods, name)

    def run() -> object:
        maps = []
        with method(model, target_layer=layer) as extractor:
            scores = model(images)
            columns = classes.T.tolist()
            for k, column in enumerate(columns):  # one backward per class, on the same forward
                cam = extractor(class_idx=column, scores=scores, retain_graph=k < len(columns) - 1)[0]
                maps.append(F.interpolate(cam[:, None], images.shape[-2:], mode="bilinear"))  # to (H, W)
        return maps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (plus one warm-up round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=448, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=3, help="classes per image")
    parser.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    parser.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS), help="scorecam is opt-in"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip pytorch-grad-cam and torchcam")
    parser.add_argument("--scorecam-batch", type=int, default=64, help="masked images per Score-CAM forward")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    device = torch.device(args.device)
    model = torchvision.models.resnet50(weights=None).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    picks = [torch.randperm(1000, generator=generator)[: args.classes] for _ in range(args.batch)]
    classes = torch.stack(picks).to(device)  # (B, K) distinct classes per image

    def forward() -> object:
        with torch.no_grad():
            return model(images)

    entries: dict[tuple[str, str, str], Callable[[], object]] = {("forward", "-", "plain"): forward}
    paths: dict[tuple[str, str], str] = {}
    for layer in args.layers:
        for name in args.methods:
            ours = _ours(name, model, layer, images, classes, args.scorecam_batch)
            entries[(name, layer, "wsss.cam")] = ours
            if args.no_peers or name not in PEER_METHODS:
                continue
            pgc_name, torchcam_name = PEER_METHODS[name]
            for library, run in (
                ("pytorch-grad-cam", _pytorch_grad_cam(pgc_name, model, layer, images, classes)),
                ("torchcam", _torchcam(torchcam_name, model, layer, images, classes)),
            ):
                if run is not None:
                    entries[(name, layer, library)] = run
        for name in args.methods:  # which path each method takes at this layer, for the table
            kwargs = {"batch_size": args.scorecam_batch} if name == "scorecam" else {}
            with build_cam(name, model, layer, **kwargs) as cam:
                cam(images[:1, :, :64, :64], classes[:1])
                paths[(name, layer)] = cam.last_path or "-"

    wall: dict[tuple[str, str, str], list[float]] = {key: [] for key in entries}
    cpu: dict[tuple[str, str, str], list[float]] = {key: [] for key in entries}
    for round_ in range(args.repeats + 1):
        for key, run in entries.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            _sync(device)
            if round_ > 0:  # round 0 warms up
                wall[key].append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - start_cpu)
            model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills .grad
    _report(args, device, entries, paths, wall, cpu)


def _report(args, device, entries, paths, wall, cpu) -> None:
    """Print the header and two tables: wall-clock ratios and process-CPU-time ratios."""

    forward = ("forward", "-", "plain")
    base, base_min = statistics.median(wall[forward]), min(wall[forward])
    base_cpu = statistics.median(cpu[forward])
    maps = args.batch * args.classes
    setting = f"{args.batch} images x {args.size} px, {args.classes} classes each ({maps} maps)"
    print(f"# resnet50 weights=None, {setting}")
    print(
        f"# device {device} ({platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}), torch {torch.__version__}, repeats {args.repeats} (median, interleaved)"
    )
    print(
        f"# plain no-grad forward: wall median {base * 1e3:.0f} ms, wall min {base_min * 1e3:.0f} ms, "
        f"process CPU time median {base_cpu * 1e3:.0f} ms"
    )
    libraries = ["wsss.cam"] + ([] if args.no_peers else ["pytorch-grad-cam", "torchcam"])

    def table(title: str, cell: Callable[[tuple[str, str, str]], str]) -> None:
        print(f"\n{title}\n")
        print("| method | layer | wsss.cam path | " + " | ".join(libraries) + " |")
        print("|---|---|---|" + "---|" * len(libraries))
        for layer in args.layers:
            for name in args.methods:
                keys = [(name, layer, library) for library in libraries]
                cells = [cell(key) if key in entries else "n/a" for key in keys]
                print(f"| {name} | {layer} | {paths[(name, layer)]} | " + " | ".join(cells) + " |")

    table(
        "Wall clock: median(method) / median(forward), in brackets min(method) / min(forward)",
        lambda key: f"{statistics.median(wall[key]) / base:.2f}x ({min(wall[key]) / base_min:.2f}x)",
    )
    table(
        "Process CPU time (all threads): median(method) / median(forward)",
        lambda key: f"{statistics.median(cpu[key]) / base_cpu:.2f}x",
    )


if __name__ == "__main__":
    main()
