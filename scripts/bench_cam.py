"""Benchmark wsss.cam against a plain forward, and pytorch-grad-cam / torchcam when installed.

Every method computes all maps of a batch (default: 4 images at 448 px, 3 classes each, resnet50 with
``weights=None``) at layer4 (closed form where the method has one) and layer3 (autograd). Times are medians
over ``--repeats`` interleaved rounds, after one untimed warm-up round, printed as ratios to the median of a
plain ``torch.no_grad()`` forward of the same batch timed in the same rounds (and, in brackets, min to min,
which is steadier on a shared machine). Process CPU time (all threads) is recorded too: it moves less when
other jobs share the CPU.

    python scripts/bench_cam.py --repeats 3 --device cpu --size 448
    python scripts/bench_cam.py --model vit_b_16 --methods gradcam hirescam    # 224 px, the last block's ln_1
    python scripts/bench_cam.py --model swin_t --methods gradcam hirescam      # 224 px, the final norm
    python scripts/bench_cam.py --model efficientnet_lite0                     # 320 px, bn2 and blocks.5

For the transformers the peers get their documented reshape transforms (pytorch-grad-cam's `reshape_transform`
for ViT and Swin); torchcam reads (B, C, h, w) maps only, so it does not apply there.
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


def _lite0(weights: object = None) -> torch.nn.Module:
    from wsss.models.efficientnet import build_lite

    return build_lite("efficientnet_lite0", weights)


DEFAULT_METHODS = ["cam", "gradcam", "gradcampp", "xgradcam", "layercam", "guided_gradcam"]
MODELS = {  # --model -> (builder, default layers, default size)
    "resnet50": (torchvision.models.resnet50, ["layer4", "layer3"], 448),
    "vit_b_16": (torchvision.models.vit_b_16, ["encoder.layers.encoder_layer_11.ln_1"], 224),
    "swin_t": (torchvision.models.swin_t, ["norm"], 224),
    # timm's network (the `.[pretrained]` extra): bn2 (BN + ReLU6 after the 1x1 head conv) feeds GAP and the
    # ImageNet classifier (closed form); blocks.5 is the last stride-32 stage (autograd)
    "efficientnet_lite0": (_lite0, ["bn2", "blocks.5"], 320),
}
PEER_METHODS = {  # ours -> (pytorch-grad-cam class, torchcam class)
    "gradcam": ("GradCAM", "GradCAM"),
    "hirescam": ("HiResCAM", None),
    "eigencam": ("EigenCAM", None),
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


def _reshape_transform(model_name: str, size: int) -> Callable | None:
    """pytorch-grad-cam's documented reshape transforms (its tutorials for ViT and Swin)."""
    if model_name == "vit_b_16":
        g = size // 16
        return lambda t: t[:, 1:, :].reshape(t.shape[0], g, g, t.shape[2]).permute(0, 3, 1, 2)
    if model_name == "swin_t":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


def _pytorch_grad_cam(
    name: str, model, layer: str, images, classes, reshape: Callable | None = None
) -> Callable[[], object] | None:
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    method = getattr(pytorch_grad_cam, name)

    def run() -> object:
        maps = []
        with method(model=model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape) as cam:
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
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: per model)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=3, help="classes per image")
    parser.add_argument("--layers", nargs="+", default=None, help="default: per model")
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
    builder, layers, size = MODELS[args.model]
    args.layers, args.size = args.layers or layers, args.size or size
    torch.manual_seed(0)
    model = builder(weights=None).to(device).eval()
    if args.model == "vit_b_16":
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the ViT head at zero
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    picks = [torch.randperm(1000, generator=generator)[: args.classes] for _ in range(args.batch)]
    classes = torch.stack(picks).to(device)  # (B, K) distinct classes per image

    def forward() -> object:
        with torch.no_grad():
            return model(images)

    entries: dict[tuple[str, str, str], Callable[[], object]] = {("forward", "-", "plain"): forward}
    paths: dict[tuple[str, str], str] = {}
    reshape = _reshape_transform(args.model, args.size)
    for layer in args.layers:
        for name in args.methods:
            ours = _ours(name, model, layer, images, classes, args.scorecam_batch)
            entries[(name, layer, "wsss.cam")] = ours
            if args.no_peers or name not in PEER_METHODS:
                continue
            pgc_name, torchcam_name = PEER_METHODS[name]
            for library, run in (
                ("pytorch-grad-cam", _pytorch_grad_cam(pgc_name, model, layer, images, classes, reshape)),
                ("torchcam", _torchcam(torchcam_name if reshape is None else None, model, layer, images, classes)),
            ):
                if run is not None:
                    entries[(name, layer, library)] = run
        for name in args.methods:  # which path each method takes at this layer, for the table
            kwargs = {"batch_size": args.scorecam_batch} if name == "scorecam" else {}
            with build_cam(name, model, layer, **kwargs) as cam:
                cam(images[:1] if args.model != "resnet50" else images[:1, :, :64, :64], classes[:1])
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
    print(f"# {args.model} weights=None, {setting}")
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
